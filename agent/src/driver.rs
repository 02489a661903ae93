//! Task drivers: the [`Driver`] trait that starts a task's process and the [`TaskHandle`] that
//! waits for and signals it.
//!
//! `raw_exec` is [`ProcessDriver`]: the child runs in its own session/process group
//! (`setsid`), stdin is /dev/null, and stdout/stderr are piped into size-rotated log files.
//! `exec` is [`crate::isolation::exec::ExecDriver`]: the same contract, with namespaces, a task
//! root, an unprivileged user and a cgroup.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use mlp_proto::v1::Resources;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::isolation::exec::ExecDriver;
use crate::isolation::IsolationSettings;
use crate::logs::{log_base, RotatingWriter};

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
}

/// A running task.
#[async_trait]
pub trait TaskHandle: Send {
    /// Pid of the task's main process (also its process group id).
    fn pid(&self) -> u32;
    /// Waits for the task to end (cancel-safe; may be called again after it returned).
    async fn wait(&mut self) -> ExitStatus;
    /// Sends a signal to the task's whole process group.
    fn signal(&self, sig: Signal) -> Result<(), DriverError>;
    /// Resource usage from the task's cgroup; None for unisolated tasks.
    fn stats(&self) -> Option<crate::cgroups::Stats> {
        None
    }
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

/// The process driver behind `exec` and `raw_exec`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessDriver {
    name: &'static str,
}

impl ProcessDriver {
    /// The `raw_exec` driver (never isolated).
    pub fn raw_exec() -> Self {
        ProcessDriver {
            name: driver_names::RAW_EXEC,
        }
    }
}

/// Drivers by name, for the enabled names, with the default isolation settings.
pub fn drivers_for(enabled: &[String]) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    drivers_with(enabled, &IsolationSettings::default())
}

/// Drivers by name, for the enabled names; `exec` isolates with `settings`.
pub fn drivers_with(
    enabled: &[String],
    settings: &IsolationSettings,
) -> BTreeMap<String, std::sync::Arc<dyn Driver>> {
    let mut out: BTreeMap<String, std::sync::Arc<dyn Driver>> = BTreeMap::new();
    for name in enabled {
        match name.as_str() {
            driver_names::EXEC => {
                out.insert(
                    name.clone(),
                    std::sync::Arc::new(ExecDriver::new(settings.clone())),
                );
            }
            driver_names::RAW_EXEC => {
                out.insert(name.clone(), std::sync::Arc::new(ProcessDriver::raw_exec()));
            }
            other => tracing::warn!(driver = other, "unknown driver in config; ignored"),
        }
    }
    out
}

/// Copies a task's output into its log file until EOF.
pub(crate) fn pump<R: AsyncRead + Unpin + Send + 'static>(
    mut reader: R,
    mut writer: RotatingWriter,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = writer.write_all(&buf[..n]) {
                        tracing::warn!(error = %e, "writing task log failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading task output failed");
                    break;
                }
            }
        }
    })
}

/// The task's stdout and stderr writers (size-rotated files in the task's log dir), shared by
/// every driver so that the Logs RPC finds the same files whichever driver ran the task.
pub(crate) fn open_log_writers(spec: &TaskSpec) -> Result<(RotatingWriter, RotatingWriter), DriverError> {
    let open = |stderr| {
        RotatingWriter::open(&spec.log_dir, &log_base(&spec.name, stderr), spec.log_max_file_bytes, spec.log_max_files)
            .map_err(|source| DriverError::Logs { dir: spec.log_dir.clone(), source })
    };
    Ok((open(false)?, open(true)?))
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        let (out_w, err_w) = open_log_writers(spec)?;

        let mut cmd = tokio::process::Command::new(&spec.command);
        cmd.args(&spec.args)
            .envs(&spec.env)
            .current_dir(&spec.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            command: spec.command.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, out_w));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, err_w));
        }
        tracing::debug!(task = %spec.name, pid, driver = self.name, "task process started");
        Ok(Box::new(ProcessHandle {
            child,
            pid,
            pumps,
            exit: None,
        }))
    }
}

/// A process started by [`ProcessDriver`].
struct ProcessHandle {
    child: tokio::process::Child,
    pid: u32,
    pumps: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

/// Waits for a task's main process and then kills whatever is left of its process group (no
/// process of a task may outlive it). Cancel-safe up to the wait: nothing happens after an await.
pub(crate) async fn wait_and_reap_group(child: &mut tokio::process::Child, pid: u32) -> ExitStatus {
    let status = match child.wait().await {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            ExitStatus { code: st.code(), signal: st.signal(), oom_limit_mib: None }
        }
        Err(e) => {
            tracing::warn!(pid, error = %e, "waiting for task failed");
            ExitStatus::default()
        }
    };
    if let Err(e) = signal_group(pid, Signal::SIGKILL) {
        tracing::warn!(pid, error = %e, "killing leftover processes failed");
    }
    status
}

/// Drains the log pipes of an ended task (bounded: a process that escaped the group may hold
/// them open) and forgets the finished pumps.
pub(crate) async fn drain_pumps(pumps: &mut Vec<tokio::task::JoinHandle<()>>) {
    for p in pumps.iter_mut() {
        if !p.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
        }
    }
    pumps.retain(|p| !p.is_finished());
}

#[async_trait]
impl TaskHandle for ProcessHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            self.exit = Some(wait_and_reap_group(&mut self.child, self.pid).await);
        }
        drain_pumps(&mut self.pumps).await;
        self.exit.unwrap_or_default()
    }

    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        if self.exit.is_some() {
            return Ok(());
        }
        signal_group(self.pid, sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogReader;
    use std::time::Instant;

    fn spec(dir: &std::path::Path, cmd: &str, args: &[&str]) -> TaskSpec {
        let local = dir.join("local");
        let logs = dir.join("logs");
        let _ = std::fs::create_dir_all(&local);
        let _ = std::fs::create_dir_all(&logs);
        TaskSpec {
            name: "t".into(),
            command: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            work_dir: local,
            log_dir: logs,
            log_max_file_bytes: 1 << 20,
            log_max_files: 3,
            ..Default::default()
        }
    }

    /// Kills a process group when dropped, so a failing test leaves nothing behind.
    struct GroupGuard(u32);
    impl Drop for GroupGuard {
        fn drop(&mut self) {
            let _ = signal_group(self.0, Signal::SIGKILL);
        }
    }

    fn alive(pid: i32) -> bool {
        // A zombie still answers kill(0); look at /proc state too.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => {
                let state = s
                    .rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_string));
                state.as_deref() != Some("Z")
            }
            Err(_) => false,
        }
    }

    fn group_members(pgid: u32) -> Vec<i32> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    if let Some(i) = s.rfind(')') {
                        let f: Vec<&str> = s[i + 1..].split_whitespace().collect();
                        // fields after ')' : state(3) ppid(4) pgrp(5)
                        if f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
                            && f.first() != Some(&"Z")
                        {
                            out.push(pid);
                        }
                    }
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn exit_code_and_logs() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = spec(
            dir.path(),
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 3"],
        );
        let mut h = ProcessDriver::raw_exec().start(&s).await?;
        let _g = GroupGuard(h.pid());
        let st = tokio::time::timeout(Duration::from_secs(10), h.wait()).await?;
        assert_eq!(st.code, Some(3));
        assert!(!st.success());
        let out = LogReader::new(&s.log_dir, "t.stdout", 0, 0)?.read_to_end()?;
        let err = LogReader::new(&s.log_dir, "t.stderr", 0, 0)?.read_to_end()?;
        assert_eq!(String::from_utf8_lossy(&out), "out\n");
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        assert!(s.log_dir.join("t.stdout.0").exists());
        Ok(())
    }

    #[tokio::test]
    async fn process_tree_is_killed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = spec(
            dir.path(),
            "/bin/sh",
            &[
                "-c",
                "sleep 100 & sleep 100 & trap '' TERM; echo ready; wait",
            ],
        );
        let mut h = ProcessDriver::raw_exec().start(&s).await?;
        let pgid = h.pid();
        let _g = GroupGuard(pgid);
        // Wait until the shell set its trap and both sleeps run.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = LogReader::new(&s.log_dir, "t.stdout", 0, 0)?.read_to_end()?;
            if out.starts_with(b"ready") && group_members(pgid).len() >= 3 {
                break;
            }
            assert!(Instant::now() < deadline, "task did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let members = group_members(pgid);
        assert!(members.len() >= 3, "members {members:?}");
        // The same sequence the task runner uses: SIGTERM, SIGKILL after the kill timeout.
        h.signal(Signal::SIGTERM)?;
        let st = match tokio::time::timeout(Duration::from_millis(300), h.wait()).await {
            Ok(st) => st,
            Err(_) => {
                h.signal(Signal::SIGKILL)?;
                tokio::time::timeout(Duration::from_secs(10), h.wait()).await?
            }
        };
        assert!(st.code.is_some() || st.signal.is_some());
        let deadline = Instant::now() + Duration::from_secs(5);
        while members.iter().any(|p| alive(*p)) {
            assert!(Instant::now() < deadline, "processes left: {members:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(group_members(pgid).is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn missing_binary_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = spec(dir.path(), "/nonexistent/definitely-not-here", &[]);
        match ProcessDriver::raw_exec().start(&s).await {
            Err(DriverError::Spawn { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("started a missing binary"),
        }
        Ok(())
    }

    #[test]
    fn stat_start_time() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615";
        assert_eq!(parse_stat_start_time(line), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
        let me = std::process::id();
        assert!(proc_start_time(me).is_some());
    }
}
