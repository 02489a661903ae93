//! `mlp alloc exec`: a command run inside a running task, its stdin/stdout/stderr (or a
//! pseudo-terminal) streamed over the `ClientService.Exec` RPC.
//!
//! The agent never enters a task's namespaces itself (it is multi-threaded, and `setns` into a
//! mount namespace needs a single-threaded process): it runs its own binary as
//! `mlp __mlp-exec-enter` (the *enter helper*, [`maybe_run_enter`]), a fresh single-threaded
//! process that gets an [`EnterConfig`] as JSON on fd 3 and reports on fd 4. The helper:
//!
//! * for an `exec` task: opens the namespaces of the task's init (`/proc/<init>/ns/*`) and its
//!   root, joins the task's cgroup, `setns`es into its IPC, UTS, network, PID and mount
//!   namespaces and `chroot`s into the task's root;
//! * forks the command's process, which lands in the task's PID namespace: it starts its own
//!   session (with the pseudo-terminal as its controlling terminal in TTY mode), takes the
//!   task's user with the task's capability bounding set and `no_new_privs`, dies with the
//!   helper (`PR_SET_PDEATHSIG`), and execs the command in the task's working directory with
//!   the task's environment;
//! * waits for it, kills whatever is left of its process group, and exits the way it did.
//!
//! fd 4 is close-on-exec: the agent reads it to its end, and an empty report means the command
//! is running, `err <message>` that it could not be started. `SIGTERM` to the helper kills the
//! command's process group: that is how the agent ends a session whose client went away, or
//! whose task stopped.
//!
//! `raw_exec` tasks have no isolation to enter: the helper runs the command on the host, as the
//! agent's user (the task's), in the task's directory with the task's environment.
#![allow(unsafe_code)]
// Errors here are the RPC's own `tonic::Status` (large, but built once per failed call).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use mlp_proto::consts::{driver as driver_names, task_state};
use mlp_proto::v1::{ExecExit, ExecRequest, ExecResponse, ExecStart, TerminalSize};
use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::alloc::state::AllocRegistry;
use crate::isolation::{init::ROOT_CAPS, User};

/// The first argument that makes `mlp` run as an exec session's enter helper.
pub const ENTER_ARG: &str = "__mlp-exec-enter";
/// Most stdin bytes in one request message.
pub const MAX_STDIN_CHUNK: usize = 64 * 1024;
/// Most arguments (command included).
pub const MAX_ARGS: usize = 4096;
/// Most bytes of all arguments together.
pub const MAX_ARGV_BYTES: usize = 128 * 1024;
/// Largest terminal dimension accepted.
pub const MAX_TERMINAL_DIM: u32 = 10_000;
/// How long the client may take to send the first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the helper may take to report that the command started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a session checks that its task still runs.
const TASK_POLL: Duration = Duration::from_millis(250);
/// How long output is drained after the command ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read from the command's output at a time.
const READ_CHUNK: usize = 32 * 1024;

/// Where an `exec` task starts inside its root (see `driver::exec`); sessions start there.
const EXEC_WORK_DIR: &str = "/local";

/// fd the helper reads its config from.
const CONFIG_FD: i32 = 3;
/// fd the helper reports the start on.
const STATUS_FD: i32 = 4;

/// What the enter helper does, sent as JSON on fd 3.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnterConfig {
    /// Enter the namespaces and root of this process (the task's init); None = the host's.
    pub ns_pid: Option<u32>,
    /// `ns_pid`'s start time (field 22 of its stat): the helper enters nothing when the pid
    /// now names another process.
    pub ns_pid_start_time: u64,
    /// `cgroup.procs` files to join before forking the command.
    pub cgroup_procs: Vec<PathBuf>,
    /// Run as this user with the task's capability bounding set; None = keep the agent's.
    pub user: Option<User>,
    /// The command (a path, or a name looked up in `env`'s PATH).
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (inside the task's root when `ns_pid` is set).
    pub work_dir: PathBuf,
    /// stdin is a terminal that becomes the command's controlling terminal.
    pub tty: bool,
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, Status>> + Send>>;

// ---------------------------------------------------------------------------------------------
// Validation and the target task

/// Checks the first message of a session: a command, bounded argument sizes, a sane size.
pub fn validate_start(start: &ExecStart) -> Result<(), Status> {
    let Some(cmd) = start.command.first() else {
        return Err(Status::invalid_argument("exec: start.command is empty: name a command to run"));
    };
    if cmd.is_empty() {
        return Err(Status::invalid_argument("exec: start.command[0] is an empty string"));
    }
    if start.command.len() > MAX_ARGS {
        return Err(Status::invalid_argument(format!(
            "exec: start.command has {} arguments; at most {MAX_ARGS} are allowed",
            start.command.len()
        )));
    }
    let total: usize = start.command.iter().map(|a| a.len() + 1).sum();
    if total > MAX_ARGV_BYTES {
        return Err(Status::invalid_argument(format!("exec: start.command is {total} bytes; at most {MAX_ARGV_BYTES} are allowed")));
    }
    if let Some(i) = start.command.iter().position(|a| a.contains('\0')) {
        return Err(Status::invalid_argument(format!("exec: start.command[{i}] contains a NUL byte")));
    }
    if let Some(size) = &start.size {
        check_size(size, "start.size")?;
    }
    Ok(())
}

fn check_size(size: &TerminalSize, field: &str) -> Result<(), Status> {
    if size.rows > MAX_TERMINAL_DIM || size.cols > MAX_TERMINAL_DIM {
        return Err(Status::invalid_argument(format!(
            "exec: {field} {}x{} is larger than {MAX_TERMINAL_DIM}x{MAX_TERMINAL_DIM}",
            size.rows, size.cols
        )));
    }
    Ok(())
}

/// Checks a later message of a session.
fn validate_request(req: &ExecRequest, tty: bool) -> Result<(), Status> {
    if req.start.is_some() {
        return Err(Status::invalid_argument("exec: only the first message of a session may carry `start`"));
    }
    if req.stdin.len() > MAX_STDIN_CHUNK {
        return Err(Status::invalid_argument(format!(
            "exec: a stdin message of {} bytes is larger than {MAX_STDIN_CHUNK}",
            req.stdin.len()
        )));
    }
    if let Some(size) = &req.resize {
        if !tty {
            return Err(Status::invalid_argument("exec: resize is only valid in a tty session"));
        }
        check_size(size, "resize")?;
    }
    Ok(())
}

/// The running task a session runs in.
#[derive(Debug, Clone)]
struct Target {
    alloc_id: String,
    task: String,
    /// The task's pid as its runner reports it (for the "still running" check).
    task_pid: u32,
    config: EnterConfig,
}

fn not_running(alloc_id: &str, task: &str, state: &str) -> Status {
    Status::failed_precondition(format!(
        "task {task:?} of allocation {alloc_id} is not running (state {:?})",
        if state.is_empty() { "unknown" } else { state }
    ))
}

/// Whether the task still runs with the same process.
fn task_running(registry: &AllocRegistry, alloc_id: &str, task: &str, pid: u32) -> bool {
    registry.get(alloc_id).is_some_and(|v| v.task_states.get(task).is_some_and(|s| s.state == task_state::RUNNING && s.pid == pid))
}

fn target(registry: &AllocRegistry, start: &ExecStart) -> Result<Target, Status> {
    let (alloc_id, view, task) = crate::rpc::resolve_task(registry, &start.alloc_id, &start.task)?;
    let st = view.task_states.get(&task).cloned().unwrap_or_default();
    if st.state != task_state::RUNNING {
        return Err(not_running(&alloc_id, &task, &st.state));
    }
    let persisted = crate::alloc::state::load(&view.dir)
        .map_err(|e| Status::internal(format!("reading the state of allocation {alloc_id}: {e}")))?
        .and_then(|p| p.alloc)
        .ok_or_else(|| Status::internal(format!("allocation {alloc_id} has no saved spec")))?;
    let spec = persisted
        .job
        .as_ref()
        .and_then(|j| j.groups.iter().find(|g| g.name == persisted.task_group))
        .and_then(|g| g.tasks.iter().find(|t| t.name == task))
        .ok_or_else(|| Status::internal(format!("task {task:?} not in the spec of allocation {alloc_id}")))?;
    if spec.driver == driver_names::WASM {
        return Err(Status::failed_precondition(format!(
            "task {task:?} uses driver \"wasm\": its module runs inside the agent and has no process to enter"
        )));
    }
    if st.pid == 0 {
        return Err(not_running(&alloc_id, &task, &st.state));
    }
    let command = start.command.first().cloned().unwrap_or_default();
    let args = start.command.iter().skip(1).cloned().collect();
    let task_dir = view.dir.join(&task);
    let config = match spec.driver.as_str() {
        driver_names::EXEC => {
            // Everything comes from the running processes, not from files: the namespaces and
            // cgroup from the task's init, the user and environment from the task's process.
            let gone = || not_running(&alloc_id, &task, "process gone");
            let ns_pid = find_ns_init(st.pid).ok_or_else(gone)?;
            // Read first: what is read after it is known to be this process's when the helper
            // finds the same start time.
            let ns_pid_start_time = crate::driver::proc_start_time(ns_pid).ok_or_else(gone)?;
            let main = first_child(ns_pid).ok_or_else(gone)?;
            let (uid, gid) = proc_ids(main).ok_or_else(gone)?;
            let cgroup_procs = cgroup_procs_of(ns_pid);
            if cgroup_procs.is_empty() {
                return Err(Status::internal(format!("task {task:?} of allocation {alloc_id}: its cgroup was not found")));
            }
            EnterConfig {
                ns_pid: Some(ns_pid),
                ns_pid_start_time,
                cgroup_procs,
                user: Some(User { name: uid.to_string(), uid, gid, home: String::new() }),
                command,
                args,
                env: proc_environ(main).ok_or_else(gone)?,
                work_dir: PathBuf::from(EXEC_WORK_DIR),
                tty: start.tty,
            }
        }
        driver_names::RAW_EXEC => EnterConfig {
            ns_pid: None,
            ns_pid_start_time: 0,
            cgroup_procs: Vec::new(),
            user: None,
            command,
            args,
            env: proc_environ(st.pid).ok_or_else(|| not_running(&alloc_id, &task, "process gone"))?,
            work_dir: task_dir.join("local"),
            tty: start.tty,
        },
        other => return Err(Status::failed_precondition(format!("task {task:?} uses driver {other:?}, which exec does not support"))),
    };
    Ok(Target { alloc_id, task, task_pid: st.pid, config })
}

/// The environment a process started with.
fn proc_environ(pid: u32) -> Option<BTreeMap<String, String>> {
    let data = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(parse_environ(&data))
}

/// Parses `/proc/<pid>/environ` (NUL-separated `KEY=value`).
pub fn parse_environ(data: &[u8]) -> BTreeMap<String, String> {
    data.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The `NSpid:` line of /proc/<pid>/status: the pid in each nested PID namespace.
pub fn parse_nspid(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|rest| rest.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn is_ns_init(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let ns = parse_nspid(&status);
    ns.len() >= 2 && ns.last() == Some(&1)
}

/// Real uid and gid from /proc/<pid>/status text.
pub fn parse_ids(status: &str) -> Option<(u32, u32)> {
    let field = |key: &str| -> Option<u32> { status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok() };
    Some((field("Uid:")?, field("Gid:")?))
}

fn proc_ids(pid: u32) -> Option<(u32, u32)> {
    parse_ids(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The oldest child of `pid` (an init's first child is the task it started).
fn first_child(pid: u32) -> Option<u32> {
    let mut best: Option<(u64, u32)> = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        if parse_ppid(&stat) != Some(pid) {
            continue;
        }
        let started = crate::driver::parse_stat_start_time(&stat).unwrap_or(u64::MAX);
        if best.is_none_or(|(t, q)| (started, p) < (t, q)) {
            best = Some((started, p));
        }
    }
    best.map(|(_, p)| p)
}

/// The `cgroup.procs` files of the agent's task cgroups (under `/mlp/`) that a process is in,
/// from its /proc/<pid>/cgroup and this process's mountinfo.
pub fn cgroup_procs_from(proc_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    // (fstype, root inside the hierarchy, mount point, super options)
    let mounts: Vec<(&str, &str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut pre = pre.split_whitespace();
            let root = pre.nth(3)?;
            let mount_point = pre.next()?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let opts = post.nth(1).unwrap_or("").split(',').collect();
            Some((fstype, root, mount_point, opts))
        })
        .filter(|(fstype, ..)| *fstype == "cgroup" || *fstype == "cgroup2")
        .collect();
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !path.starts_with(&format!("/{}/", crate::isolation::cgroups::PARENT)) {
            continue;
        }
        let mount = mounts.iter().find(|(fstype, _, _, opts)| {
            if ctrls.is_empty() {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && ctrls.split(',').all(|c| opts.contains(&c))
            }
        });
        let Some((_, root, mount_point, _)) = mount else {
            continue;
        };
        let rel = if *root == "/" { path } else { path.strip_prefix(root).unwrap_or(path) };
        let file = PathBuf::from(mount_point).join(rel.trim_start_matches('/')).join("cgroup.procs");
        if !out.contains(&file) {
            out.push(file);
        }
    }
    out
}

fn cgroup_procs_of(pid: u32) -> Vec<PathBuf> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup_procs_from(&cg, &mi)
}

/// The parent pid from a /proc/<pid>/stat line.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The task's init (PID 1 of its PID namespace): `pid` itself, or its first descendant that
/// is PID 1 of a nested namespace (the runner may report the shim that forked it).
pub fn find_ns_init(pid: u32) -> Option<u32> {
    if is_ns_init(pid) {
        return Some(pid);
    }
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(pp) = std::fs::read_to_string(format!("/proc/{p}/stat")).ok().as_deref().and_then(parse_ppid) {
            children.entry(pp).or_default().push(p);
        }
    }
    let mut queue = std::collections::VecDeque::from([pid]);
    let mut seen = 0;
    while let Some(p) = queue.pop_front() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if is_ns_init(c) {
                return Some(c);
            }
            queue.push_back(c);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The agent side: start the helper, stream its I/O

/// The command's I/O as the agent holds it.
enum Io {
    Pipes { stdin: Option<tokio::process::ChildStdin>, stdout: tokio::process::ChildStdout, stderr: tokio::process::ChildStderr },
    Tty { master: Arc<AsyncFd<OwnedFd>> },
}

/// A started session.
struct Session {
    child: tokio::process::Child,
    pid: u32,
    io: Io,
}

/// Serves one `Exec` call: reads the first message, checks it, starts the command in the task,
/// and returns the response stream (stdout, stderr, then the exit status). Every error before
/// the command runs is the call's status.
pub async fn serve(registry: AllocRegistry, mut inbound: Streaming<ExecRequest>) -> Result<ExecStream, Status> {
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(Status::deadline_exceeded("exec: no first message within 30s")),
        Ok(Err(s)) => return Err(s),
        Ok(Ok(None)) => return Err(Status::invalid_argument("exec: the stream ended before its first message")),
        Ok(Ok(Some(m))) => m,
    };
    let start = first.start.clone().ok_or_else(|| Status::invalid_argument("exec: the first message must carry `start`"))?;
    validate_start(&start)?;
    let target = target(&registry, &start)?;
    let size = start.size.unwrap_or(TerminalSize { rows: 24, cols: 80 });
    let session = spawn(&target.config, &size).await?;
    tracing::info!(alloc = %target.alloc_id, task = %target.task, command = %target.config.command, tty = start.tty, pid = session.pid, "exec session started");
    let (tx, rx) = mpsc::channel::<Result<ExecResponse, Status>>(16);
    // Stdin sent in the first message, if any.
    let early = (!first.stdin.is_empty() || first.stdin_eof).then_some(ExecRequest { start: None, ..first });
    tokio::spawn(drive(session, target, registry, inbound, early, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Moves `fd` to a number ≥ 10 (close-on-exec; the original closes), so that the child's
/// `dup2` onto 3 and 4 can never clobber it.
fn dup_high(fd: OwnedFd) -> Result<OwnedFd, Status> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
        .map_err(|e| Status::internal(format!("exec: dup: {e}")))?;
    // SAFETY: fcntl just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

async fn spawn(config: &EnterConfig, size: &TerminalSize) -> Result<Session, Status> {
    let internal = |what: &str, e: &dyn std::fmt::Display| Status::internal(format!("exec: {what}: {e}"));
    let exe = crate::driver::supervised::supervisor_exe(None).map_err(|e| internal("finding the mlp binary", &e))?;
    let (cfg_r, cfg_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe", &e))?;
    let (st_r, st_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe", &e))?;
    // The originals close here: only the helper may hold the write end of the status pipe,
    // or its end is never seen.
    let (cfg_r, st_w) = (dup_high(cfg_r)?, dup_high(st_w)?);
    let (cfg_raw, st_raw) = (cfg_r.as_raw_fd(), st_w.as_raw_fd());

    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg(ENTER_ARG).env_clear().current_dir("/").kill_on_drop(true);
    let mut master = None;
    if config.tty {
        let (m, slave) = open_pty(size).map_err(|e| internal("opening a pseudo-terminal", &e))?;
        let clone = |f: &OwnedFd| f.try_clone().map_err(|e| internal("dup", &e));
        cmd.stdin(Stdio::from(clone(&slave)?)).stdout(Stdio::from(clone(&slave)?)).stderr(Stdio::from(slave));
        master = Some(m);
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    // SAFETY: runs in the forked child before exec and only calls dup2(2), which is
    // async-signal-safe; both sources are ≥ 10, so neither is overwritten by the other dup2,
    // and dup2 onto a new number clears close-on-exec for the helper.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(cfg_raw, CONFIG_FD) == -1 || libc::dup2(st_raw, STATUS_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| internal("starting the enter helper", &e))?;
    // The command itself holds the slave (and its pipe ends) now.
    drop(cmd);
    drop((cfg_r, st_w));
    let pid = child.id().unwrap_or(0);
    let json = serde_json::to_vec(config).map_err(|e| internal("encoding the config", &e))?;
    let started = tokio::task::spawn_blocking(move || {
        let mut w = File::from(cfg_w);
        // A helper that died early closes its end: the status read below says why.
        let _ = w.write_all(&json);
        drop(w);
        let mut text = String::new();
        let _ = File::from(st_r).read_to_string(&mut text);
        text
    });
    let report = match tokio::time::timeout(START_TIMEOUT, started).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("err reading the start status: {e}"),
        Err(_) => format!("err the command did not start within {START_TIMEOUT:?}"),
    };
    if !report.trim().is_empty() {
        // The helper reaps the command's failed process and exits by itself; killing it first
        // would leave that process for the task's init to reap.
        finish(&mut child).await;
        let message = report.trim().strip_prefix("err ").unwrap_or(report.trim()).to_string();
        return Err(if message.starts_with("starting ") {
            Status::invalid_argument(format!("exec: {message}"))
        } else if message.starts_with("the task's init") {
            Status::failed_precondition(format!("exec: {message}"))
        } else {
            Status::internal(format!("exec: {message}"))
        });
    }
    let io = match master {
        Some(m) => {
            set_nonblocking(&m).map_err(|e| internal("configuring the terminal", &e))?;
            // SAFETY: `m` is an OwnedFd: its descriptor stays open and the same until the
            // AsyncFd (which owns it) is dropped.
            let registered = unsafe { AsyncFd::register(m) };
            Io::Tty { master: Arc::new(registered.map_err(|e| internal("registering the terminal", &e))?) }
        }
        None => match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (stdin, Some(stdout), Some(stderr)) => Io::Pipes { stdin, stdout, stderr },
            _ => return Err(Status::internal("exec: the command's pipes are missing")),
        },
    };
    Ok(Session { child, pid, io })
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

/// Opens a pseudo-terminal pair of the given size (both ends close-on-exec).
fn open_pty(size: &TerminalSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let err = std::io::Error::last_os_error;
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(err());
    }
    // SAFETY: `m` was just returned by posix_openpt and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is a valid pty master; ptsname_r writes at most `name.len()` bytes,
    // NUL-terminated, into the buffer.
    let ok = unsafe { libc::grantpt(m) == 0 && libc::unlockpt(m) == 0 && libc::ptsname_r(m, name.as_mut_ptr(), name.len()) == 0 };
    if !ok {
        return Err(err());
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let s = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if s < 0 {
        return Err(err());
    }
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    resize(&master, size)?;
    Ok((master, slave))
}

/// Sets a terminal's size (TIOCSWINSZ on the master).
fn resize(master: &impl AsRawFd, size: &TerminalSize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: u16::try_from(size.rows).unwrap_or(u16::MAX),
        ws_col: u16::try_from(size.cols).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies a pipe into response messages until EOF.
async fn pump_pipe<R: AsyncRead + Unpin>(mut r: R, stderr: bool, tx: mpsc::Sender<Result<ExecResponse, Status>>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let msg = if stderr {
                    ExecResponse { stderr: data, ..Default::default() }
                } else {
                    ExecResponse { stdout: data, ..Default::default() }
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies the terminal's output into stdout messages until every slave is closed.
async fn pump_tty(master: Arc<AsyncFd<OwnedFd>>, tx: mpsc::Sender<Result<ExecResponse, Status>>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from)) {
            Err(_would_block) => continue,
            // EIO: the last slave closed.
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                let msg = ExecResponse { stdout: buf[..n].to_vec(), ..Default::default() };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn write_tty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from)) {
            Err(_would_block) => continue,
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Feeds the client's messages to the command; returns an error status for a bad message.
async fn feed(
    mut inbound: Streaming<ExecRequest>,
    early: Option<ExecRequest>,
    mut stdin: Option<tokio::process::ChildStdin>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
) -> Result<(), Status> {
    let tty = master.is_some();
    let mut next = early;
    loop {
        let req = match next.take() {
            Some(r) => r,
            None => match inbound.message().await {
                Ok(Some(r)) => r,
                // The client is done sending (or gone): stdin ends.
                Ok(None) | Err(_) => return Ok(()),
            },
        };
        validate_request(&req, tty)?;
        if let (Some(size), Some(m)) = (&req.resize, &master) {
            if let Err(e) = resize(m.get_ref(), size) {
                tracing::debug!(error = %e, "exec: resizing the terminal failed");
            }
        }
        if !req.stdin.is_empty() {
            if let Some(m) = &master {
                if write_tty(m, &req.stdin).await.is_err() {
                    return Ok(());
                }
            } else if let Some(w) = stdin.as_mut() {
                if w.write_all(&req.stdin).await.is_err() {
                    // The command closed its stdin; later input has nowhere to go.
                    stdin = None;
                }
            }
        }
        if req.stdin_eof {
            if let Some(m) = &master {
                // The terminal's end-of-file character (canonical mode).
                let _ = write_tty(m, &[4]).await;
            }
            stdin = None;
        }
    }
}

/// Runs a session to its end: I/O both ways, the task's liveness, the client's presence; then
/// the exit status as the last message.
async fn drive(
    mut session: Session,
    target: Target,
    registry: AllocRegistry,
    inbound: Streaming<ExecRequest>,
    early: Option<ExecRequest>,
    tx: mpsc::Sender<Result<ExecResponse, Status>>,
) {
    let mut pumps = Vec::new();
    let (stdin, master) = match session.io {
        Io::Pipes { stdin, stdout, stderr } => {
            pumps.push(tokio::spawn(pump_pipe(stdout, false, tx.clone())));
            pumps.push(tokio::spawn(pump_pipe(stderr, true, tx.clone())));
            (stdin, None)
        }
        Io::Tty { master } => {
            pumps.push(tokio::spawn(pump_tty(master.clone(), tx.clone())));
            (None, Some(master))
        }
    };
    let mut feeder = tokio::spawn(feed(inbound, early, stdin, master));
    let mut feeding = true;
    let mut failure: Option<Status> = None;
    let mut tick = tokio::time::interval(TASK_POLL);
    let status = loop {
        tokio::select! {
            st = session.child.wait() => break st.ok(),
            res = &mut feeder, if feeding => {
                feeding = false;
                if let Ok(Err(s)) = res {
                    failure = Some(s);
                    end(session.pid);
                }
            }
            _ = tx.closed() => {
                tracing::info!(alloc = %target.alloc_id, task = %target.task, "exec client went away; ending the session");
                end(session.pid);
                break finish(&mut session.child).await;
            }
            _ = tick.tick() => {
                if !task_running(&registry, &target.alloc_id, &target.task, target.task_pid) {
                    tracing::info!(alloc = %target.alloc_id, task = %target.task, "task stopped; ending its exec session");
                    failure.get_or_insert_with(|| not_running(&target.alloc_id, &target.task, "stopped during the session"));
                    end(session.pid);
                    break finish(&mut session.child).await;
                }
            }
        }
    };
    feeder.abort();
    for p in pumps.iter_mut() {
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut *p).await.is_err() {
            p.abort();
        }
    }
    if let Some(s) = failure {
        let _ = tx.send(Err(s)).await;
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let exit = match status {
        Some(st) => ExecExit { code: st.code().unwrap_or(0), signal: st.signal().unwrap_or(0) },
        None => ExecExit { code: -1, signal: 0 },
    };
    tracing::info!(alloc = %target.alloc_id, task = %target.task, code = exit.code, signal = exit.signal, "exec session ended");
    let _ = tx.send(Ok(ExecResponse { exit: Some(exit), ..Default::default() })).await;
}

/// Asks the helper to kill the command's process group.
fn end(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        if raw > 1 {
            let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
    }
}

/// Waits for an ended helper; SIGKILLs it when it does not go (its command dies with it).
async fn finish(child: &mut tokio::process::Child) -> Option<std::process::ExitStatus> {
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        Ok(st) => st.ok(),
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The enter helper (a fresh, single-threaded `mlp __mlp-exec-enter`)

/// The command's pid, for the signal handler.
static COMMAND: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_command(_: libc::c_int) {
    let pid = COMMAND.load(Ordering::SeqCst);
    if pid > 1 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

const STOP_SIGNALS: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT];

fn stop_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in STOP_SIGNALS {
        set.add(s);
    }
    set
}

/// When this process was started as an exec session's enter helper, runs it and never
/// returns; otherwise returns at once. Call first thing in `main`, before any thread starts.
pub fn maybe_run_enter() {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() != Some(std::ffi::OsStr::new(ENTER_ARG)) {
        return;
    }
    // SAFETY: the agent dup2'd the config pipe onto fd 3 and the status pipe onto fd 4 of this
    // freshly exec'd process; nothing else here owns them. A missing fd only fails the I/O.
    let (config, status) = unsafe { (OwnedFd::from_raw_fd(CONFIG_FD), OwnedFd::from_raw_fd(STATUS_FD)) };
    for fd in [&config, &status] {
        let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
    let mut status = Some(File::from(status));
    match enter(File::from(config), &mut status) {
        Ok(ws) => mirror(ws),
        Err(message) => {
            if let Some(mut f) = status.take() {
                let _ = f.write_all(format!("err {message}").as_bytes());
            }
            std::process::exit(127)
        }
    }
}

fn enter(mut config: File, status: &mut Option<File>) -> Result<WaitStatus, String> {
    let mut json = Vec::new();
    config.read_to_end(&mut json).map_err(|e| format!("reading the config: {e}"))?;
    drop(config);
    let cfg: EnterConfig = serde_json::from_slice(&json).map_err(|e| format!("decoding the config: {e}"))?;
    // Everything under /proc/<init> is opened before any setns: afterwards /proc is the task's.
    let mut namespaces = Vec::new();
    let mut root = None;
    if let Some(pid) = cfg.ns_pid {
        for (name, flag) in [
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("pid", CloneFlags::CLONE_NEWPID),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            let path = format!("/proc/{pid}/ns/{name}");
            let f = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
            let theirs = f.metadata().map_err(|e| format!("stat {path}: {e}"))?;
            let mine = std::fs::metadata(format!("/proc/self/ns/{name}")).map_err(|e| format!("stat /proc/self/ns/{name}: {e}"))?;
            if (theirs.dev(), theirs.ino()) != (mine.dev(), mine.ino()) {
                namespaces.push((name, flag, f));
            }
        }
        let path = format!("/proc/{pid}/root");
        root = Some(File::open(&path).map_err(|e| format!("opening {path}: {e}"))?);
        // Everything above was opened from the task's init only if it is still the same
        // process (pid and start time), so a reused pid is never entered.
        if crate::driver::proc_start_time(pid) != Some(cfg.ns_pid_start_time) {
            return Err(format!("the task's init (pid {pid}) is gone; is the task running?"));
        }
    }
    let me = std::process::id().to_string();
    for procs in &cfg.cgroup_procs {
        std::fs::write(procs, &me).map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    for (name, flag, f) in &namespaces {
        nix::sched::setns(f, *flag).map_err(|e| format!("entering the {name} namespace: {e}"))?;
    }
    if let Some(root) = root {
        nix::unistd::fchdir(root.as_raw_fd()).map_err(|e| format!("entering the task's root: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot into the task's root: {e}"))?;
    }
    // Stop signals wait until the handler knows the command's pid.
    let stops = stop_set();
    let _ = stops.thread_block();
    // SAFETY: this process is single-threaded (a fresh exec that starts no threads), so the
    // child may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let message = run_command(&cfg);
            if let Some(mut f) = status.take() {
                let _ = f.write_all(format!("err {message}").as_bytes());
            }
            // SAFETY: _exit ends this forked child without running the parent's atexit work.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            // Our copy of the report pipe must close, or the agent never sees its end.
            status.take();
            COMMAND.store(child.as_raw(), Ordering::SeqCst);
            // The helper's stdio belongs to the command; keep none of it open.
            if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                for fd in 0..=2 {
                    let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
                }
            }
            let act = SigAction::new(SigHandler::Handler(kill_command), SaFlags::SA_RESTART, SigSet::empty());
            for sig in STOP_SIGNALS {
                // SAFETY: the handler only calls kill(2), which is async-signal-safe.
                let _ = unsafe { nix::sys::signal::sigaction(sig, &act) };
            }
            let _ = stops.thread_unblock();
            let ws = loop {
                match waitpid(child, None) {
                    Ok(ws @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break Ok(ws),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => break Err(e),
                }
            };
            // Nothing the command started in its session outlives it.
            let _ = nix::sys::signal::killpg(child, Signal::SIGKILL);
            Ok(ws.unwrap_or(WaitStatus::Exited(child, 1)))
        }
    }
}

/// The command's process: its own session, the task's user and capabilities; returns only
/// when it could not be started.
fn run_command(cfg: &EnterConfig) -> String {
    let _ = stop_set().thread_unblock();
    if let Err(e) = nix::unistd::setsid() {
        return format!("setsid: {e}");
    }
    if cfg.tty {
        // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the terminal's slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return format!("making the terminal controlling: {}", std::io::Error::last_os_error());
        }
    }
    let user = cfg.user.clone();
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40);
    let drop_caps: Vec<u32> = match &user {
        Some(u) => (0..=last_cap).filter(|c| !(u.uid == 0 && ROOT_CAPS.contains(c))).collect(),
        None => Vec::new(),
    };
    let ids = user.as_ref().map(|u| (u.uid, u.gid));
    let mut cmd = std::process::Command::new(&cfg.command);
    cmd.args(&cfg.args).env_clear().envs(&cfg.env).current_dir(&cfg.work_dir);
    // SAFETY: runs in this single-threaded process right before exec; it only makes syscalls
    // (prctl, setgroups, setgid, setuid) on values computed beforehand.
    unsafe {
        cmd.pre_exec(move || {
            let err = std::io::Error::last_os_error;
            if let Some((uid, gid)) = ids {
                crate::isolation::init::drop_privileges(uid, gid, &drop_caps)?;
            }
            // After the credentials changed (which clears it): die with the helper.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(err());
            }
            Ok(())
        });
    }
    let e = cmd.exec();
    format!("starting {:?}: {e}", cfg.command)
}

/// Ends the helper the way the command ended: its exit code, or death by the same signal.
fn mirror(ws: WaitStatus) -> ! {
    let sig = match ws {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, sig, _) => sig,
        _ => std::process::exit(1),
    };
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = set.thread_unblock();
    let _ = nix::sys::signal::raise(sig);
    std::process::exit(128 + sig as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of an expected error.
    fn message(r: Result<(), Status>) -> String {
        match r {
            Err(s) => s.message().to_string(),
            Ok(()) => panic!("expected an error"),
        }
    }

    fn start(cmd: &[&str]) -> ExecStart {
        ExecStart { alloc_id: "a".into(), command: cmd.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn start_validation() {
        assert!(validate_start(&start(&["ls", "-l"])).is_ok());
        let e = validate_start(&start(&[])).err().unwrap_or_else(|| Status::ok(""));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("start.command is empty"), "{}", e.message());
        assert!(message(validate_start(&start(&[""]))).contains("command[0]"));
        assert!(message(validate_start(&start(&["a", "b\0c"]))).contains("command[1]"));
        let big = "x".repeat(MAX_ARGV_BYTES);
        assert!(validate_start(&start(&["echo", &big])).is_err());
        let mut s = start(&["sh"]);
        s.size = Some(TerminalSize { rows: 20_000, cols: 80 });
        assert!(message(validate_start(&s)).contains("start.size"));
    }

    #[test]
    fn request_validation() {
        let ok = ExecRequest { stdin: vec![0; MAX_STDIN_CHUNK], ..Default::default() };
        assert!(validate_request(&ok, false).is_ok());
        let big = ExecRequest { stdin: vec![0; MAX_STDIN_CHUNK + 1], ..Default::default() };
        assert!(message(validate_request(&big, false)).contains("stdin"));
        let resize = ExecRequest { resize: Some(TerminalSize { rows: 10, cols: 10 }), ..Default::default() };
        assert!(validate_request(&resize, true).is_ok());
        assert!(validate_request(&resize, false).is_err());
        let again = ExecRequest { start: Some(start(&["x"])), ..Default::default() };
        assert!(validate_request(&again, false).is_err());
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(parse_nspid("Name:\tsh\nNSpid:\t4242\t1\n"), vec![4242, 1]);
        assert_eq!(parse_nspid("Name:\tsh\n"), Vec::<u32>::new());
        assert_eq!(parse_ppid("12 (a) b) S 7 12 12 0"), Some(7));
        let env = parse_environ(b"A=1\0B=x=y\0\0junk\0");
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
        assert_eq!(env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(env.len(), 2);
        // This test process is no namespace's init.
        assert!(!is_ns_init(std::process::id()));
        assert_eq!(find_ns_init(std::process::id()), None);
    }

    #[test]
    fn ids_and_cgroups() {
        assert_eq!(parse_ids("Name:\tx\nUid:\t65534\t65534\t65534\t65534\nGid:\t100\t100\t100\t100\n"), Some((65534, 100)));
        assert_eq!(parse_ids("Name:\tx\n"), None);
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
31 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
32 24 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
40 24 0:31 / /proc rw - proc proc rw
";
        let cgroup = "\
4:memory:/mlp/a1.t
3:cpu,cpuacct:/mlp/a1.t
2:name=systemd:/user.slice
0::/mlp/a1.t
";
        let files = cgroup_procs_from(cgroup, mountinfo);
        assert_eq!(
            files,
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/mlp/a1.t/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/mlp/a1.t/cgroup.procs"),
                PathBuf::from("/sys/fs/cgroup/unified/mlp/a1.t/cgroup.procs"),
            ]
        );
        assert!(cgroup_procs_from("0::/user.slice\n", mountinfo).is_empty());
    }

    #[tokio::test]
    async fn pty_pair_has_the_asked_size() -> Result<(), Box<dyn std::error::Error>> {
        let (master, slave) = open_pty(&TerminalSize { rows: 33, cols: 101 })?;
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
        resize(&master, &TerminalSize { rows: 5, cols: 6 })?;
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (5, 6));
        Ok(())
    }
}
