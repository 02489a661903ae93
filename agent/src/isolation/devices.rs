//! Which device nodes a task sees and may open: the GPU nodes bound into its `/dev`
//! ([`gpu_node_binds`], pure) and the allow-list its cgroup enforces ([`allow_list`]): the
//! standard nodes of every root, the pseudo-terminals, and the GPU and control nodes bound into
//! it; everything else is denied, also a node the task would make or reach some other way.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Control nodes of the NVIDIA driver every CUDA process opens (`nvidia-modeset` only where the
/// host has it), bound into tasks with real GPUs when present under the device directory.
pub const NVIDIA_CONTROL_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"];

/// Major number of the Unix98 pseudo-terminal slaves (`/dev/pts/*`).
pub const PTS_MAJOR: u32 = 136;
/// `/dev/ptmx` (also the `ptmx` node of a devpts instance).
pub const PTMX: (u32, u32) = (5, 2);

/// The kind of device a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// Character devices.
    Char,
    /// Block devices.
    Block,
    /// Both.
    All,
}

/// One allowed (type, major, minor, access) entry; `None` numbers match any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    /// Character, block or both.
    pub kind: DeviceKind,
    /// Major number; None = any.
    pub major: Option<u32>,
    /// Minor number; None = any.
    pub minor: Option<u32>,
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// mknod.
    pub mknod: bool,
}

impl DeviceRule {
    /// Read, write and mknod on one character device.
    pub fn char_rwm(major: u32, minor: Option<u32>) -> DeviceRule {
        DeviceRule { kind: DeviceKind::Char, major: Some(major), minor, read: true, write: true, mknod: true }
    }

    /// The rule in the v1 `devices.allow` syntax (`c 195:1 rwm`).
    pub fn to_v1(&self) -> String {
        let kind = match self.kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
            DeviceKind::All => 'a',
        };
        let num = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        let access: String =
            [(self.read, 'r'), (self.write, 'w'), (self.mknod, 'm')].iter().filter(|(on, _)| *on).map(|(_, c)| *c).collect();
        format!("{kind} {}:{} {access}", num(self.major), num(self.minor))
    }
}

/// Where a GPU node of the host is bound in the task: a node under `dev_dir` keeps its path
/// relative to it under `/dev` (`<dev_dir>/nvidia-caps/nvidia-cap21` →
/// `/dev/nvidia-caps/nvidia-cap21`); one elsewhere goes to `/dev/<its name>`. None for a path
/// with `.`/`..` or without a name.
pub fn task_dev_path(dev_dir: &Path, host: &Path) -> Option<PathBuf> {
    let rel = host.strip_prefix(dev_dir).ok().filter(|r| !r.as_os_str().is_empty()).map(Path::to_path_buf).or_else(|| {
        tracing::warn!(node = %host.display(), dev_dir = %dev_dir.display(), "a GPU device node outside the device directory");
        host.file_name().map(PathBuf::from)
    })?;
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(Path::new("/dev").join(rel))
}

/// The GPU nodes a task with real devices gets, as (host path, path in the task): every node of
/// its devices (`assigned`, deduplicated: MIG instances of one GPU share its node) that exists
/// (`exists`), then the [`NVIDIA_CONTROL_NODES`] present under `dev_dir`.
pub fn gpu_node_binds(dev_dir: &Path, assigned: &[PathBuf], exists: impl Fn(&Path) -> bool) -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = Vec::new();
    let control = NVIDIA_CONTROL_NODES.iter().map(|n| dev_dir.join(n));
    for host in assigned.iter().cloned().chain(control) {
        if out.iter().any(|(h, _)| *h == host) {
            continue;
        }
        if !exists(&host) {
            tracing::debug!(node = %host.display(), "GPU device node not present; not bound");
            continue;
        }
        if let Some(inside) = task_dev_path(dev_dir, &host) {
            out.push((host, inside));
        }
    }
    out
}

/// The (major, minor) of a character device node; None for anything else.
pub fn char_dev(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_char_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some((nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32))
}

/// The allow-list of a task's cgroup: `standard` (the host's [`super::rootfs::DEVICES`], as
/// [`standard_nodes`] reads them), every pseudo-terminal and `/dev/ptmx` (`mlp alloc exec`
/// with a TTY), and `gpu` (the numbers of its GPU and control nodes).
pub fn allow_list(standard: &[(u32, u32)], gpu: &[(u32, u32)]) -> Vec<DeviceRule> {
    let mut rules: Vec<DeviceRule> = Vec::new();
    let numbered = standard.iter().chain(gpu).map(|&(major, minor)| DeviceRule::char_rwm(major, Some(minor)));
    for r in numbered.chain([DeviceRule::char_rwm(PTS_MAJOR, None), DeviceRule::char_rwm(PTMX.0, Some(PTMX.1))]) {
        if !rules.contains(&r) {
            rules.push(r);
        }
    }
    rules
}

/// The numbers of the host's standard nodes bound into every root (`/dev/null`, ...), read once
/// per process.
pub fn standard_nodes() -> &'static [(u32, u32)] {
    static NODES: std::sync::OnceLock<Vec<(u32, u32)>> = std::sync::OnceLock::new();
    NODES.get_or_init(|| super::rootfs::DEVICES.iter().filter_map(|d| char_dev(&Path::new("/dev").join(d))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_nodes_keep_their_place_under_dev() {
        let dev = Path::new("/srv/devs");
        let present = ["nvidia1", "nvidia0", "nvidia-caps/nvidia-cap21", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];
        let exists = |p: &Path| present.iter().any(|n| dev.join(n) == p);
        let assigned: Vec<PathBuf> =
            ["nvidia1", "nvidia0", "nvidia-caps/nvidia-cap21", "nvidia0", "nvidia7"].iter().map(|n| dev.join(n)).collect();
        let binds = gpu_node_binds(dev, &assigned, exists);
        let inside: Vec<&str> = binds.iter().filter_map(|(_, i)| i.to_str()).collect();
        assert_eq!(
            inside,
            ["/dev/nvidia1", "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"],
            "each node once, missing ones (nvidia7, nvidia-modeset) left out"
        );
        assert_eq!(binds[2].0, dev.join("nvidia-caps/nvidia-cap21"));
        // Nothing assigned: still only the control nodes (the caller binds none at all for a
        // task without real GPUs).
        assert_eq!(gpu_node_binds(dev, &[], exists).len(), 3);
        assert_eq!(task_dev_path(dev, Path::new("/elsewhere/nvidia3")), Some(PathBuf::from("/dev/nvidia3")));
        assert_eq!(task_dev_path(dev, Path::new("/srv/devs/../etc/shadow")), None);
    }

    #[test]
    fn allow_list_has_the_standard_nodes_ptys_and_gpus() {
        let rules = allow_list(&[(1, 3), (1, 5)], &[(195, 1), (195, 255), (1, 3)]);
        let v1: Vec<String> = rules.iter().map(DeviceRule::to_v1).collect();
        assert_eq!(v1, ["c 1:3 rwm", "c 1:5 rwm", "c 195:1 rwm", "c 195:255 rwm", "c 136:* rwm", "c 5:2 rwm"]);
        let ro = DeviceRule { kind: DeviceKind::All, major: None, minor: None, read: true, write: false, mknod: false };
        assert_eq!(ro.to_v1(), "a *:* r");
    }

    #[test]
    fn standard_nodes_are_read_from_the_host() {
        // /dev/null is 1:3 on Linux; read, not assumed.
        assert!(standard_nodes().contains(&(1, 3)), "{:?}", standard_nodes());
        assert_eq!(char_dev(Path::new("/")), None);
    }
}
