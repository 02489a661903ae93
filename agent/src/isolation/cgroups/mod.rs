//! Task cgroups: one [`TaskCgroup`] trait with a v1 ([`v1::V1Cgroup`]) and a v2
//! ([`v2::V2Cgroup`]) implementation. Each controller lives in its own file (`cpu.rs`,
//! `memory.rs`, `pids.rs`, `cpuset.rs`, `devices.rs` with `bpf.rs` for v2) that knows how to apply its limits and read its stats
//! for both versions, through cgroups-rs's controllers pointed at explicit directories (which
//! is also what lets the v2 path be tested against fixture directories).
//!
//! Every task cgroup lives under one agent-owned parent, `mlp/`, in each hierarchy.

pub mod bpf;
pub mod cpu;
pub mod cpuset;
pub mod devices;
pub mod memory;
pub mod pids;
pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agent-owned parent of every task cgroup.
pub const PARENT: &str = "mlp";
/// CFS period used for hard CPU caps.
pub const CFS_PERIOD_US: u64 = 100_000;

/// A limit that could not be written (or a statistic not read) in the controller at `dir`.
pub(crate) fn limit_err(dir: &Path, what: &'static str, e: impl std::fmt::Display) -> CgroupError {
    CgroupError::Limit { what, path: dir.to_path_buf(), message: e.to_string() }
}

/// Errors from cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable cgroup hierarchy was found.
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    /// A cgroup directory could not be created or removed.
    #[error("{action} cgroup {path}: {source}")]
    Fs {
        /// What was being done.
        action: &'static str,
        /// The cgroup directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A limit could not be written.
    #[error("setting {what} in {path}: {message}")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// The cgroup directory.
        path: PathBuf,
        /// cgroups-rs's error.
        message: String,
    },
    /// Processes were still in the cgroup after killing them.
    #[error("cgroup {path} still has processes {pids:?} after SIGKILL")]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// What is left.
        pids: Vec<u32>,
    },
}

/// The limits of one task's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Relative CPU share, from the task's `cpu` (MHz); v1 `cpu.shares`, v2 `cpu.weight`.
    pub cpu_shares: u64,
    /// Hard CPU cap as a CFS quota per [`CFS_PERIOD_US`]; None = no cap.
    pub cpu_quota_us: Option<u64>,
    /// Pin to this many cores (cpuset); None = any core.
    pub cores: Option<u32>,
    /// The CPUs chosen for `cores` (by the exec driver's [`cpuset::CoreAllocator`]); a cgroup
    /// with `cores` but without as many CPUs here is refused.
    pub cpus: Vec<u32>,
    /// Hard memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Soft memory target in bytes (when a burst limit is above it).
    pub memory_soft_bytes: Option<u64>,
    /// Maximum number of processes (threads count too).
    pub pids: Option<u64>,
    /// The only device nodes the task may open or make (`crate::isolation::devices`); None
    /// leaves the cgroup's devices as they are.
    pub devices: Option<Vec<crate::isolation::devices::DeviceRule>>,
}

/// What a cgroup reports about its tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time used, in nanoseconds.
    pub cpu_total_ns: u64,
    /// Time throttled by the CFS quota, in nanoseconds.
    pub cpu_throttled_ns: u64,
    /// Resident anonymous memory, in bytes.
    pub memory_rss_bytes: u64,
    /// Page cache, in bytes.
    pub memory_cache_bytes: u64,
    /// Highest usage seen (v1 `max_usage_in_bytes`, v2 `memory.peak` where present).
    pub memory_max_usage_bytes: u64,
    /// Processes in the cgroup.
    pub pids: u64,
    /// Processes killed by the OOM killer in this cgroup so far.
    pub oom_kills: u64,
}

/// One task's cgroup (in every hierarchy that applies).
pub trait TaskCgroup: Send + Sync + std::fmt::Debug {
    /// The `cgroup.procs` files a process writes its pid into to join (the task's init does
    /// this before it forks, so the whole tree is inside).
    fn procs_files(&self) -> Vec<PathBuf>;
    /// Writes the limits.
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// Pids of every process in the cgroup.
    fn pids(&self) -> Vec<u32>;
    /// Current statistics.
    fn stats(&self) -> Stats;
    /// Removes the cgroup directories (they must be empty of processes).
    fn remove(&self) -> Result<(), CgroupError>;
    /// The cgroup directories (for tests and logs).
    fn paths(&self) -> Vec<PathBuf>;
}

/// Which cgroup layout this machine has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Controllers on v1 hierarchies (also hybrid: v1 controllers plus an empty unified mount).
    V1 {
        /// Whether a unified (v2) mount without controllers exists beside the v1 ones.
        hybrid: bool,
    },
    /// The unified hierarchy with controllers, mounted at this path.
    V2 {
        /// Mount point of the unified hierarchy.
        root: PathBuf,
    },
}

/// Decides the layout from /proc/self/mountinfo and the unified root's `cgroup.controllers`.
pub fn detect_layout(mountinfo: &str, unified_controllers: impl Fn(&Path) -> String) -> Option<Layout> {
    let mut v1_memory = false;
    let mut unified: Option<PathBuf> = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = pre.split_whitespace().nth(4).unwrap_or("");
        let mut post = post.split_whitespace();
        let fstype = post.next().unwrap_or("");
        let super_opts = post.nth(1).unwrap_or("");
        if fstype == "cgroup" && super_opts.split(',').any(|o| o == "memory") {
            v1_memory = true;
        }
        if fstype == "cgroup2" {
            unified = Some(PathBuf::from(mount_point));
        }
    }
    if let Some(root) = &unified {
        let ctrls = unified_controllers(root);
        // A unified mount is usable only where the controllers we need were given to it.
        if !v1_memory && ctrls.split_whitespace().any(|c| c == "memory") {
            return Some(Layout::V2 { root: root.clone() });
        }
    }
    if v1_memory {
        return Some(Layout::V1 { hybrid: unified.is_some() });
    }
    None
}

/// This machine's layout.
pub fn host_layout() -> Option<Layout> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    detect_layout(&mountinfo, |root| std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default())
}

/// Creates the cgroup `mlp/<name>` for a task on this machine's layout and applies `limits`.
pub fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<Box<dyn TaskCgroup>, CgroupError> {
    let cg: Box<dyn TaskCgroup> = match layout {
        Layout::V1 { .. } => Box::new(v1::V1Cgroup::create(name, limits.cores.is_some(), limits.devices.is_some())?),
        Layout::V2 { root } => Box::new(v2::V2Cgroup::create(root, name)?),
    };
    if let Err(e) = cg.apply(limits) {
        let _ = cg.remove();
        return Err(e);
    }
    Ok(cg)
}

/// The `cgroup.procs` files [`create`] makes for `mlp/<name>` (nothing is created), so that a
/// start can hand them to the task's init while the cgroup is still being created.
pub fn procs_files_for(layout: &Layout, name: &str, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
    match layout {
        Layout::V1 { .. } => v1::V1Cgroup::procs_files_for(name, limits.cores.is_some(), limits.devices.is_some()),
        Layout::V2 { root } => Ok(vec![root.join(PARENT).join(name).join("cgroup.procs")]),
    }
}

/// Opens the existing task cgroup `name` (a task started by a previous agent run) without
/// touching its limits; an error when it does not exist.
pub fn open_existing(layout: &Layout, name: &str) -> Result<Box<dyn TaskCgroup>, CgroupError> {
    if name.is_empty() {
        return Err(CgroupError::Unavailable("no cgroup name recorded".into()));
    }
    match layout {
        Layout::V1 { .. } => {
            let hier = cgroups_rs::fs::hierarchies::V1::new();
            let exists =
                hier.get_mount_point(cgroups_rs::fs::Controllers::Pids).is_some_and(|(mount, _)| mount.join(PARENT).join(name).is_dir());
            if !exists {
                return Err(CgroupError::Unavailable(format!("cgroup {name} does not exist")));
            }
            // Creating is idempotent on existing directories (no limits are written).
            let devices = cgroups_rs::fs::hierarchies::V1::new()
                .get_mount_point(cgroups_rs::fs::Controllers::Devices)
                .is_some_and(|(mount, _)| mount.join(PARENT).join(name).is_dir());
            Ok(Box::new(v1::V1Cgroup::create(name, false, devices)?))
        }
        Layout::V2 { root } => {
            let dir = root.join(PARENT).join(name);
            if !dir.is_dir() {
                return Err(CgroupError::Unavailable(format!("cgroup {name} does not exist")));
            }
            Ok(Box::new(v2::V2Cgroup::at(root, &dir)))
        }
    }
}

/// The agent-owned parent `mlp/` in the hierarchy that holds cpuset, and the file there
/// that lists the CPUs its children may use.
fn cpuset_parent(layout: &Layout) -> Option<(PathBuf, &'static str)> {
    match layout {
        Layout::V2 { root } => Some((root.join(PARENT), "cpuset.cpus.effective")),
        Layout::V1 { .. } => cgroups_rs::fs::hierarchies::V1::new()
            .get_mount_point(cgroups_rs::fs::Controllers::CpuSet)
            .map(|(mount, _)| (mount.join(PARENT), "cpuset.cpus")),
    }
}

/// The CPUs tasks may be pinned to: those the `mlp/` parent may use (its own parent's before
/// the first pinned task created it). Empty when the layout has no cpuset.
pub fn cpu_pool(layout: &Layout) -> Vec<u32> {
    let Some((parent, file)) = cpuset_parent(layout) else {
        return Vec::new();
    };
    let read = |dir: &Path| cpuset::parse_list(&std::fs::read_to_string(dir.join(file)).unwrap_or_default());
    let own = read(&parent);
    if !own.is_empty() {
        return own;
    }
    parent.parent().map(read).unwrap_or_default()
}

/// The CPUs the task cgroup `mlp/<name>` is pinned to (its own `cpuset.cpus`); empty when it is
/// not pinned or does not exist.
pub fn pinned_cpus(layout: &Layout, name: &str) -> Vec<u32> {
    if name.is_empty() {
        return Vec::new();
    }
    let Some((parent, _)) = cpuset_parent(layout) else {
        return Vec::new();
    };
    cpuset::parse_list(&std::fs::read_to_string(parent.join(name).join("cpuset.cpus")).unwrap_or_default())
}

/// Caps the processes of every task together, on the agent-owned parent `mlp/`.
pub fn set_parent_pids(layout: &Layout, max: u64) -> Result<(), CgroupError> {
    let parent = match layout {
        Layout::V2 { root } => root.join(PARENT),
        Layout::V1 { .. } => cgroups_rs::fs::hierarchies::V1::new()
            .get_mount_point(cgroups_rs::fs::Controllers::Pids)
            .map(|(mount, _)| mount.join(PARENT))
            .ok_or_else(|| CgroupError::Unavailable("no v1 pids hierarchy".into()))?,
    };
    mkdir(&parent)?;
    std::fs::write(parent.join("pids.max"), max.to_string()).map_err(|e| CgroupError::Limit {
        what: "pids.max",
        path: parent.clone(),
        message: e.to_string(),
    })
}

/// Kills and removes `mlp/<name>` in every hierarchy where a previous agent run left it (its
/// task was killed while the agent was down). Missing directories are fine.
pub fn remove_leftover(layout: &Layout, name: &str) {
    let dirs: Vec<PathBuf> = match layout {
        Layout::V2 { root } => vec![root.join(PARENT).join(name)],
        Layout::V1 { .. } => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            mountinfo
                .lines()
                .filter_map(|l| {
                    let (pre, post) = l.split_once(" - ")?;
                    let mount = pre.split_whitespace().nth(4)?;
                    post.starts_with("cgroup ").then(|| PathBuf::from(mount))
                })
                .map(|mount| mount.join(PARENT).join(name))
                .collect()
        }
    };
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let cg = Leftover(dir);
        if let Err(e) = kill_and_remove(&cg) {
            tracing::warn!(error = %e, "removing a leftover task cgroup failed");
        }
    }
}

/// A cgroup directory found on disk, known only by its path.
#[derive(Debug)]
struct Leftover(PathBuf);

impl TaskCgroup for Leftover {
    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.0.join("cgroup.procs")]
    }
    fn apply(&self, _: &Limits) -> Result<(), CgroupError> {
        Ok(())
    }
    fn pids(&self) -> Vec<u32> {
        read_pids(&self.0.join("cgroup.procs"))
    }
    fn stats(&self) -> Stats {
        Stats::default()
    }
    fn remove(&self) -> Result<(), CgroupError> {
        rmdir(&self.0)
    }
    fn paths(&self) -> Vec<PathBuf> {
        vec![self.0.clone()]
    }
}

/// Reads the pids listed in a `cgroup.procs` file.
pub(crate) fn read_pids(procs_file: &Path) -> Vec<u32> {
    std::fs::read_to_string(procs_file).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Creates a directory (and parents) for a cgroup.
pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Fs { action: "creating", path: path.to_path_buf(), source })
}

/// Removes a cgroup directory; the kernel may report EBUSY for a moment after the last process
/// exited, so retry briefly. A missing directory is fine.
pub(crate) fn rmdir(path: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                // Only EBUSY passes; anything else (ENOTDIR, EACCES) will not.
                if Instant::now() > deadline || source.raw_os_error() != Some(libc::EBUSY) {
                    return Err(CgroupError::Fs { action: "removing", path: path.to_path_buf(), source });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// SIGKILLs every process in the cgroup until it is empty (processes may fork while being
/// killed, so loop), then removes it. Bounded: gives up after a few seconds.
pub fn kill_and_remove(cg: &dyn TaskCgroup) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let name = cg.paths().first().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    loop {
        let pids = cg.pids();
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(CgroupError::Busy { path: cg.paths().first().cloned().unwrap_or_default(), pids });
        }
        for pid in pids {
            kill_member(pid, &name);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cg.remove()
}

/// SIGKILLs `pid` if, pinned by a pidfd, it is still in task cgroup `name`. A pid read from
/// `cgroup.procs` may end before the signal, and pids wrap (at 32,768 by default): a kill by
/// number could reach whatever process got the number since, anywhere on the host. The pidfd
/// names one process, so the check and the signal are about the same one.
fn kill_member(pid: u32, name: &str) {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
    let Some(pinned) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { return };
    let Ok(fd) = pidfd_open(pinned, PidfdFlags::empty()) else { return };
    // `/proc/<pid>` shows the pinned process until it is reaped; a newcomer with its number
    // could pass the check, but the signal still goes to the pinned process only (and fails:
    // it is gone).
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if in_cgroup(&cgroups, name) {
        let _ = pidfd_send_signal(&fd, Signal::KILL);
    }
}

/// Whether a process whose `/proc/<pid>/cgroup` reads `cgroups` is in task cgroup `name` of
/// some hierarchy (`<id>:<controllers>:<path>` lines; the path ends in `/mlp/<name>`).
fn in_cgroup(cgroups: &str, name: &str) -> bool {
    !name.is_empty()
        && cgroups.lines().any(|l| {
            l.splitn(3, ':').nth(2).and_then(|path| path.strip_suffix(name)).is_some_and(|parent| parent.ends_with(&format!("/{PARENT}/")))
        })
}

/// Converts v1 cpu shares (2..=262144) to a v2 cpu.weight (1..=10000), as runc does.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// The limits for a task's resources. `mhz_per_core` turns the `cpu` MHz into a CFS quota.
pub fn limits_for(res: &mlp_proto::v1::Resources, mhz_per_core: u64, default_pids: u64) -> Limits {
    let memory = res.memory_mib.max(res.memory_max_mib);
    let burst = res.memory_max_mib > res.memory_mib;
    Limits {
        cpu_shares: res.cpu_mhz.clamp(2, 262_144),
        cpu_quota_us: (res.cpu_hard_limit && res.cpu_mhz > 0).then(|| (CFS_PERIOD_US * res.cpu_mhz / mhz_per_core.max(1)).max(1000)),
        cores: (res.cores > 0).then_some(res.cores),
        cpus: Vec::new(),
        memory_bytes: (memory > 0).then_some(memory * 1024 * 1024),
        memory_soft_bytes: burst.then_some(res.memory_mib * 1024 * 1024),
        pids: Some(if res.pids > 0 { u64::from(res.pids) } else { default_pids }),
        devices: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let v1 = "30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n";
        let v2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let hybrid = format!("{v1}29 24 0:25 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        let none = |_: &Path| String::new();
        let mem = |_: &Path| "cpuset cpu io memory pids".to_string();
        assert_eq!(detect_layout(v1, none), Some(Layout::V1 { hybrid: false }));
        assert_eq!(detect_layout(&hybrid, none), Some(Layout::V1 { hybrid: true }));
        assert_eq!(detect_layout(&hybrid, mem), Some(Layout::V1 { hybrid: true }));
        assert_eq!(detect_layout(v2, mem), Some(Layout::V2 { root: "/sys/fs/cgroup".into() }));
        assert_eq!(detect_layout(v2, none), None);
    }

    #[test]
    fn a_process_is_in_a_task_cgroup_when_a_hierarchy_puts_it_under_mlp() {
        let v1 = "12:pids:/mlp/a1.t\n11:memory:/mlp/a1.t\n1:name=systemd:/user.slice\n";
        assert!(in_cgroup(v1, "a1.t"));
        assert!(!in_cgroup(v1, "1.t"), "a suffix of the name is another cgroup");
        assert!(!in_cgroup(v1, "a1.u"));
        assert!(in_cgroup("0::/nested/mlp/a1.t\n", "a1.t"), "v2, the agent's parent below the root");
        assert!(!in_cgroup("0::/a1.t\n", "a1.t"), "not under the agent's parent");
        assert!(!in_cgroup("0::/mlp/a1.t/x\n", "a1.t"));
        assert!(!in_cgroup(v1, ""));
        assert!(!in_cgroup("", "a1.t"));
    }

    /// A pid read from `cgroup.procs` that names a process outside the cgroup by the time of the
    /// kill (its number reused) is left alone.
    #[test]
    fn a_pid_that_names_a_process_outside_the_cgroup_is_not_killed() {
        let mut stranger = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        kill_member(stranger.id(), "no-such-alloc.t");
        std::thread::sleep(Duration::from_millis(50));
        assert!(stranger.try_wait().expect("try_wait").is_none(), "a process outside the cgroup was killed");
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    #[test]
    fn limits_from_resources() {
        let res =
            mlp_proto::v1::Resources { cpu_mhz: 500, memory_mib: 256, memory_max_mib: 512, cpu_hard_limit: true, ..Default::default() };
        let l = limits_for(&res, 2000, 4096);
        assert_eq!(l.cpu_shares, 500);
        assert_eq!(l.cpu_quota_us, Some(25_000));
        assert_eq!(l.memory_bytes, Some(512 << 20));
        assert_eq!(l.memory_soft_bytes, Some(256 << 20));
        assert_eq!(l.pids, Some(4096));
        assert_eq!(l.cores, None);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }
}
