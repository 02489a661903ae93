//! The agent's side of a task's supervisor, shared by both drivers: the files and pipes the
//! agent and the supervisor process (`crate::task::supervisor`, forked by the agent's zygote,
//! `crate::driver::zygote`) agree on, [`start`] which launches one and waits for its start
//! report, and [`reattach`] which finds a running one again after an agent restart.
//! [`Supervised`] waits for the supervisor and reads how the task ended.
//!
//! The agent learns the outcome of the start on fd 3, a pipe: `taken` once a supervisor took
//! the request (a request without it started nothing and is sent again once), then
//! `ok <pid> [phase=<ns> ...]` (the task's pid for `raw_exec`, the init's host pid for `exec`;
//! then when each phase of the start ended, see [`Phases`]) or `err <message>`. Signals go from
//! the agent straight to the task's process group (verified by pid and start time); waiting is
//! on the supervisor process (a pidfd, after a start as after a reattach), after which the
//! agent reads `exit.json`.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::{proc_start_time, signal_group, signal_leftover_group, DriverError, ExitStatus, TaskSpec};
use crate::isolation::phases::Phases;
use crate::isolation::InitConfig;

/// The first argument that makes `mlp` run as a task's supervisor instead of the CLI.
pub const SUPERVISE_ARG: &str = "__mlp-supervise";
/// The supervisor's configuration, written by the agent into the task dir.
pub const CONFIG_FILE: &str = "supervise.json";
/// What the agent runs in a task dir (written at start, read at reattach).
pub const RECORD_FILE: &str = "run.json";
/// How the task ended, written by the supervisor.
pub const EXIT_FILE: &str = "exit.json";
/// The supervisor's own diagnostics (its stderr).
pub const LOG_FILE: &str = "supervisor.log";
/// The fd the agent passes the start-status pipe on.
pub(crate) const STATUS_FD: i32 = 3;
/// The fd the agent passes the cgroup-ready pipe on (`SuperviseConfig::wait_ready`).
pub(crate) const READY_FD: i32 = 4;
/// How long the supervisor may take to report that the task started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the supervisor runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskKind {
    /// An unisolated process (`raw_exec`).
    Raw {
        /// Command (a path, or a name looked up in PATH).
        command: String,
        /// Arguments.
        args: Vec<String>,
        /// The whole environment.
        env: BTreeMap<String, String>,
        /// Working directory.
        work_dir: PathBuf,
        /// A network namespace the supervisor joins before it starts the task (the task of a
        /// bridge-mode allocation).
        #[serde(default)]
        netns: Option<PathBuf>,
    },
    /// An isolated task (`exec`): the init's configuration.
    Isolated(Box<InitConfig>),
}

/// The supervisor's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuperviseConfig {
    /// Identifies this run of the task (matches the record and the exit file).
    pub run_id: String,
    /// Driver name (for the record).
    pub driver: String,
    /// The task's cgroup name under `mlp/` (for the record), empty for none.
    pub cgroup: String,
    /// The task's memory limit (for the record).
    pub memory_limit_mib: Option<u64>,
    /// The task's directory (exit file).
    pub task_dir: PathBuf,
    /// Log directory.
    pub log_dir: PathBuf,
    /// Task name (log file prefix).
    pub log_name: String,
    /// Rotate a log file at this size.
    pub log_max_file_bytes: u64,
    /// Log files kept per stream.
    pub log_max_files: u32,
    /// What to run.
    pub task: TaskKind,
    /// Wait for `ready` on fd 4 before starting the task (the agent creates the task's cgroup
    /// while the supervisor starts); EOF without it fails the start.
    #[serde(default)]
    pub wait_ready: bool,
}

/// What runs in a task dir (`<task dir>/run.json`), written by the supervisor before it reports
/// the start (so a run is never unrecorded, even when the agent dies during the start) and read
/// by the agent to reattach to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskRecord {
    /// Driver name.
    pub driver: String,
    /// Identifies this run (also in the exit file).
    pub run_id: String,
    /// The supervisor's pid.
    pub supervisor_pid: u32,
    /// Its start time (field 22 of /proc/<pid>/stat).
    pub supervisor_start_time: u64,
    /// The task's pid (`raw_exec`: the task, `exec`: the namespace's init), also the process
    /// group the agent signals.
    pub pid: u32,
    /// Its start time.
    pub start_time: u64,
    /// The task's cgroup name under `mlp/` (`exec`), empty for none.
    pub cgroup: String,
    /// The task's memory limit, to report an OOM kill.
    pub memory_limit_mib: Option<u64>,
}

/// How the task ended, as the supervisor saw it (`<task dir>/exit.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExitRecord {
    /// The run it belongs to.
    pub run_id: String,
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        // No fsync: the files only need to survive the agent's death, not the machine's (the
        // tasks would not survive that either).
        f.write_all(data)?;
    }
    std::fs::rename(&tmp, path)
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes the task record atomically.
pub fn save_record(task_dir: &Path, record: &TaskRecord) -> std::io::Result<()> {
    let data = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    write_atomic(&task_dir.join(RECORD_FILE), &data)
}

/// Reads a task record; None when there is none (or it was retired: an empty file).
pub fn load_record(task_dir: &Path) -> std::io::Result<Option<TaskRecord>> {
    let path = task_dir.join(RECORD_FILE);
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == 0 => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    match read_json(&path) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Retires a finished run whose end was consumed: its record is emptied in place, so no later
/// agent run reattaches to it, and its exit file and config stay until the next start of the
/// task (which removes them) or the allocation's garbage collection. Emptied rather than
/// removed: a one-shot task then frees no inode before its allocation is collected (see
/// `alloc::state` for why inode churn matters on the build machine's ext4).
pub fn retire_run_files(task_dir: &Path) {
    let path = task_dir.join(RECORD_FILE);
    match std::fs::OpenOptions::new().write(true).truncate(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Emptying failed: removing it retires it as well.
        Err(_) => remove_run_files(task_dir),
    }
}

/// Reads the exit file of `run_id`; None when there is none (or it belongs to another run).
pub fn load_exit(task_dir: &Path, run_id: &str) -> Option<ExitRecord> {
    let r: ExitRecord = read_json(&task_dir.join(EXIT_FILE)).ok()?;
    (r.run_id == run_id).then_some(r)
}

/// Forgets a finished run: its record, exit file and supervisor config.
pub fn remove_run_files(task_dir: &Path) {
    for f in [RECORD_FILE, EXIT_FILE, CONFIG_FILE] {
        let _ = std::fs::remove_file(task_dir.join(f));
    }
}

/// A fresh run id.
fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}-{:x}", std::process::id())
}

/// The supervisor binary: the agent's own unless configured (library tests use a helper).
///
/// The agent's own is `/proc/self/exe`, not the path it was started from: when the `mlp` binary
/// on disk is replaced under a running agent (an upgrade), the path names the new binary or
/// nothing (`… (deleted)`), while a supervisor must be the agent's own version, and a zygote
/// that died must still be restartable.
pub fn supervisor_exe(configured: Option<&Path>) -> Result<PathBuf, DriverError> {
    const SELF_EXE: &str = "/proc/self/exe";
    match configured {
        Some(p) => Ok(p.to_path_buf()),
        None if Path::new(SELF_EXE).exists() => Ok(PathBuf::from(SELF_EXE)),
        None => std::env::current_exe().map_err(|e| DriverError::Isolation(format!("finding the mlp binary: {e}"))),
    }
}

/// How the agent waits for a supervisor.
enum Waiter {
    /// A pidfd, readable once it exited (the supervisor is the zygote's child, not the
    /// agent's, after a start as after a reattach).
    Pidfd(AsyncFd<OwnedFd>),
    /// It already exited.
    Done,
}

/// A task run by a supervisor, as the agent sees it: waits for the supervisor, then reads the
/// exit file. Shared by both drivers.
pub(crate) struct Supervised {
    /// What runs.
    pub record: TaskRecord,
    task_dir: PathBuf,
    waiter: Waiter,
    exit: Option<ExitStatus>,
}

impl Supervised {
    /// Waits for the supervisor to end and returns the task's status (cancel-safe: only the
    /// wait itself awaits). An exit the supervisor could not record (it was killed) is an
    /// unknown status, and whatever is left of the task's group is killed.
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(ex) = self.exit {
            return ex;
        }
        match &mut self.waiter {
            Waiter::Pidfd(fd) => match fd.readable().await {
                // A pidfd stays readable once the process exited.
                Ok(mut guard) => guard.retain_ready(),
                Err(e) => {
                    tracing::warn!(pid = self.record.supervisor_pid, error = %e, "polling the supervisor's pidfd failed");
                }
            },
            Waiter::Done => {}
        }
        self.waiter = Waiter::Done;
        let ex = match load_exit(&self.task_dir, &self.record.run_id) {
            Some(r) => ExitStatus { code: r.code, signal: r.signal, oom_limit_mib: None },
            None => {
                tracing::warn!(dir = %self.task_dir.display(), "the task's supervisor ended without recording an exit status");
                if let Err(e) = signal_leftover_group(self.record.pid, self.record.start_time, Signal::SIGKILL) {
                    tracing::warn!(pid = self.record.pid, error = %e, "killing leftover processes failed");
                }
                ExitStatus::default()
            }
        };
        self.exit = Some(ex);
        ex
    }

    /// Whether the task's status is known.
    pub fn exited(&self) -> bool {
        self.exit.is_some()
    }

    /// Sends a signal to the task's process group while it runs.
    pub fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        if self.exit.is_some() || proc_start_time(self.record.pid) != Some(self.record.start_time) {
            // Ended (or its pid belongs to someone else now): nothing to signal.
            return Ok(());
        }
        signal_group(self.record.pid, sig)
    }

    /// Forgets the run once its end was consumed: see [`retire_run_files`].
    pub fn forget(&self) {
        retire_run_files(&self.task_dir);
    }
}

/// How a start is timed and synchronized.
pub(crate) struct StartWith {
    /// The start's phases so far (the driver's).
    pub phases: Phases,
    /// `exec`: the read end of the cgroup-ready pipe (see `SuperviseConfig::wait_ready`).
    pub ready: Option<OwnedFd>,
}

/// Starts a supervisor for `spec` running `task`; returns once the task runs (or failed to).
pub(crate) async fn start(
    exe: &Path,
    driver: &str,
    spec: &TaskSpec,
    task: TaskKind,
    cgroup: String,
    memory_limit_mib: Option<u64>,
    how: StartWith,
) -> Result<Supervised, DriverError> {
    let StartWith { mut phases, ready } = how;
    let task_dir = spec.task_dir.clone();
    std::fs::create_dir_all(&task_dir).map_err(|e| DriverError::Isolation(format!("creating {}: {e}", task_dir.display())))?;
    remove_run_files(&task_dir);
    let run_id = new_run_id();
    let config = SuperviseConfig {
        run_id: run_id.clone(),
        driver: driver.to_string(),
        cgroup,
        memory_limit_mib,
        task_dir: task_dir.clone(),
        log_dir: spec.log_dir.clone(),
        log_name: spec.name.clone(),
        log_max_file_bytes: spec.log_max_file_bytes,
        log_max_files: spec.log_max_files,
        task,
        wait_ready: ready.is_some(),
    };
    let config_path = task_dir.join(CONFIG_FILE);
    let json = serde_json::to_vec(&config).map_err(|e| DriverError::Isolation(format!("encoding the supervisor config: {e}")))?;
    write_atomic(&config_path, &json).map_err(|e| DriverError::Isolation(format!("writing {}: {e}", config_path.display())))?;
    phases.mark("config_written");
    // A request that no supervisor took (it reached a spare that the zygote's death was
    // killing: see `zygote::TAKEN`) started nothing and is sent once more, to a new zygote.
    let mut started = String::new();
    for attempt in 1..=2 {
        let text = request_start(exe, &task_dir, &config_path, ready.as_ref(), &mut phases).await?;
        if text.is_empty() && attempt < 2 {
            tracing::warn!(dir = %task_dir.display(), "no supervisor took the start request (the zygote died); sending it again");
            continue;
        }
        let text = text.trim_start();
        started = text.strip_prefix(super::zygote::TAKEN).unwrap_or(text).trim().to_string();
        break;
    }
    drop(ready);
    let started = started.as_str();
    let mut ok = started.strip_prefix("ok ").map(str::split_whitespace);
    let pid = ok.as_mut().and_then(|words| words.next()).and_then(|p| p.parse::<u32>().ok());
    if let Some(words) = ok {
        phases.extend(&words.collect::<Vec<_>>().join(" "));
        phases.mark("started");
        tracing::debug!(
            alloc = %spec.alloc_id,
            task = %spec.name,
            driver,
            phases = %phases.describe(),
            at = %phases.words().trim_start(),
            "task start phases"
        );
    }
    let Some(pid) = pid else {
        let message = started.strip_prefix("err ").unwrap_or("the task's supervisor exited without a status").to_string();
        // The supervisor exits after reporting an error (the zygote's children are reaped by
        // the kernel); one that reported nothing in time is killed if its record names it.
        if let Ok(Some(r)) = load_record(&task_dir) {
            if r.run_id == run_id && r.supervisor_pid > 1 && proc_start_time(r.supervisor_pid) == Some(r.supervisor_start_time) {
                if let Ok(raw) = i32::try_from(r.supervisor_pid) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
        }
        remove_run_files(&task_dir);
        if let Some(source) = spawn_error(&message) {
            return Err(DriverError::Spawn { command: spec.command.clone(), source });
        }
        return Err(DriverError::Isolation(message));
    };
    let record = match load_record(&task_dir) {
        Ok(Some(r)) if r.run_id == run_id && r.pid == pid => r,
        other => {
            // The supervisor writes the record before it reports a start.
            tracing::warn!(dir = %task_dir.display(), record = ?other, "the supervisor's run record is missing");
            TaskRecord { driver: driver.to_string(), run_id, pid, start_time: proc_start_time(pid).unwrap_or(0), ..Default::default() }
        }
    };
    // The supervisor is not the agent's child: it is waited on through a pidfd, as after a
    // reattach (one that already ended left its exit file, or is reported as lost by `wait`).
    let waiter = match pidfd_of(record.supervisor_pid, record.supervisor_start_time) {
        Some(fd) => {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until the
            // AsyncFd is dropped.
            match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                Ok(registered) => Waiter::Pidfd(registered),
                Err(e) => {
                    // Unwatchable: the start fails, and takes the task with it.
                    let _ = signal_group(record.pid, Signal::SIGKILL);
                    return Err(DriverError::Isolation(format!("watching the supervisor: {e}")));
                }
            }
        }
        None => Waiter::Done,
    };
    Ok(Supervised { record, task_dir, waiter, exit: None })
}

/// Sends one start request to the zygote and reads the status pipe to its end: the status text
/// (empty when nothing was written), or an `err` line of its own when reading failed or timed out.
async fn request_start(
    exe: &Path,
    task_dir: &Path,
    config_path: &Path,
    ready: Option<&OwnedFd>,
    phases: &mut Phases,
) -> Result<String, DriverError> {
    let diag = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(task_dir.join(LOG_FILE))
        .map_err(|source| DriverError::Logs { dir: task_dir.to_path_buf(), source })?;
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| DriverError::Isolation(format!("pipe: {e}")))?;
    // The agent's zygote forks the supervisor (fd 3: status_w, fd 4: ready, stderr: diag).
    super::zygote::launch(exe, config_path, status_w.as_fd(), diag.as_fd(), ready.map(|r| r.as_fd()))?;
    drop(status_w);
    drop(diag);
    phases.mark("supervisor_spawned");
    // Read on the runtime (no blocking-thread round trip): the pipe until EOF.
    let read = async move {
        use tokio::io::AsyncReadExt;
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)?;
        let mut text = String::new();
        pipe.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    Ok(match tokio::time::timeout(START_TIMEOUT, read).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("err reading the start status: {e}"),
        Err(_) => format!("err the task did not start within {START_TIMEOUT:?}"),
    })
}

/// `raw_exec` start errors come back as `err spawn <errno> <message>`: the same
/// [`DriverError::Spawn`] as an in-process spawn (a missing binary is `NotFound`).
fn spawn_error(message: &str) -> Option<std::io::Error> {
    let rest = message.strip_prefix("spawn ")?;
    let (code, _) = rest.split_once(' ')?;
    Some(std::io::Error::from_raw_os_error(code.parse().ok()?))
}

/// Opens a pidfd for `pid` if it is still the process that started at `start_time`.
fn pidfd_of(pid: u32, start_time: u64) -> Option<OwnedFd> {
    let raw = i32::try_from(pid).ok().filter(|p| *p > 1)?;
    if proc_start_time(pid) != Some(start_time) || is_zombie(pid) {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The pid may have been reused between the check and the open: check again.
    (proc_start_time(pid) == Some(start_time)).then_some(fd)
}

/// Whether `pid` has exited and waits to be reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .is_some_and(|s| s.rfind(')').is_some_and(|i| s[i + 1..].trim_start().starts_with(['Z', 'X'])))
}

/// Why a task could not be reattached.
#[derive(Debug, thiserror::Error)]
pub enum ReattachError {
    /// Neither a live supervisor nor a recorded exit.
    #[error("the task's supervisor is gone and recorded no exit status")]
    Lost,
    /// The pidfd could not be registered with the runtime.
    #[error("watching the supervisor: {0}")]
    Watch(std::io::Error),
}

/// Reattaches to the run recorded in `task_dir`: a live supervisor (same pid and start time)
/// is watched through a pidfd; a supervisor that ended while the agent was down left its
/// exit file, which the handle reports at once. Anything else is lost: its leftovers are
/// killed and an error returned.
pub(crate) fn reattach(task_dir: &Path, record: &TaskRecord) -> Result<Supervised, ReattachError> {
    let waiter = match pidfd_of(record.supervisor_pid, record.supervisor_start_time) {
        Some(fd) => {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until the
            // AsyncFd is dropped.
            let registered = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            Waiter::Pidfd(registered.map_err(|e| ReattachError::Watch(std::io::Error::other(e.to_string())))?)
        }
        None if load_exit(task_dir, &record.run_id).is_some() => Waiter::Done,
        None => {
            if record.pid > 1 && proc_start_time(record.pid) == Some(record.start_time) {
                let _ = signal_group(record.pid, Signal::SIGKILL);
            }
            return Err(ReattachError::Lost);
        }
    };
    Ok(Supervised { record: record.clone(), task_dir: task_dir.to_path_buf(), waiter, exit: None })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_stale_exits_are_ignored() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(load_record(dir.path())?, None);
        let r = TaskRecord { driver: "raw_exec".into(), run_id: "r1".into(), pid: 5, ..Default::default() };
        save_record(dir.path(), &r)?;
        assert_eq!(load_record(dir.path())?, Some(r));
        let exit = ExitRecord { run_id: "r0".into(), code: Some(3), signal: None };
        write_atomic(&dir.path().join(EXIT_FILE), &serde_json::to_vec(&exit)?)?;
        assert_eq!(load_exit(dir.path(), "r1"), None, "an exit of an earlier run");
        assert_eq!(load_exit(dir.path(), "r0"), Some(exit));
        remove_run_files(dir.path());
        assert_eq!(load_record(dir.path())?, None);
        assert!(!dir.path().join(EXIT_FILE).exists());
        Ok(())
    }

    #[test]
    fn a_retired_run_is_not_a_record_and_frees_no_inode() -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir()?;
        let r = TaskRecord { driver: "exec".into(), run_id: "r1".into(), pid: 5, ..Default::default() };
        save_record(dir.path(), &r)?;
        let ino = std::fs::metadata(dir.path().join(RECORD_FILE))?.ino();
        retire_run_files(dir.path());
        assert_eq!(load_record(dir.path())?, None, "a retired run is never reattached");
        assert_eq!(std::fs::metadata(dir.path().join(RECORD_FILE))?.ino(), ino, "emptied in place");
        // Retiring twice, or where there is nothing, is harmless.
        retire_run_files(dir.path());
        retire_run_files(&dir.path().join("nope"));
        // The next run writes a record again.
        save_record(dir.path(), &r)?;
        assert_eq!(load_record(dir.path())?, Some(r));
        Ok(())
    }

    #[test]
    fn spawn_errors_keep_their_errno() {
        let e = spawn_error("spawn 2 starting \"/nope\": No such file or directory (os error 2)");
        assert_eq!(e.map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
        assert!(spawn_error("mount failed").is_none());
    }
}
