//! The task's root filesystem: [`plan`] turns what the host has into a list of [`Step`]s (pure,
//! tested below), and [`enter`] carries them out inside the task's mount namespace and
//! `pivot_root`s into the result.
//!
//! The root is a small tmpfs (remounted read-only at the end) holding read-only bind mounts of
//! the host's `/bin /sbin /lib* /usr` (symlinks such as Debian's `/bin -> usr/bin` are
//! recreated as symlinks), a minimal `/etc`, a fresh `/proc`, a minimal `/dev`, a private
//! `/tmp`, and the task's directories: `/local` (private), `/alloc` (shared by the group) and
//! `/secrets` (tmpfs, 0700). A task with real GPUs also gets its GPUs' device nodes, the
//! driver's control nodes and the driver's user-space files ([`GpuRoot`]); no other task sees
//! any NVIDIA node. Every mount lives in the task's own mount namespace, so nothing
//! has to be unmounted on the host when the task ends.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use super::phases::Phases;
use super::User;

/// Host directories bound read-only into every root (symlinks are recreated instead).
pub const SYSTEM_DIRS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr"];
/// Host files copied into the task's `/etc` when present.
pub const ETC_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/services",
    "/etc/protocols",
];
/// A bridge-mode allocation's `/etc/hosts` and `/etc/resolv.conf` in place of the plan's.
pub fn use_network_files(steps: &mut Vec<Step>, hosts: &str, resolv_conf: &str) {
    let (hosts_path, resolv_path) = (p("/etc/hosts"), p("/etc/resolv.conf"));
    steps.retain(|s| !matches!(s, Step::Copy { path, .. } | Step::Write { path, .. } if *path == hosts_path || *path == resolv_path));
    // Right after `/etc` is made.
    let at = steps.iter().position(|s| matches!(s, Step::Dir { path } if *path == p("/etc"))).map_or(steps.len(), |i| i + 1);
    steps.insert(at, Step::Write { path: hosts_path, contents: hosts.to_string() });
    steps.insert(at + 1, Step::Write { path: resolv_path, contents: resolv_conf.to_string() });
}

/// Host directories of `/etc` bound read-only when present (certificates; Debian's
/// alternatives, which `awk` and friends resolve through).
pub const ETC_DIRS: &[&str] = &["/etc/ssl", "/etc/pki", "/etc/ca-certificates", "/etc/alternatives"];
/// Device nodes bound from the host into the task's `/dev`.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What the host has at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A directory.
    Dir,
    /// Anything else that can be bound or copied.
    File,
    /// A symlink, with its target.
    Symlink(PathBuf),
}

/// Looks at a host path without following a final symlink.
pub fn probe_host(path: &Path) -> Option<HostEntry> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if meta.file_type().is_symlink() {
        return std::fs::read_link(path).ok().map(HostEntry::Symlink);
    }
    Some(if meta.is_dir() { HostEntry::Dir } else { HostEntry::File })
}

/// One step of building the root; paths are absolute inside the task's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// `mkdir -p`.
    Dir {
        /// Path inside the root.
        path: PathBuf,
    },
    /// A symlink.
    Symlink {
        /// What it points to.
        target: PathBuf,
        /// Path inside the root.
        path: PathBuf,
    },
    /// A bind mount of a host path (a directory or a file).
    Bind {
        /// Host path.
        src: PathBuf,
        /// Path inside the root.
        path: PathBuf,
        /// Read-only.
        readonly: bool,
        /// A device node: keep device access (no `nodev`).
        device: bool,
    },
    /// A tmpfs with these mount options (`mode=...,size=...`).
    Tmpfs {
        /// Path inside the root.
        path: PathBuf,
        /// Mount options.
        options: String,
    },
    /// A fresh procfs for the task's PID namespace.
    Proc {
        /// Path inside the root.
        path: PathBuf,
    },
    /// A private devpts instance.
    Devpts {
        /// Path inside the root.
        path: PathBuf,
    },
    /// A copy of a host file (following symlinks), mode 0644.
    Copy {
        /// Host path.
        src: PathBuf,
        /// Path inside the root.
        path: PathBuf,
    },
    /// Hides a host path inside a bound directory (`--exec-hide`): an empty read-only tmpfs
    /// over a directory, `/dev/null` bound read-only over a file.
    Mask {
        /// Path inside the root.
        path: PathBuf,
        /// It is a directory.
        dir: bool,
    },
    /// A file with these contents, mode 0644.
    Write {
        /// Path inside the root.
        path: PathBuf,
        /// Contents.
        contents: String,
    },
}

impl Step {
    /// The step's kind, for timing (`bind`, `copy`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Dir { .. } => "dir",
            Step::Symlink { .. } => "symlink",
            Step::Bind { .. } => "bind",
            Step::Tmpfs { .. } => "tmpfs",
            Step::Proc { .. } => "proc",
            Step::Devpts { .. } => "devpts",
            Step::Copy { .. } => "copy",
            Step::Write { .. } => "write",
            Step::Mask { .. } => "mask",
        }
    }
}

/// What a task with real GPUs gets in its root; empty (the default) for every other task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuRoot {
    /// Device nodes as (host path, path under the task's `/dev`): its GPUs' and the driver's
    /// control nodes (`crate::isolation::devices::gpu_node_binds`), bound read-write as devices.
    pub nodes: Vec<(PathBuf, PathBuf)>,
    /// The driver's user-space files (libraries, binaries), bound read-only at the same path
    /// where the root's system directories do not show them already (a symlink is recreated).
    pub files: Vec<PathBuf>,
}

/// Whether the root shows `path` through the host's system directories it binds (or links),
/// e.g. `/usr/lib/x86_64-linux-gnu/libcuda.so.1`, `/lib64/libcuda.so.1`.
pub fn in_system_dirs(path: &Path) -> bool {
    SYSTEM_DIRS.iter().any(|d| path.starts_with(d))
}

/// Where the task's own directories are on the host.
#[derive(Debug, Clone)]
pub struct TaskDirs {
    /// The task's `local/`.
    pub local: PathBuf,
    /// The group's shared `alloc/`.
    pub alloc: PathBuf,
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// Whether `path` is one the default root holds (a system directory or anything under it, one
/// of [`ETC_FILES`], one of [`ETC_DIRS`] or anything under it), so that `--exec-hide` can
/// hide it. `path` must be absolute and plain (no `.` or `..`).
pub fn hideable(path: &Path) -> bool {
    use std::path::Component;
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir)) {
        return false;
    }
    SYSTEM_DIRS.iter().chain(ETC_DIRS).any(|d| path.starts_with(d)) || ETC_FILES.iter().any(|f| path == Path::new(f))
}

/// Why a path cannot be hidden from task roots (`--exec-hide`).
#[derive(Debug, thiserror::Error)]
pub enum HideError {
    /// Not a path of the default root (relative, with `.` or `..`, or elsewhere).
    #[error("{}: must be an absolute path the default task root holds (under {}, or one of {})",
        .path.display(), SYSTEM_DIRS.iter().chain(ETC_DIRS).copied().collect::<Vec<_>>().join(" "), ETC_FILES.join(" "))]
    NotInRoot {
        /// The path asked for.
        path: PathBuf,
    },
    /// Its parents are symlinks that lead out of the default root.
    #[error("{}: resolves to {}, outside the default task root", .path.display(), .real.display())]
    ResolvesOutside {
        /// The path asked for.
        path: PathBuf,
        /// Where it leads on this host.
        real: PathBuf,
    },
}

/// Checks a path to hide from every task root (`--exec-hide`) and returns it as the root holds
/// it: through symlinked parents (`/bin -> usr/bin`) to where the root binds it.
pub fn check_hidden_path(path: &Path) -> Result<PathBuf, HideError> {
    if !hideable(path) {
        return Err(HideError::NotInRoot { path: path.to_path_buf() });
    }
    let real = match (path.parent().map(std::fs::canonicalize), path.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => path.to_path_buf(),
    };
    if !hideable(&real) {
        return Err(HideError::ResolvesOutside { path: path.to_path_buf(), real });
    }
    Ok(real)
}

/// The steps that build a task's root. `probe` says what the host has (see [`probe_host`]);
/// `extra_ro` are host paths added read-only, `hidden` host paths of the default root left out
/// (a path the root would bind, copy or link is simply not; one inside a bound directory is
/// masked, see [`Step::Mask`]); `gpu` what a task with real GPUs gets besides.
pub fn plan(
    probe: impl Fn(&Path) -> Option<HostEntry>,
    dirs: &TaskDirs,
    user: &User,
    hostname: &str,
    extra_ro: &[PathBuf],
    hidden: &[PathBuf],
    gpu: &GpuRoot,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let is_hidden = |path: &Path| hidden.iter().any(|h| path.starts_with(h));
    // Directories bound as a whole: a hidden path under one of them is masked.
    let mut bound: Vec<PathBuf> = Vec::new();
    let mut ro_bind = |src: &Path, is_dir: bool, steps: &mut Vec<Step>| {
        if is_dir {
            bound.push(src.to_path_buf());
        }
        steps.push(Step::Bind { src: src.to_path_buf(), path: src.to_path_buf(), readonly: true, device: false });
    };
    for d in SYSTEM_DIRS {
        if is_hidden(Path::new(d)) {
            continue;
        }
        match probe(Path::new(d)) {
            Some(HostEntry::Symlink(target)) => steps.push(Step::Symlink { target, path: p(d) }),
            Some(HostEntry::Dir) => ro_bind(Path::new(d), true, &mut steps),
            _ => {}
        }
    }
    steps.push(Step::Dir { path: p("/etc") });
    for f in ETC_FILES {
        if !is_hidden(Path::new(f)) && probe(Path::new(f)).is_some() {
            steps.push(Step::Copy { src: p(f), path: p(f) });
        }
    }
    steps.push(Step::Write {
        path: p("/etc/hosts"),
        contents: format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
    });
    steps.push(Step::Write { path: p("/etc/hostname"), contents: format!("{hostname}\n") });
    for d in ETC_DIRS {
        if !is_hidden(Path::new(d)) && probe(Path::new(d)) == Some(HostEntry::Dir) {
            ro_bind(Path::new(d), true, &mut steps);
        }
    }
    steps.push(Step::Tmpfs { path: p("/dev"), options: "mode=0755,size=64k".into() });
    for dev in DEVICES {
        let host = Path::new("/dev").join(dev);
        if probe(&host).is_some() {
            steps.push(Step::Bind { src: host.clone(), path: host, readonly: false, device: true });
        }
    }
    for (host, inside) in &gpu.nodes {
        steps.push(Step::Bind { src: host.clone(), path: inside.clone(), readonly: false, device: true });
    }
    steps.push(Step::Devpts { path: p("/dev/pts") });
    steps.push(Step::Symlink { target: p("pts/ptmx"), path: p("/dev/ptmx") });
    steps.push(Step::Tmpfs { path: p("/dev/shm"), options: "mode=1777".into() });
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        steps.push(Step::Symlink { target: p(target), path: p(link) });
    }
    steps.push(Step::Proc { path: p("/proc") });
    steps.push(Step::Tmpfs { path: p("/tmp"), options: "mode=1777".into() });
    steps.push(Step::Bind { src: dirs.local.clone(), path: p("/local"), readonly: false, device: false });
    steps.push(Step::Bind { src: dirs.alloc.clone(), path: p("/alloc"), readonly: false, device: false });
    steps.push(Step::Tmpfs { path: p("/secrets"), options: format!("mode=0700,uid={},gid={},size=1m", user.uid, user.gid) });
    // Last, so that a path under /tmp or /dev is not covered by the root's own mounts.
    for extra in extra_ro {
        if is_hidden(extra) {
            continue;
        }
        match probe(extra) {
            Some(HostEntry::Dir) => ro_bind(extra, true, &mut steps),
            Some(HostEntry::File) => ro_bind(extra, false, &mut steps),
            _ => {}
        }
    }
    for file in &gpu.files {
        if in_system_dirs(file) || is_hidden(file) || extra_ro.iter().any(|e| file.starts_with(e)) {
            continue;
        }
        match probe(file) {
            Some(HostEntry::Symlink(target)) => steps.push(Step::Symlink { target, path: file.clone() }),
            Some(HostEntry::File) => ro_bind(file, false, &mut steps),
            _ => {}
        }
    }
    for h in hidden {
        if !bound.iter().any(|b| h.starts_with(b) && h != b) {
            continue;
        }
        match probe(h) {
            Some(HostEntry::Dir) => steps.push(Step::Mask { path: h.clone(), dir: true }),
            // A file by /dev/null; a symlink is left as it is (hide what it points to).
            Some(HostEntry::File) => steps.push(Step::Mask { path: h.clone(), dir: false }),
            _ => {}
        }
    }
    steps
}

/// An image's root (`oci`): an overlay of read-only layer directories under a private
/// writable directory, mounted on the task's root instead of the tmpfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// Layer directories, the top-most first (overlayfs' `lowerdir` order).
    pub lower: Vec<PathBuf>,
    /// The task's private upper directory.
    pub upper: PathBuf,
    /// Overlayfs' work directory (same filesystem as `upper`).
    pub work: PathBuf,
}

/// Longest overlay mount data the kernel takes (one page, less the other options).
const MAX_OVERLAY_OPTIONS: usize = 4000;

impl Overlay {
    /// The mount data: `lowerdir=...,upperdir=...,workdir=...`; paths with `:` or `,` (which
    /// overlayfs would split) and data longer than a page are refused.
    pub fn options(&self) -> Result<String, String> {
        let all = self.lower.iter().chain([&self.upper, &self.work]);
        for path in all {
            let text = path.to_str().ok_or_else(|| format!("{}: not UTF-8", path.display()))?;
            if text.contains([':', ',']) || !path.is_absolute() {
                return Err(format!("{text}: overlay paths must be absolute and free of ':' and ','"));
            }
        }
        if self.lower.is_empty() {
            return Err("an image root needs at least one layer".into());
        }
        let lower: Vec<String> = self.lower.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let data = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), self.upper.display(), self.work.display());
        if data.len() > MAX_OVERLAY_OPTIONS {
            return Err(format!("the image has too many layers for one overlay mount ({} bytes of options)", data.len()));
        }
        Ok(data)
    }
}

/// The steps that build an image's root (`oci`) on top of its overlay: the image brings its
/// own `/bin`, `/usr`, `/etc`; the task gets a fresh `/dev` (standard nodes, its GPUs),
/// `/proc`, `/tmp`, its `/local`, `/alloc` and `/secrets`, and `/etc/hosts`, `/etc/hostname`
/// and the host's `/etc/resolv.conf`.
pub fn plan_image(probe: impl Fn(&Path) -> Option<HostEntry>, dirs: &TaskDirs, user: &User, hostname: &str, gpu: &GpuRoot) -> Vec<Step> {
    let mut steps = vec![
        Step::Dir { path: p("/etc") },
        Step::Write {
            path: p("/etc/hosts"),
            contents: format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
        },
        Step::Write { path: p("/etc/hostname"), contents: format!("{hostname}\n") },
    ];
    if probe(Path::new("/etc/resolv.conf")).is_some() {
        steps.push(Step::Copy { src: p("/etc/resolv.conf"), path: p("/etc/resolv.conf") });
    }
    steps.push(Step::Tmpfs { path: p("/dev"), options: "mode=0755,size=64k".into() });
    for dev in DEVICES {
        let host = Path::new("/dev").join(dev);
        if probe(&host).is_some() {
            steps.push(Step::Bind { src: host.clone(), path: host, readonly: false, device: true });
        }
    }
    for (host, inside) in &gpu.nodes {
        steps.push(Step::Bind { src: host.clone(), path: inside.clone(), readonly: false, device: true });
    }
    steps.push(Step::Devpts { path: p("/dev/pts") });
    steps.push(Step::Symlink { target: p("pts/ptmx"), path: p("/dev/ptmx") });
    steps.push(Step::Tmpfs { path: p("/dev/shm"), options: "mode=1777".into() });
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        steps.push(Step::Symlink { target: p(target), path: p(link) });
    }
    steps.push(Step::Proc { path: p("/proc") });
    steps.push(Step::Tmpfs { path: p("/tmp"), options: "mode=1777".into() });
    steps.push(Step::Bind { src: dirs.local.clone(), path: p("/local"), readonly: false, device: false });
    steps.push(Step::Bind { src: dirs.alloc.clone(), path: p("/alloc"), readonly: false, device: false });
    steps.push(Step::Tmpfs { path: p("/secrets"), options: format!("mode=0700,uid={},gid={},size=1m", user.uid, user.gid) });
    steps
}

/// Refuses a step's path whose existing components inside `root` include a symlink: an
/// image's root is the image's to shape, and before `pivot_root` a symlink would lead the
/// agent's mounts and writes onto the host.
fn no_symlink_on_path(root: &Path, path: &Path) -> Result<(), RootfsError> {
    let mut at = root.to_path_buf();
    for part in path.components() {
        use std::path::Component;
        match part {
            Component::Normal(name) => at.push(name),
            Component::RootDir | Component::CurDir => continue,
            _ => return Err(RootfsError::Escape { path: path.to_path_buf() }),
        }
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(RootfsError::Escape { path: path.to_path_buf() }),
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Errors building the root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A path the root's steps touch is (or runs through) a symlink of the image.
    #[error("{path}: the image has a symlink on this path, which the task root mounts or writes over; refused", path = .path.display())]
    Escape {
        /// Path inside the root.
        path: PathBuf,
    },
    /// The overlay's options are unusable.
    #[error("the image root: {0}")]
    Overlay(String),
    /// A mount or another syscall failed.
    #[error("{what} {path}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// A file could not be created or copied.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Sys { what, path, source }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

const NONE: Option<&str> = None;

/// Carries out `steps` under `root` and `pivot_root`s into it. Must run in a fresh mount
/// namespace (and, for `/proc`, as a process of the task's PID namespace).
pub fn enter(root: &Path, steps: &[Step], overlay: Option<&Overlay>, phases: &mut Phases) -> Result<(), RootfsError> {
    // Nothing we mount may propagate back to the host.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE).map_err(sys("making private", Path::new("/")))?;
    match overlay {
        Some(o) => {
            let data = o.options().map_err(RootfsError::Overlay)?;
            // nodev: device nodes an image carries are inert (overlay's whiteouts still work).
            mount(Some("overlay"), root, Some("overlay"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(data.as_str()))
                .map_err(sys("mounting the image overlay on", root))?;
            phases.mark("root_overlay");
        }
        None => {
            mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755,size=16m"))
                .map_err(sys("mounting the root tmpfs on", root))?;
            phases.mark("root_tmpfs");
        }
    }
    // One phase per run of steps of the same kind.
    let mut run: Option<&'static str> = None;
    for step in steps {
        let kind = step.kind();
        if run.is_some_and(|r| r != kind) {
            phases.mark(run.unwrap_or_default());
        }
        run = Some(kind);
        if overlay.is_some() {
            no_symlink_on_path(root, step_path(step))?;
        }
        apply(root, step)?;
    }
    if let Some(r) = run {
        phases.mark(r);
    }
    pivot(root)?;
    phases.mark("pivot_root");
    if overlay.is_some() {
        // An image's root stays writable (into the task's private upper directory).
        return Ok(());
    }
    // The root itself is read-only: a task can write only to /local, /alloc, /secrets, /tmp.
    mount(NONE, "/", NONE, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV, NONE)
        .map_err(sys("remounting read-only", Path::new("/")))
}

fn step_path(step: &Step) -> &Path {
    match step {
        Step::Dir { path }
        | Step::Symlink { path, .. }
        | Step::Bind { path, .. }
        | Step::Tmpfs { path, .. }
        | Step::Proc { path }
        | Step::Devpts { path }
        | Step::Copy { path, .. }
        | Step::Mask { path, .. }
        | Step::Write { path, .. } => path,
    }
}

fn apply(root: &Path, step: &Step) -> Result<(), RootfsError> {
    match step {
        Step::Dir { path } => {
            let at = inside(root, path);
            std::fs::create_dir_all(&at).map_err(io("creating", &at))
        }
        Step::Symlink { target, path } => {
            let at = inside(root, path);
            in_parent(&at, || std::os::unix::fs::symlink(target, &at)).map_err(io("creating symlink", &at))
        }
        Step::Bind { src, path, readonly, device } => {
            let at = inside(root, path);
            if src.is_dir() {
                std::fs::create_dir_all(&at).map_err(io("creating", &at))?;
            } else {
                in_parent(&at, || std::fs::File::create(&at)).map_err(io("creating", &at))?;
            }
            mount(Some(src.as_path()), &at, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE).map_err(sys("binding", &at))?;
            let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
            if !device {
                flags |= MsFlags::MS_NODEV;
            }
            if *readonly {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(NONE, &at, NONE, flags, NONE).map_err(sys("remounting", &at))
        }
        Step::Tmpfs { path, options } => {
            let at = inside(root, path);
            std::fs::create_dir_all(&at).map_err(io("creating", &at))?;
            mount(Some("tmpfs"), &at, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
                .map_err(sys("mounting tmpfs on", &at))
        }
        Step::Proc { path } => {
            let at = inside(root, path);
            std::fs::create_dir_all(&at).map_err(io("creating", &at))?;
            mount(Some("proc"), &at, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, NONE)
                .map_err(sys("mounting proc on", &at))
        }
        Step::Devpts { path } => {
            let at = inside(root, path);
            std::fs::create_dir_all(&at).map_err(io("creating", &at))?;
            mount(Some("devpts"), &at, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620"))
                .map_err(sys("mounting devpts on", &at))
        }
        Step::Copy { src, path } => {
            let at = inside(root, path);
            in_parent(&at, || std::fs::copy(src, &at)).map_err(io("copying to", &at))?;
            set_mode(&at, 0o644)
        }
        Step::Mask { path, dir } => {
            let at = inside(root, path);
            let ro = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
            if *dir {
                mount(Some("tmpfs"), &at, Some("tmpfs"), ro, Some("mode=0755,size=4k")).map_err(sys("masking", &at))
            } else {
                mount(Some("/dev/null"), &at, NONE, MsFlags::MS_BIND, NONE).map_err(sys("masking", &at))?;
                mount(NONE, &at, NONE, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | ro, NONE).map_err(sys("masking", &at))
            }
        }
        Step::Write { path, contents } => {
            let at = inside(root, path);
            in_parent(&at, || std::fs::write(&at, contents)).map_err(io("writing", &at))?;
            set_mode(&at, 0o644)
        }
    }
}

/// Runs `make` (which creates `at`), creating `at`'s parent directories first only when it
/// failed for want of them: most of a root's files go into directories that exist by then, and
/// each `create_dir_all` of an existing directory is a failed `mkdir` and a `stat`.
fn in_parent<T>(at: &Path, make: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
            Some(parent) => {
                std::fs::create_dir_all(parent)?;
                make()
            }
            None => Err(e),
        },
        other => other,
    }
}

fn set_mode(at: &Path, mode: u32) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", at))
}

/// `pivot_root` into `root` and detach the old root, as runc does: with both the new and the
/// old root as ".", so no directory for the old root is needed. (Where `pivot_root` cannot be
/// used — a root on the initramfs — `chroot` would be the fallback; the agent's data dir is
/// never there, so it is not implemented.)
fn pivot(root: &Path) -> Result<(), RootfsError> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let old = open("/", OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(sys("opening", Path::new("/")))?;
    let new = open(root, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(sys("opening", root))?;
    let result = (|| {
        nix::unistd::fchdir(new).map_err(sys("chdir", root))?;
        nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into", root))?;
        nix::unistd::fchdir(old).map_err(sys("chdir to the old root", Path::new("/")))?;
        mount(NONE, ".", NONE, MsFlags::MS_SLAVE | MsFlags::MS_REC, NONE).map_err(sys("making the old root a slave", Path::new("/")))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root", Path::new("/")))?;
        nix::unistd::chdir("/").map_err(sys("chdir", Path::new("/")))
    })();
    let _ = nix::unistd::close(old);
    let _ = nix::unistd::close(new);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridge_allocation_gets_its_own_hosts_and_resolv_conf() {
        let probe = |path: &Path| -> Option<HostEntry> { (path == Path::new("/etc/resolv.conf")).then_some(HostEntry::File) };
        let dirs = TaskDirs { local: "/l".into(), alloc: "/a".into() };
        let user = User { name: "nobody".into(), uid: 65534, gid: 65534, home: "/".into() };
        let mut steps = plan(probe, &dirs, &user, "h", &[], &[], &GpuRoot::default());
        use_network_files(&mut steps, "172.26.64.2\th\n", "nameserver 10.0.0.1\n");
        let etc: Vec<&Step> = steps.iter().filter(|s| matches!(s, Step::Copy { path, .. } | Step::Write { path, .. } if path.starts_with("/etc/hosts") || path.starts_with("/etc/resolv.conf"))).collect();
        assert_eq!(
            etc,
            [
                &Step::Write { path: "/etc/hosts".into(), contents: "172.26.64.2\th\n".into() },
                &Step::Write { path: "/etc/resolv.conf".into(), contents: "nameserver 10.0.0.1\n".into() },
            ]
        );
        let dir = steps.iter().position(|s| *s == Step::Dir { path: "/etc".into() });
        assert_eq!(dir.map(|i| i + 1), steps.iter().position(|s| matches!(s, Step::Write { path, .. } if path == Path::new("/etc/hosts"))));
    }

    #[test]
    fn plan_follows_the_host() {
        // A Debian-like host: /bin and /lib are symlinks into /usr, no /lib32.
        let probe = |path: &Path| -> Option<HostEntry> {
            match path.to_str()? {
                "/bin" => Some(HostEntry::Symlink("usr/bin".into())),
                "/lib" => Some(HostEntry::Symlink("usr/lib".into())),
                "/usr" | "/sbin" | "/etc/ssl" | "/opt/models" => Some(HostEntry::Dir),
                "/etc/passwd" | "/etc/group" | "/dev/null" | "/dev/zero" => Some(HostEntry::File),
                _ => None,
            }
        };
        let dirs = TaskDirs { local: "/data/a/t/local".into(), alloc: "/data/a/alloc".into() };
        let user = User { name: "nobody".into(), uid: 65534, gid: 65534, home: "/".into() };
        let steps = plan(probe, &dirs, &user, "g-0-abcd", &[PathBuf::from("/opt/models")], &[], &GpuRoot::default());
        let has = |s: &Step| steps.contains(s);
        assert!(has(&Step::Symlink { target: "usr/bin".into(), path: "/bin".into() }));
        assert!(has(&Step::Bind { src: "/usr".into(), path: "/usr".into(), readonly: true, device: false }));
        assert!(has(&Step::Bind { src: "/opt/models".into(), path: "/opt/models".into(), readonly: true, device: false }));
        assert!(has(&Step::Copy { src: "/etc/passwd".into(), path: "/etc/passwd".into() }));
        assert!(has(&Step::Bind { src: "/dev/null".into(), path: "/dev/null".into(), readonly: false, device: true }));
        assert!(has(&Step::Bind { src: "/data/a/t/local".into(), path: "/local".into(), readonly: false, device: false }));
        assert!(has(&Step::Tmpfs { path: "/secrets".into(), options: "mode=0700,uid=65534,gid=65534,size=1m".into() }));
        assert!(!steps.iter().any(|s| matches!(s, Step::Bind { path, .. } if path == Path::new("/lib32"))));
        assert!(!steps.iter().any(|s| matches!(s, Step::Bind { path, .. } if path == Path::new("/dev/tty"))));
        // /dev is mounted before the devices bound into it.
        let dev = steps.iter().position(|s| matches!(s, Step::Tmpfs { path, .. } if path == Path::new("/dev")));
        let null = steps.iter().position(|s| matches!(s, Step::Bind { path, .. } if path == Path::new("/dev/null")));
        assert!(dev < null);
        // No GPUs: no NVIDIA node, no driver file.
        assert!(!format!("{steps:?}").contains("nvidia"), "{steps:?}");
    }

    #[test]
    fn gpu_nodes_and_driver_files() {
        let probe = |path: &Path| -> Option<HostEntry> {
            match path.to_str()? {
                "/usr" | "/opt/models" => Some(HostEntry::Dir),
                "/dev/null" | "/opt/nv/lib/libcuda.so.550.1" | "/opt/nv/bin/nvidia-smi" | "/opt/models/libnvidia-ml.so.1" => {
                    Some(HostEntry::File)
                }
                "/opt/nv/lib/libcuda.so.1" => Some(HostEntry::Symlink("libcuda.so.550.1".into())),
                _ => None,
            }
        };
        let dirs = TaskDirs { local: "/l".into(), alloc: "/a".into() };
        let user = User { name: "nobody".into(), uid: 65534, gid: 65534, home: "/".into() };
        let gpu = GpuRoot {
            nodes: vec![
                ("/host/dev/nvidia1".into(), "/dev/nvidia1".into()),
                ("/host/dev/nvidia-caps/nvidia-cap21".into(), "/dev/nvidia-caps/nvidia-cap21".into()),
                ("/host/dev/nvidiactl".into(), "/dev/nvidiactl".into()),
            ],
            files: [
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                "/opt/nv/lib/libcuda.so.1",
                "/opt/nv/lib/libcuda.so.550.1",
                "/opt/nv/bin/nvidia-smi",
                "/opt/models/libnvidia-ml.so.1",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
        };
        let steps = plan(probe, &dirs, &user, "h", &[PathBuf::from("/opt/models")], &[], &gpu);
        let dev = steps.iter().position(|s| matches!(s, Step::Tmpfs { path, .. } if path == Path::new("/dev")));
        for (src, path) in &gpu.nodes {
            let at = steps.iter().position(|s| *s == Step::Bind { src: src.clone(), path: path.clone(), readonly: false, device: true });
            assert!(at.is_some() && dev < at, "{} bound as a device after /dev: {steps:?}", path.display());
        }
        let ro = |f: &str| Step::Bind { src: f.into(), path: f.into(), readonly: true, device: false };
        assert!(steps.contains(&ro("/opt/nv/lib/libcuda.so.550.1")));
        assert!(steps.contains(&ro("/opt/nv/bin/nvidia-smi")));
        assert!(steps.contains(&Step::Symlink { target: "libcuda.so.550.1".into(), path: "/opt/nv/lib/libcuda.so.1".into() }));
        // Shown by /usr or by an extra read-only directory already: not bound again.
        let text = format!("{steps:?}");
        assert!(!text.contains("x86_64-linux-gnu"), "{text}");
        assert_eq!(text.matches("libnvidia-ml").count(), 0, "{text}");
        assert!(in_system_dirs(Path::new("/lib64/libcuda.so.1")));
        assert!(!in_system_dirs(Path::new("/opt/nv/lib/libcuda.so.1")));
    }

    #[test]
    fn hidden_paths_are_left_out_or_masked() {
        let probe = |path: &Path| -> Option<HostEntry> {
            match path.to_str()? {
                "/usr" | "/usr/local" | "/etc/ssl" | "/lib" => Some(HostEntry::Dir),
                "/usr/bin/sudo" | "/etc/passwd" | "/etc/group" => Some(HostEntry::File),
                _ => None,
            }
        };
        let dirs = TaskDirs { local: "/l".into(), alloc: "/a".into() };
        let user = User { name: "nobody".into(), uid: 65534, gid: 65534, home: "/".into() };
        let hidden: Vec<PathBuf> = ["/etc/ssl", "/lib", "/etc/group", "/usr/local", "/usr/bin/sudo"].iter().map(PathBuf::from).collect();
        let steps = plan(probe, &dirs, &user, "h", &[], &hidden, &GpuRoot::default());
        let binds: Vec<&Path> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind { src, .. } | Step::Copy { src, .. } => Some(src.as_path()),
                _ => None,
            })
            .collect();
        for gone in ["/etc/ssl", "/lib", "/etc/group"] {
            assert!(!binds.contains(&Path::new(gone)), "{gone} still in the root");
        }
        assert!(binds.contains(&Path::new("/usr")));
        assert!(binds.contains(&Path::new("/etc/passwd")));
        // Inside the bound /usr: masked, after /usr is bound.
        let usr = steps.iter().position(|s| matches!(s, Step::Bind { src, .. } if src == Path::new("/usr")));
        let local = steps.iter().position(|s| *s == Step::Mask { path: "/usr/local".into(), dir: true });
        assert!(usr.is_some() && local.is_some() && usr < local, "{steps:?}");
        assert!(steps.contains(&Step::Mask { path: "/usr/bin/sudo".into(), dir: false }));
        // Only what the default root holds can be hidden.
        assert!(hideable(Path::new("/usr/local")));
        assert!(hideable(Path::new("/etc/ssl/certs")));
        assert!(hideable(Path::new("/etc/passwd")));
        assert!(!hideable(Path::new("/etc/shadow")));
        assert!(!hideable(Path::new("/proc")));
        assert!(!hideable(Path::new("usr/local")));
        assert!(!hideable(Path::new("/usr/../proc")));
    }
}
