//! The task's init, forked by the task's supervisor (`crate::task::supervisor`, a freshly exec'd
//! `mlp __mlp-supervise <config>`, single-threaded until the task runs, so forking and
//! unsharing are safe).
//!
//! * The **supervisor** stays in the host's namespaces and outside the task's cgroup: it
//!   unshares a PID namespace and forks the init ([`start_init`]), moves the init into the
//!   task's cgroup (a v1 move waits for an RCU grace period, so it runs while the init builds
//!   the root instead of before), owns the task's output, and records how the task ended
//!   ([`decode_report`]).
//! * The **init** is PID 1 of the new PID namespace: it starts its own session (the process
//!   group the agent signals), unshares mount, UTS, IPC (and network) namespaces, builds the
//!   root and pivots into it, waits until the supervisor reports it inside the task's cgroup
//!   (so the task and everything it starts are inside), forks the task as the task's user with an emptied capability bounding set and
//!   `no_new_privs`, reaps every zombie, and reports the task's status to the supervisor. When
//!   the task ends the init exits, and the kernel kills whatever is left in the namespace; when
//!   the supervisor dies, the init gets SIGKILL (parent-death signal), and so does the task.
//!
//! Signals: the agent signals the init's process group (init, task tree). The init catches
//! TERM, INT, HUP and QUIT with a handler that does nothing, so it stays to collect the status
//! while the task handles (or dies of) the signal itself.
//!
//! The supervisor learns the outcome of the start from a pipe: `ok [phase=<ns> ...]` once the
//! task's process exists, or `err <message>` (mount failures, a missing command, ...).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::phases::Phases;
use super::{rootfs, InitConfig};

/// Capabilities a root task keeps in its bounding set (Docker's default set); every other
/// task keeps none.
pub const ROOT_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// The fd the agent passes its start-status pipe on (the init must not keep it open).
const AGENT_STATUS_FD: i32 = 3;

/// Forks the task's init into a new PID namespace with `stdout`/`stderr` as its output;
/// returns once the task runs. Call only while the process is single-threaded.
pub(crate) fn start_init(cfg: &InitConfig, stdout: OwnedFd, stderr: OwnedFd, phases: &mut Phases) -> Result<Running, String> {
    let (start_r, start_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // The supervisor says on this pipe that it moved the init into the task's cgroup.
    let (joined_r, joined_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // The supervisor goes back to its own PID namespace for later children after the fork: a
    // process whose children go to another namespace cannot start threads (EINVAL).
    let own_pid_ns = std::fs::File::open("/proc/self/ns/pid").map_err(|e| format!("opening /proc/self/ns/pid: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: the supervisor is single-threaded (a fresh exec that has started no threads
    // yet), so the child may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            crate::task::supervisor::set_name(c"mlp-init");
            drop(own_pid_ns);
            drop(start_r);
            drop(report_r);
            drop(joined_w);
            // The agent waits for EOF on its status pipe: only the supervisor may hold it.
            let _ = nix::unistd::close(AGENT_STATUS_FD);
            let mut status = Some(File::from(start_w));
            let mut phases = Phases::default();
            phases.mark("init_forked");
            // Into the task's cgroup first thing, where the init can move itself cheaply.
            if let Err(e) = join_own_cgroup(cfg) {
                report(&mut status, &format!("err {e}"));
                exit_now(127);
            }
            phases.mark("init_joined_itself");
            let code = match into_init(&stdout, &stderr, &mut phases).and_then(|()| {
                drop(stdout);
                drop(stderr);
                ns_init(cfg, &mut status, report_w, joined_r, phases)
            }) {
                Ok(()) => 0,
                Err(message) => {
                    report(&mut status, &format!("err {message}"));
                    127
                }
            };
            exit_now(code)
        }
        ForkResult::Parent { child } => {
            if let Err(e) = nix::sched::setns(&own_pid_ns, CloneFlags::CLONE_NEWPID) {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(format!("setns back to the host PID namespace: {e}"));
            }
            drop(own_pid_ns);
            drop(start_w);
            drop(report_w);
            drop(joined_r);
            drop(stdout);
            drop(stderr);
            // Moving another process between cgroups waits for an RCU grace period
            // (milliseconds): what the init could not join itself (v2) is done here, while the
            // init builds the task's root. The init forks the task only once it is inside.
            if let Err(e) = join_cgroup(cfg, child) {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(e);
            }
            let _ = File::from(joined_w).write_all(b"joined");
            phases.mark("supervisor_moved_init");
            let mut text = String::new();
            let _ = File::from(start_r).read_to_string(&mut text);
            let text = text.trim();
            if let Some(words) = text.strip_prefix("ok").filter(|w| w.is_empty() || w.starts_with(' ')) {
                phases.extend(words);
                return Ok(Running { pid: child, report: Some(report_r) });
            }
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            Err(text.strip_prefix("err ").unwrap_or("the task's init exited without a status").to_string())
        }
    }
}

/// The init's first steps: its output, its own session, death with the supervisor.
fn into_init(stdout: &OwnedFd, stderr: &OwnedFd, phases: &mut Phases) -> Result<(), String> {
    for (pipe, target) in [(stdout, 1), (stderr, 2)] {
        // SAFETY: dup2 onto a standard fd of this (single-threaded) child; both fds are open
        // and nothing else in this process uses the standard fds' old targets.
        if unsafe { libc::dup2(pipe.as_raw_fd(), target) } == -1 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    phases.mark("init_output");
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    // If the supervisor dies, so does this namespace.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl(PR_SET_PDEATHSIG): {e}"))?;
    catch_stop_signals();
    Ok(())
}

/// The `tasks` file beside a v1 `cgroup.procs` (None on v2, which has none).
fn v1_tasks_file(procs: &std::path::Path) -> Option<std::path::PathBuf> {
    let tasks = procs.with_file_name("tasks");
    tasks.exists().then_some(tasks)
}

/// The init moves itself into the v1 hierarchies of its cgroup: "0" written to `tasks` moves the
/// writing thread (the init's only one, so the whole process), which the kernel does without
/// the global threadgroup lock whose write side waits for an RCU grace period (milliseconds),
/// unlike a move through `cgroup.procs`.
fn join_own_cgroup(cfg: &InitConfig) -> Result<(), String> {
    for tasks in cfg.cgroup_procs.iter().filter_map(|p| v1_tasks_file(p)) {
        std::fs::write(&tasks, "0").map_err(|e| format!("joining cgroup {}: {e}", tasks.display()))?;
    }
    Ok(())
}

/// The supervisor moves the init (`pid` in the supervisor's PID namespace) into the
/// hierarchies it could not join itself (v2's `cgroup.procs`), while the init builds the root.
fn join_cgroup(cfg: &InitConfig, pid: Pid) -> Result<(), String> {
    for procs in cfg.cgroup_procs.iter().filter(|p| v1_tasks_file(p).is_none()) {
        std::fs::write(procs, pid.as_raw().to_string()).map_err(|e| format!("moving the init into cgroup {}: {e}", procs.display()))?;
    }
    Ok(())
}

/// Blocks until the supervisor reports that the init is in the task's cgroup.
fn wait_joined(joined_r: OwnedFd) -> Result<(), String> {
    let mut text = String::new();
    let _ = File::from(joined_r).read_to_string(&mut text);
    if text == "joined" {
        Ok(())
    } else {
        Err("the supervisor did not move the init into the task's cgroup".into())
    }
}

/// How the task ended from the init's report ("exit N" / "signal N"), or from the init's own
/// wait status when it reported nothing: (exit code, signal).
pub(crate) fn decode_report(report: &str, init_status: nix::Result<WaitStatus>) -> (Option<i32>, Option<i32>) {
    match report.split_once(' ') {
        Some(("exit", code)) => (Some(code.parse().unwrap_or(1)), None),
        Some(("signal", sig)) => match sig.parse::<i32>() {
            Ok(s) => (None, Some(s)),
            Err(_) => (Some(1), None),
        },
        _ => match init_status {
            Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
            _ => (None, None),
        },
    }
}

/// PID 1 of the task's namespace.
fn ns_init(cfg: &InitConfig, status: &mut Option<File>, report_w: OwnedFd, joined_r: OwnedFd, mut phases: Phases) -> Result<(), String> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if let Some(netns) = &cfg.netns {
        let f = std::fs::File::open(netns).map_err(|e| format!("opening the allocation's network namespace {}: {e}", netns.display()))?;
        nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("joining the allocation's network namespace: {e}"))?;
    } else if cfg.network_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    nix::unistd::sethostname(&cfg.hostname).map_err(|e| format!("sethostname: {e}"))?;
    phases.mark("init_unshared");
    rootfs::enter(&cfg.root, &cfg.steps, cfg.overlay.as_ref(), &mut phases).map_err(|e| format!("building the task root: {e}"))?;
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40);
    let drop_caps: Vec<u32> = (0..=last_cap).filter(|c| !(cfg.user.uid == 0 && ROOT_CAPS.contains(c))).collect();
    let (uid, gid) = (cfg.user.uid, cfg.user.gid);
    let mut cmd = std::process::Command::new(&cfg.command);
    cmd.args(&cfg.args).env_clear().envs(&cfg.env).current_dir(&cfg.work_dir);
    // SAFETY: runs in the forked child of this single-threaded process before exec; it only
    // makes syscalls (prctl, setgroups, setgid, setuid) on values computed beforehand.
    unsafe {
        cmd.pre_exec(move || drop_privileges(uid, gid, &drop_caps));
    }
    // Nothing of the task may run outside its cgroup.
    wait_joined(joined_r)?;
    phases.mark("init_in_cgroup");
    let child = cmd.spawn().map_err(|e| format!("starting {:?}: {e}", cfg.command))?;
    let task = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    phases.mark("task_exec");
    report(status, &format!("ok{}", phases.words()));
    // Reap every child (orphans are re-parented to us) until the task itself ends.
    let line = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == task => break format!("exit {code}"),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == task => break format!("signal {}", sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break format!("exit {}", 128 + e as i32),
        }
    };
    let _ = File::from(report_w).write_all(line.as_bytes());
    Ok(())
}

/// Becomes `uid`:`gid` with no ambient capabilities, the capabilities in `drop_caps` removed
/// from the bounding set, and `no_new_privs` set: the credentials of a task (and of a command
/// `mlp alloc exec` runs inside one). Meant for a `pre_exec` hook: it only makes syscalls.
///
/// # Safety
/// Call only in a forked child (or a single-threaded process) right before exec.
pub(crate) unsafe fn drop_privileges(uid: u32, gid: u32, drop_caps: &[u32]) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    // SAFETY: plain syscalls on values owned by the caller; see the function's contract.
    unsafe {
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            // Kernels without ambient capabilities have nothing to clear.
            let e = err();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        for cap in drop_caps {
            if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(*cap), 0, 0, 0) != 0 {
                let e = err();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
        let groups = [gid];
        if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
            return Err(err());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(err());
        }
    }
    Ok(())
}

/// The task's running main process: its pid, and how to learn its end.
pub(crate) struct Running {
    /// The task's pid (`exec`: the init's).
    pub(crate) pid: Pid,
    /// `exec`: the init's report pipe ("exit N" / "signal N").
    pub(crate) report: Option<OwnedFd>,
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// TERM, INT, HUP and QUIT get a handler that does nothing (reset to default by exec).
pub(crate) fn catch_stop_signals() {
    let act = SigAction::new(SigHandler::Handler(ignore_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
        // SAFETY: the handler does nothing, which is async-signal-safe; a handled (not ignored)
        // signal is reset to its default by exec, so the task starts with default handlers.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &act) };
    }
}

/// Ends this process (a supervisor or an init) with `code` at once: without the C library's exit
/// handlers and the destructors of every library linked into `mlp`, which were a measurable
/// part of each task start's CPU. Both processes write only through unbuffered file
/// descriptors (the status pipes, files written whole, stderr), which the kernel closes.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process and takes an integer; no memory or state of this
    // process is used afterwards.
    unsafe { libc::_exit(code) }
}

/// Writes one line to a report pipe (once).
pub(crate) fn report(status: &mut Option<File>, line: &str) {
    if let Some(mut f) = status.take() {
        let _ = f.write_all(line.as_bytes());
    }
}
