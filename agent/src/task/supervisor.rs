//! The per-task supervisor process, forked by the agent's zygote (`mlp __mlp-supervise-zygote`,
//! one single-threaded exec of the agent's binary per agent, see `crate::driver::zygote`;
//! `mlp __mlp-supervise <config>` runs the same supervisor from a fresh exec), in its own
//! session, stdio not connected to the agent, that starts one task,
//! owns its stdout/stderr (written into the size-rotated log files), waits for it and writes
//! how it ended into `<task dir>/exit.json` (atomically). It does not depend on the agent: when
//! the agent dies the supervisor and its task run on, and a new agent reattaches
//! (`crate::driver::supervised::reattach`) from the record the supervisor wrote before it
//! reported the start (`<task dir>/run.json`). The drivers launch it and read its files
//! (`crate::driver::supervised`); they never call into this module.
//!
//! * `raw_exec`: the supervisor spawns the task in its own session (so the agent can signal
//!   the task's process group) with `PR_SET_PDEATHSIG` = SIGKILL: a task never outlives its
//!   supervisor. When the task's main process ends, the supervisor kills what is left of its
//!   group.
//! * `exec`: the supervisor unshares a PID namespace (then `setns`es back) and forks the
//!   namespace's PID 1 ([`crate::isolation::init`]), which joins the task's cgroup first
//!   thing, then builds the task's namespaces and root and forks the task. The supervisor
//!   itself stays outside the task's cgroup and namespaces, so killing the cgroup never kills
//!   the supervisor before it recorded the exit.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::driver::logs::{log_base, RotatingWriter};
use crate::driver::supervised::{
    read_json, save_record, write_atomic, ExitRecord, SuperviseConfig, TaskKind, TaskRecord, EXIT_FILE, READY_FD, RECORD_FILE, STATUS_FD,
    SUPERVISE_ARG,
};
use crate::driver::zygote::{CONTROL_FD, MAX_REQUEST, TAKEN, ZYGOTE_ARG};
use crate::driver::{proc_start_time, signal_group};
use crate::isolation::init::{catch_stop_signals, exit_now, report, Running};
use crate::isolation::phases::Phases;

/// When this process was started as a task supervisor (`mlp __mlp-supervise <config>`), runs
/// it and never returns; otherwise returns at once. Call first thing in `main`, before any
/// thread starts: the supervisor must be single-threaded to unshare namespaces and fork.
pub fn maybe_run_supervisor() {
    let mut args = std::env::args_os();
    match args.nth(1) {
        Some(a) if a == SUPERVISE_ARG => {
            let config = args.next().map(PathBuf::from).unwrap_or_default();
            run(&config)
        }
        Some(a) if a == ZYGOTE_ARG => run_zygote(),
        _ => {}
    }
}

/// The supervisor's entry point (an exec'd `__mlp-supervise <config>`); never returns.
pub fn run(config_path: &Path) -> ! {
    let mut phases = Phases::default();
    phases.mark("supervisor_main");
    run_with(config_path, phases)
}

/// The agent's zygote (`__mlp-supervise-zygote`, request socket on fd 3; see
/// `crate::driver::zygote`): keeps one spare supervisor forked ahead until the agent closes
/// its end; never returns.
fn run_zygote() -> ! {
    set_name(c"mlp-zygote");
    // SAFETY: the agent dup2'd its request socket onto fd 3 of this freshly exec'd process and
    // nothing else here owns that fd.
    let on_3 = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    // Off fd 3, which every supervisor gets its status pipe on.
    let control = match on_3.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("mlp supervisor zygote: no request socket on fd {CONTROL_FD}: {e}");
            std::process::exit(2)
        }
    };
    drop(on_3);
    // Supervisors are reaped by the kernel (each restores the default for its own children).
    // SAFETY: SIG_IGN installs no handler; this process is single-threaded.
    if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGCHLD, SigHandler::SigIgn) } {
        eprintln!("mlp supervisor zygote: ignoring SIGCHLD: {e}");
        std::process::exit(2)
    }
    // One supervisor is always forked ahead (the *spare*), waiting for the next request itself:
    // a start wakes a process that exists instead of waiting for a fork and for the new
    // child's first run. The zygote forks the next spare once the spare took a request.
    loop {
        let (taken_r, taken_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(pipe) => pipe,
            Err(e) => {
                eprintln!("mlp supervisor zygote: pipe: {e}");
                std::process::exit(1)
            }
        };
        let zygote = nix::unistd::getpid();
        // SAFETY: this process is single-threaded (it starts no threads), so the child may run
        // any code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(taken_r);
                spare(zygote, control, taken_w)
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop(taken_w);
                let mut byte = [0u8; 1];
                let took = loop {
                    match nix::unistd::read(taken_r.as_raw_fd(), &mut byte) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        other => break other,
                    }
                };
                // Nothing: the spare saw the agent go (or failed); so does the zygote.
                if took != Ok(1) {
                    std::process::exit(0)
                }
            }
            Err(e) => {
                // The agent's next request fails (nobody reads it) and starts another zygote.
                eprintln!("mlp supervisor zygote: fork: {e}");
                std::process::exit(1)
            }
        }
    }
}

/// The spare supervisor: waits for one request, tells the zygote on `taken` (so that it forks
/// the next spare), and becomes that task's supervisor; exits when the agent is gone. Until it
/// took a request it dies with the zygote, so that no request reaches a spare nobody replaces
/// (the agent's next request then fails, and it starts another zygote).
fn spare(zygote: nix::unistd::Pid, control: OwnedFd, taken: OwnedFd) -> ! {
    set_name(c"mlp-spare");
    // SAFETY: prctl(2) with integer arguments only.
    let deathsig = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    if deathsig != 0 || nix::unistd::getppid() != zygote {
        std::process::exit(0)
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (path, fds) = match receive(&control, &mut buf) {
            Ok(Some(request)) => request,
            // The agent is gone: its supervisors run on without us.
            Ok(None) => std::process::exit(0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("mlp supervisor zygote: receiving a request: {e}");
                std::process::exit(1)
            }
        };
        if fds.len() < 2 {
            eprintln!("mlp supervisor zygote: a request without its pipes; ignored");
            continue;
        }
        // A supervisor outlives the zygote (and the agent).
        // SAFETY: prctl(2) with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
        // From here on this process lives whatever the zygote does (a SIGKILL sent by the
        // zygote's death before the prctl would have ended it on the way out of that call), so
        // it says on the status pipe that it took the request: a request that reached a dying
        // spare ends with no word on the pipe, and the agent may send it again.
        if let Some(status) = fds.first() {
            let _ = nix::unistd::write(status, format!("{TAKEN} ").as_bytes());
        }
        drop(control);
        let _ = File::from(taken).write_all(b"t");
        into_supervisor(&path, fds)
    }
}

/// One request: the config path and the fds that came with it; None at EOF.
fn receive(control: &OwnedFd, buf: &mut [u8]) -> nix::Result<Option<(PathBuf, Vec<OwnedFd>)>> {
    use std::os::unix::ffi::OsStrExt;
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 3]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg =
        nix::sys::socket::recvmsg::<()>(control.as_raw_fd(), &mut iov, Some(&mut cmsg), nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in this process for this message;
            // nothing else owns them.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(iov[0].get(..n).unwrap_or_default()));
    Ok(Some((path, fds)))
}

/// The spare that took a request becomes that task's supervisor: the same
/// process an exec of `__mlp-supervise <config>` would be (own session, status pipe on fd 3,
/// cgroup-ready pipe on fd 4, stderr into the task dir's `supervisor.log`, cwd the task dir,
/// default `SIGCHLD`); never returns.
fn into_supervisor(config: &Path, fds: Vec<OwnedFd>) -> ! {
    let mut phases = Phases::default();
    phases.mark("supervisor_main");
    // SAFETY: SIG_DFL installs no handler; this process is single-threaded.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGCHLD, SigHandler::SigDfl) };
    let _ = nix::unistd::setsid();
    // Each fd goes to a number above the targets first, so that no dup2 is onto itself (which
    // would keep close-on-exec) and none overwrites another before it was moved.
    let mut moved = Vec::new();
    for fd in fds {
        match nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(16)) {
            // SAFETY: fcntl just returned this new fd; nothing else owns it.
            Ok(raw) => moved.push(unsafe { OwnedFd::from_raw_fd(raw) }),
            Err(e) => {
                eprintln!("mlp supervisor: moving a received fd: {e}");
                std::process::exit(127)
            }
        }
    }
    let targets = [STATUS_FD, libc::STDERR_FILENO, READY_FD];
    for (fd, target) in moved.iter().zip(targets) {
        // SAFETY: dup2 of an fd this process owns onto a standard number of this
        // single-threaded child; the old targets are not in use.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } == -1 {
            eprintln!("mlp supervisor: dup2: {}", std::io::Error::last_os_error());
            std::process::exit(127)
        }
    }
    drop(moved);
    if let Some(dir) = config.parent() {
        let _ = std::env::set_current_dir(dir);
    }
    run_with(config, phases)
}

/// The supervisor with its status pipe on fd 3; never returns.
fn run_with(config_path: &Path, phases: Phases) -> ! {
    set_name(c"mlp-supervisor");
    // SAFETY: the agent (or the zygote) put the status pipe onto fd 3 of this process and
    // nothing else here owns that fd; a missing fd 3 only makes the writes fail.
    let status_fd = unsafe { OwnedFd::from_raw_fd(STATUS_FD) };
    let _ = nix::fcntl::fcntl(status_fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let mut status = Some(File::from(status_fd));
    match supervise(config_path, &mut status, phases) {
        Ok(()) => exit_now(0),
        Err(message) => {
            eprintln!("mlp supervisor: {message}");
            report(&mut status, &format!("err {message}"));
            exit_now(127)
        }
    }
}

/// Waits for the agent's `ready` on fd 4 (its cgroup exists), followed by the phases of the
/// cgroup's creation.
fn wait_ready(phases: &mut Phases) -> Result<(), String> {
    // SAFETY: the agent dup2'd the ready pipe onto fd 4 of this freshly exec'd process (the
    // config says so) and nothing else here owns that fd.
    let fd = unsafe { OwnedFd::from_raw_fd(READY_FD) };
    let mut text = String::new();
    let _ = File::from(fd).read_to_string(&mut text);
    match text.strip_prefix("ready") {
        Some(words) if words.is_empty() || words.starts_with(' ') => {
            phases.extend(words);
            Ok(())
        }
        _ => Err("the agent could not create the task's cgroup".into()),
    }
}

fn supervise(config_path: &Path, status: &mut Option<File>, mut phases: Phases) -> Result<(), String> {
    let cfg: SuperviseConfig = read_json(config_path).map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    phases.mark("supervisor_config");
    catch_stop_signals();
    let open = |stderr| {
        RotatingWriter::open(&cfg.log_dir, &log_base(&cfg.log_name, stderr), cfg.log_max_file_bytes, cfg.log_max_files)
            .map_err(|e| format!("opening the log files in {}: {e}", cfg.log_dir.display()))
    };
    let (out_r, out_pipe) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_pipe) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let running = match &cfg.task {
        TaskKind::Raw { command, args, env, work_dir, netns } => {
            // The supervisor is single-threaded: joining moves the process, and the task with it.
            if let Some(ns) = netns {
                crate::network::netns::enter(ns).map_err(|e| format!("spawn 0 joining the allocation's network: {e}"))?;
            }
            let mut cmd = std::process::Command::new(command);
            cmd.args(args)
                .env_clear()
                .envs(env)
                .current_dir(work_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out_pipe))
                .stderr(Stdio::from(err_pipe));
            // SAFETY: runs in the forked child of this single-threaded process before exec;
            // setsid(2) and prctl(2) are async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() == -1 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(|e| format!("spawn {} starting {command:?}: {e}", e.raw_os_error().unwrap_or(0)))?;
            // The Child is not waited through std (waitpid below); dropping it leaves the
            // process alone.
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            drop(child);
            phases.mark("task_spawned");
            Running { pid, report: None }
        }
        TaskKind::Isolated(init) => {
            if cfg.wait_ready {
                wait_ready(&mut phases)?;
                phases.mark("cgroup_ready");
            }
            crate::isolation::init::start_init(init, out_pipe, err_pipe, &mut phases)?
        }
    };
    let task_pid = running.pid.as_raw().unsigned_abs();
    // A start that fails from here on takes the task down with it.
    let abandon = |message: String| {
        let _ = signal_group(task_pid, Signal::SIGKILL);
        let _ = waitpid(running.pid, None);
        Err(message)
    };
    // The log files (a directory scan each, for rotation) are opened once the task runs, off
    // the start's path: until the pumps run, its output waits in the pipes.
    let (out_w, err_w) = match open(false).and_then(|out| Ok((out, open(true)?))) {
        Ok(writers) => writers,
        Err(message) => return abandon(message),
    };
    phases.mark("logs_opened");
    // Record the run before reporting it, so that an agent that dies now still finds it.
    let record = TaskRecord {
        driver: cfg.driver.clone(),
        run_id: cfg.run_id.clone(),
        supervisor_pid: std::process::id(),
        supervisor_start_time: proc_start_time(std::process::id()).unwrap_or(0),
        pid: task_pid,
        start_time: proc_start_time(task_pid).unwrap_or(0),
        cgroup: cfg.cgroup.clone(),
        memory_limit_mib: cfg.memory_limit_mib,
    };
    if let Err(e) = save_record(&cfg.task_dir, &record) {
        return abandon(format!("writing {}: {e}", cfg.task_dir.join(RECORD_FILE).display()));
    }
    phases.mark("record_written");
    report(status, &format!("ok {}{}", running.pid, phases.words()));
    let wait = pump_until_exit(&running, [(out_r, out_w), (err_r, err_w)]);
    let (code, signal) = match running.report {
        Some(report) => {
            let mut text = String::new();
            let _ = File::from(report).read_to_string(&mut text);
            crate::isolation::init::decode_report(text.trim(), wait)
        }
        None => match wait {
            Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
            _ => (None, None),
        },
    };
    let exit = ExitRecord { run_id: cfg.run_id.clone(), code, signal };
    let data = serde_json::to_vec(&exit).map_err(|e| format!("encoding the exit status: {e}"))?;
    write_atomic(&cfg.task_dir.join(EXIT_FILE), &data).map_err(|e| format!("writing {}: {e}", cfg.task_dir.join(EXIT_FILE).display()))?;
    Ok(())
}

/// How long the output is drained after the task ended: a process that escaped it (`raw_exec`)
/// may hold the pipes open; what it writes later is not the task's.
const DRAIN: Duration = Duration::from_secs(2);

/// Copies the task's stdout and stderr pipes into their log files and waits for the task,
/// in this one thread: a poll over both pipes and a pidfd of the task's process. Once that
/// process ended it is reaped (for `raw_exec`, what is left of its group is killed), and the
/// pipes are drained until EOF or for at most [`DRAIN`]. Returns the process's wait status.
///
/// One thread instead of a pump thread per pipe: a supervisor lives as long as its task, and
/// for the many short tasks of a batch queue, two thread starts and exits (their stacks, their
/// malloc arenas) were a measurable share of each start's CPU (docs/benchmarks.md).
fn pump_until_exit(running: &Running, pipes: [(OwnedFd, RotatingWriter); 2]) -> nix::Result<WaitStatus> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let blocking_wait = |pid: Pid| loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, running.pid.as_raw(), 0) };
    let pidfd = match i32::try_from(raw) {
        // SAFETY: pidfd_open just returned this fd; nothing else owns it.
        Ok(fd) if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        _ => {
            // Pidfds are in every kernel the agent runs on (it waits for supervisors through
            // them); should one be refused anyway, the task is polled for every 50 ms.
            eprintln!("mlp supervisor: pidfd_open: {}", std::io::Error::last_os_error());
            None
        }
    };
    let mut pipes = pipes.map(Some);
    let mut buf = vec![0u8; 32 * 1024];
    let mut wait: Option<nix::Result<WaitStatus>> = None;
    let mut drain_until: Option<std::time::Instant> = None;
    loop {
        let open = pipes.iter().filter(|p| p.is_some()).count();
        if let Some(until) = drain_until {
            if open == 0 || std::time::Instant::now() >= until {
                break;
            }
        }
        let mut fds: Vec<PollFd> = Vec::with_capacity(3);
        for (pipe, _) in pipes.iter().flatten() {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
        }
        let watch_pidfd = wait.is_none() && pidfd.is_some();
        if let (true, Some(pidfd)) = (watch_pidfd, &pidfd) {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
        }
        let timeout = match (drain_until, &pidfd) {
            (Some(until), _) => {
                PollTimeout::try_from(until.saturating_duration_since(std::time::Instant::now())).unwrap_or(PollTimeout::MAX)
            }
            (None, Some(_)) => PollTimeout::NONE,
            (None, None) => PollTimeout::from(50u8),
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("mlp supervisor: poll: {e}");
                if wait.is_none() {
                    wait = Some(blocking_wait(running.pid));
                }
                break;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
        let mut reaped = None;
        let exited = wait.is_none()
            && if watch_pidfd {
                ready.last().copied().unwrap_or(false)
            } else {
                match waitpid(running.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => false,
                    other => {
                        reaped = Some(other);
                        true
                    }
                }
            };
        drop(fds);
        let mut at = 0;
        for slot in &mut pipes {
            let Some((pipe, writer)) = slot else { continue };
            let is_ready = ready.get(at).copied().unwrap_or(false);
            at += 1;
            if !is_ready {
                continue;
            }
            match nix::unistd::read(pipe.as_raw_fd(), &mut buf) {
                Ok(0) => *slot = None,
                Ok(n) => {
                    if let Err(e) = writer.write_all(buf.get(..n).unwrap_or_default()) {
                        eprintln!("mlp supervisor: writing the task log failed: {e}");
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => {
                    eprintln!("mlp supervisor: reading the task output failed: {e}");
                    *slot = None;
                }
            }
        }
        if exited {
            // No process of a (raw_exec) task may outlive it. Its group is killed while the
            // leader, a zombie until the wait below, still holds the group's number: once it is
            // reaped an empty group's number is free, and pids wrap (at 32,768 by default), so
            // the number could come to lead another task's group.
            let group = running.pid.as_raw().unsigned_abs();
            let reaped_early = reaped.is_some();
            if running.report.is_none() && !reaped_early {
                let _ = signal_group(group, Signal::SIGKILL);
            }
            // A pidfd says the process ended and it is reaped here; without one, the WNOHANG
            // above reaped it, and the group is killed only while no process holds its number.
            wait = Some(reaped.unwrap_or_else(|| blocking_wait(running.pid)));
            if running.report.is_none() && reaped_early && proc_start_time(group).is_none() {
                let _ = signal_group(group, Signal::SIGKILL);
            }
            drain_until = Some(std::time::Instant::now() + DRAIN);
        }
    }
    // The log files are written and closed before the exit is recorded.
    drop(pipes);
    wait.unwrap_or_else(|| blocking_wait(running.pid))
}

/// Names this process in `ps`, `top` and `/proc/<pid>/comm` (at most 15 bytes): without it the
/// zygote and every supervisor forked from it show as `exe`, after the `/proc/self/exe` they
/// were started from. The command line (`__mlp-supervise…`) stays as it was.
pub(crate) fn set_name(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
}
