//! Task drivers: the [`Driver`] trait that starts a task's process and the [`TaskHandle`] that
//! waits for and signals it.
//!
//! Every task runs under its own supervisor (`mlp __mlp-supervise <config>`: the process side is
//! `crate::task::supervisor`, the agent side [`supervised`]), a detached process that owns the
//! task's output and records its exit, so tasks outlive an agent restart and a new agent
//! reattaches to them ([`Driver::reattach`]). Drivers reach it only through its config and
//! record files and its status pipe, never by calling into it.
//!
//! `raw_exec` is [`raw_exec::ProcessDriver`]: the task runs in its own session/process group
//! (`setsid`), stdin is /dev/null, and stdout/stderr go into size-rotated log files.
//! `exec` is [`exec::ExecDriver`]: the same contract, with namespaces, a task root, an
//! unprivileged user and a cgroup (all of it from [`crate::isolation`]).
//! `wasm` is [`wasm::WasmDriver`]: a WebAssembly module run by wasmtime on a thread of the agent,
//! confined by the wasm sandbox alone (no supervisor, no cgroup; it ends with the agent).
//! `oci` is [`oci::OciDriver`]: `exec`'s isolation with a container image's layers (from the
//! node's [`crate::image::ImageStore`]) as the task's root.

pub mod exec;
pub mod logs;
pub mod oci;
pub mod raw_exec;
pub mod supervised;
pub mod wasm;
pub mod zygote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use mlp_proto::v1::Resources;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::isolation::IsolationSettings;
pub use exec::ExecDriver;
pub use oci::OciDriver;
pub use raw_exec::ProcessDriver;
use supervised::TaskRecord;
pub use wasm::WasmDriver;

/// Errors from a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The command could not be started (not found, not executable, ...).
    #[error("failed to start command {command:?}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log files could not be opened.
    #[error("failed to open log files in {dir}: {source}")]
    Logs {
        /// Log directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A signal could not be delivered.
    #[error("failed to signal process group {pgid}: {source}")]
    Signal {
        /// Process group id.
        pgid: u32,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// No driver of that name on this agent.
    #[error("unknown or disabled driver {0:?}")]
    Unknown(String),
    /// The task asked for a user this agent refuses (or does not know).
    #[error("user {user:?} is not allowed for the exec driver: {reason}")]
    User {
        /// The user asked for.
        user: String,
        /// Why not.
        reason: String,
    },
    /// Setting up the task's isolation failed (cgroup, root filesystem, namespaces), or the
    /// command could not be started inside it.
    #[error("{0}")]
    Isolation(String),
    /// The task asks for more cores than are free on this node.
    #[error(transparent)]
    Cores(#[from] crate::isolation::cgroups::cpuset::CoreError),
    /// A name the task's paths or cgroup would be built from is unsafe.
    #[error(transparent)]
    Name(#[from] crate::paths::UnsafeName),
    /// The wasm driver could not load, link or instantiate the module.
    #[error("wasm: {0}")]
    Wasm(String),
    /// The oci driver could not get the task's image.
    #[error("{0}")]
    Image(String),
    /// A task left by a previous agent run cannot be reattached.
    #[error("cannot reattach to the task in {dir}: {reason}")]
    Reattach {
        /// The task's directory.
        dir: PathBuf,
        /// Why not.
        reason: String,
    },
}

/// Everything a driver needs to start a task.
#[derive(Debug, Clone, Default)]
pub struct TaskSpec {
    /// Task name (also the log file prefix).
    pub name: String,
    /// Command to run (a path, or a name looked up in PATH).
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The module to run (`wasm`): a path in the task dir or an absolute one on the node.
    pub module: String,
    /// Environment added to the agent's (task env and MLP_* variables).
    pub env: BTreeMap<String, String>,
    /// Working directory (the task's `local/`).
    pub work_dir: PathBuf,
    /// Directory for the log files (`<task>/logs/`).
    pub log_dir: PathBuf,
    /// Rotate a log file when it reaches this size.
    pub log_max_file_bytes: u64,
    /// Keep this many log files per stream.
    pub log_max_files: u32,
    /// Resources asked for (enforced by `exec`).
    pub resources: Option<Resources>,
    /// Allocation id (names the task's cgroup).
    pub alloc_id: String,
    /// The task's directory (`<alloc>/<task>`).
    pub task_dir: PathBuf,
    /// The group's shared `alloc/` directory.
    pub alloc_shared_dir: PathBuf,
    /// Hostname for the task's UTS namespace (`exec`).
    pub hostname: String,
    /// User to run as; empty = the agent's default (`exec`).
    pub user: String,
    /// Network mode: "" or "host" = the host's, "none" = an empty namespace (`exec`).
    pub network_mode: String,
    /// The allocation's bridge-mode network: the task joins its namespace, and an `exec` task's
    /// root gets its `/etc/hosts` and `/etc/resolv.conf`.
    pub network: Option<crate::network::TaskNetwork>,
    /// The task's GPUs (`exec` binds real ones' device nodes and the driver's files into its
    /// root and allows them in its cgroup).
    pub gpus: crate::gpu::TaskGpus,
    /// Host directories bound read-write into the task's root at the same path (`exec`; the
    /// MPS pipe directory of a GPU share). Other drivers see the host's paths anyway.
    pub rw_paths: Vec<std::path::PathBuf>,
    /// Host volumes (issue 15 §4): bound into the root of an `exec` or `oci` task; a `raw_exec`
    /// task is told their host paths (`MLP_VOLUME_<label>`); `wasm` refuses them.
    pub volumes: Vec<crate::volumes::VolumeBind>,
    /// The image to run (`oci`).
    pub image: String,
    /// The image's entrypoint replaced (`oci`).
    pub entrypoint: Vec<String>,
    /// The image's working directory replaced (`oci`).
    pub image_work_dir: String,
    /// Credentials for the image's registry (`oci`).
    pub registry_auth: Option<crate::image::Credentials>,
    /// Where a driver reports progress before the task starts (`oci`: the pull), as task
    /// events.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// The start's phases before the driver (the allocation's receipt, the alloc and task
    /// runners), continued by the driver and logged with its own; empty = timed from the
    /// driver's start.
    pub phases: crate::isolation::phases::Phases,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Set when the OOM killer killed a process of the task at its memory limit (MiB).
    pub oom_limit_mib: Option<u64>,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(limit) = self.oom_limit_mib {
            return write!(f, "OOM killed (limit {limit} MiB)");
        }
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

/// Starts tasks.
#[async_trait]
pub trait Driver: Send + Sync {
    /// The driver name used in job specs (`exec`, `raw_exec`).
    fn name(&self) -> &'static str;
    /// Starts the task; returns once the process is running.
    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError>;
    /// Reattaches to a task a previous agent run started (`record`, read from `task_dir`): a
    /// running task is watched again, one that ended meanwhile reports its recorded exit
    /// status from `wait`. What cannot be reattached is killed and an error returned.
    fn reattach(&self, task_dir: &Path, record: &TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError>;
}

/// A running task. Dropping a handle leaves the task running (agent shutdown); only
/// `signal` and the end of the task stop it.
#[async_trait]
pub trait TaskHandle: Send {
    /// Pid whose namespaces and cgroup are the task's, also the process group signals go to:
    /// the task's main process (`raw_exec`), the init of its PID namespace (`exec`).
    fn pid(&self) -> u32;
    /// Waits for the task to end (cancel-safe; may be called again after it returned).
    async fn wait(&mut self) -> ExitStatus;
    /// Sends a signal to the task's whole process group.
    fn signal(&self, sig: Signal) -> Result<(), DriverError>;
    /// Resource usage from the task's cgroup; None for unisolated tasks.
    fn stats(&self) -> Option<crate::isolation::cgroups::Stats> {
        None
    }
    /// The task's processes (host pids): its cgroup's, or its process group's for unisolated
    /// tasks (found by scanning /proc; only asked for tasks with real GPUs).
    fn pids(&self) -> Vec<u32> {
        process_group_members(self.pid())
    }
    /// Why the task ended, beyond its status, once it ended: a trap or a limit (`wasm`).
    fn exit_reason(&self) -> Option<String> {
        None
    }
}

/// The processes whose process group is `pgid` (field 5 of /proc/<pid>/stat).
pub fn process_group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![pgid] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_string)))
                .and_then(|g| g.parse::<u32>().ok())
                == Some(pgid)
        })
        .collect()
}

/// Sends `sig` to what is left of a task's process group `pgid`, whose leader (started at
/// `leader_start`, clock ticks since boot) may have ended, unless that pid is now another
/// process's. Pids wrap (at 32,768 by default), and a group's number stays taken only while the
/// group has members: a live process with the leader's pid and another start time means the
/// task's group is gone, and the number may now lead another task's group, which a kill would
/// take down. An ended leader whose number is free is signalled: its group may still have
/// members.
pub fn signal_leftover_group(pgid: u32, leader_start: u64, sig: Signal) -> Result<(), DriverError> {
    if proc_start_time(pgid).is_some_and(|t| t != leader_start) {
        return Ok(());
    }
    signal_group(pgid, sig)
}

/// Sends `sig` to process group `pgid`; a group that no longer exists is not an error.
pub fn signal_group(pgid: u32, sig: Signal) -> Result<(), DriverError> {
    let Ok(raw) = i32::try_from(pgid) else {
        return Ok(());
    };
    if raw <= 1 {
        return Ok(());
    }
    match kill(Pid::from_raw(-raw), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(DriverError::Signal { pgid, source }),
    }
}

/// The start time of a process (field 22 of /proc/<pid>/stat, clock ticks since boot), used to
/// recognise a pid after an agent restart.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_time(&stat)
}

/// Parses field 22 (starttime) out of a /proc/<pid>/stat line.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    // comm (field 2) may contain spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Drivers by name, for the enabled names, with the default isolation settings.
pub fn drivers_for(enabled: &[String]) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    drivers_with(enabled, &IsolationSettings::default())
}

/// Drivers by name, for the enabled names; `exec` isolates with `settings` (and the default
/// GPU settings).
pub fn drivers_with(enabled: &[String], settings: &IsolationSettings) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    drivers_with_gpu(enabled, settings, &crate::gpu::GpuSettings::default())
}

/// Drivers by name, for the enabled names; `exec` isolates with `settings` and exposes real
/// GPUs as `gpu` says; `wasm` compiles every start (no module cache).
pub fn drivers_with_gpu(
    enabled: &[String],
    settings: &IsolationSettings,
    gpu: &crate::gpu::GpuSettings,
) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    drivers_in(enabled, settings, gpu, None)
}

/// Drivers by name, for the enabled names; `exec` isolates with `settings` and exposes real
/// GPUs as `gpu` says; `wasm` caches compiled modules in `wasm_cache` (the agent's
/// `<data_dir>/wasm-cache`). Starts the supervisor zygote ([`zygote`]) when `exec` or
/// `raw_exec` is enabled.
pub fn drivers_in(
    enabled: &[String],
    settings: &IsolationSettings,
    gpu: &crate::gpu::GpuSettings,
    wasm_cache: Option<&Path>,
) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    drivers_with_images(enabled, settings, gpu, wasm_cache, None)
}

/// [`drivers_in`], with `oci` taking its images from `images` (the agent's
/// `<data_dir>/oci`); without a store `oci` is not offered. `oci` shares `exec`'s driver
/// (one CPU allocator for both).
pub fn drivers_with_images(
    enabled: &[String],
    settings: &IsolationSettings,
    gpu: &crate::gpu::GpuSettings,
    wasm_cache: Option<&Path>,
    images: Option<std::sync::Arc<crate::image::ImageStore>>,
) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    let mut out: BTreeMap<String, std::sync::Arc<dyn Driver>> = BTreeMap::new();
    let mut exec: Option<std::sync::Arc<ExecDriver>> = None;
    let mut exec_driver = || exec.get_or_insert_with(|| std::sync::Arc::new(ExecDriver::with_gpu(settings.clone(), gpu.clone()))).clone();
    for name in enabled {
        match name.as_str() {
            driver_names::EXEC => {
                out.insert(name.clone(), exec_driver());
            }
            driver_names::OCI => match &images {
                Some(store) => {
                    out.insert(name.clone(), std::sync::Arc::new(OciDriver::new(exec_driver(), store.clone())));
                }
                None => tracing::warn!("the oci driver needs an image store; not offered"),
            },
            driver_names::RAW_EXEC => {
                out.insert(name.clone(), std::sync::Arc::new(ProcessDriver::with_supervisor(settings.supervisor_exe.clone())));
            }
            driver_names::WASM => match WasmDriver::new(wasm_cache.map(Path::to_path_buf)) {
                Ok(d) => {
                    out.insert(name.clone(), std::sync::Arc::new(d));
                }
                Err(e) => tracing::warn!(error = %e, "the wasm driver cannot start; not offered"),
            },
            other => tracing::warn!(driver = other, "unknown driver in config; ignored"),
        }
    }
    // Both process drivers start supervisors through the zygote: started now, off the first start.
    if out.keys().any(|d| d == driver_names::EXEC || d == driver_names::RAW_EXEC || d == driver_names::OCI) {
        if let Ok(exe) = supervised::supervisor_exe(settings.supervisor_exe.as_deref()) {
            zygote::prestart(&exe);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Starting tasks needs a supervisor binary: see agent/tests/supervisor.rs.

    #[test]
    fn stat_start_time() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615";
        assert_eq!(parse_stat_start_time(line), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
        let me = std::process::id();
        assert!(proc_start_time(me).is_some());
    }

    #[test]
    fn a_leftover_group_is_killed_only_while_its_leader_pid_is_not_someone_elses() {
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("sleep").arg("30").process_group(0).spawn().expect("spawn sleep");
        let pid = leader.id();
        let start = proc_start_time(pid).expect("start time");
        // The pid now names another process (a different start time): left alone.
        signal_leftover_group(pid, start + 1, Signal::SIGKILL).expect("signal");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(leader.try_wait().expect("try_wait").is_none(), "a group that is not the task's was killed");
        // The task's own leader: killed.
        signal_leftover_group(pid, start, Signal::SIGKILL).expect("signal");
        let status = leader.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        // Gone altogether: nothing to signal, no error.
        signal_leftover_group(pid, start, Signal::SIGKILL).expect("signal a group that is gone");
    }
}
