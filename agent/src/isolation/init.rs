//! The task shim and the task's init, both run from a freshly exec'd `mlp __task-init <config>`
//! (single-threaded, so forking and unsharing are safe).
//!
//! * The **shim** stays in the host's namespaces: it joins the task's cgroup (so everything
//!   after it is inside), unshares a PID namespace and forks the init. It exits the way the task
//!   did (same code, or the same signal), so the agent sees the task's status.
//! * The **init** is PID 1 of the new PID namespace: it unshares mount, UTS, IPC (and network)
//!   namespaces, builds the root and pivots into it, forks the task as the task's user with an
//!   emptied capability bounding set and `no_new_privs`, reaps every zombie, and reports the
//!   task's status to the shim. When the task ends the init exits, and the kernel kills whatever
//!   is left in the namespace.
//!
//! Signals: the agent signals the whole process group (shim, init, task tree). The shim and the
//! init catch TERM, INT, HUP and QUIT with a handler that does nothing, so they stay to collect
//! the status while the task handles (or dies of) the signal itself.
//!
//! The agent learns the outcome of the start from fd 3, a pipe: `ok` once the task's process
//! exists, or `err <message>` (mount failures, a missing command, ...).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::{rootfs, InitConfig};

/// Capabilities a root task keeps in its bounding set (Docker's default set); every other
/// task keeps none.
pub const ROOT_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// The fd the agent passes the start-status pipe on.
const STATUS_FD: i32 = 3;

extern "C" fn ignore_signal(_: libc::c_int) {}

fn catch_stop_signals() {
    let act = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler does nothing, which is async-signal-safe; a handled (not ignored)
        // signal is reset to its default by exec, so the task starts with default handlers.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &act) };
    }
}

fn report(status: &mut Option<File>, line: &str) {
    if let Some(mut f) = status.take() {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The shim's entry point; never returns.
pub fn run_shim(config_path: &Path) -> ! {
    // SAFETY: the agent dup2'd the status pipe onto fd 3 of this freshly exec'd process and
    // nothing else here owns that fd; a missing fd 3 only makes the writes fail.
    let status_fd = unsafe { OwnedFd::from_raw_fd(STATUS_FD) };
    let _ = nix::fcntl::fcntl(
        status_fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let mut status = Some(File::from(status_fd));
    match shim(config_path, &mut status) {
        Ok(code) => std::process::exit(code),
        Err(message) => {
            report(&mut status, &format!("err {message}"));
            std::process::exit(127)
        }
    }
}

fn shim(config_path: &Path, status: &mut Option<File>) -> Result<i32, String> {
    let cfg = InitConfig::load(config_path)
        .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    let me = std::process::id().to_string();
    for procs in &cfg.cgroup_procs {
        std::fs::write(procs, &me)
            .map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    catch_stop_signals();
    let (report_r, report_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: the shim is single-threaded (a fresh exec that starts no threads), so the child
    // may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(report_r);
            let code = match ns_init(&cfg, status, report_w) {
                Ok(()) => 0,
                Err(message) => {
                    report(status, &format!("err {message}"));
                    127
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            // Our copy of the status pipe must close, or the agent never sees its end.
            status.take();
            let init_status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let mut text = String::new();
            let _ = File::from(report_r).read_to_string(&mut text);
            Ok(mirror(text.trim(), init_status))
        }
    }
}

/// Ends the shim the way the task ended: its exit code, or death by the same signal.
fn mirror(report: &str, init_status: nix::Result<WaitStatus>) -> i32 {
    let signal = match report.split_once(' ') {
        Some(("exit", code)) => return code.parse().unwrap_or(1),
        Some(("signal", sig)) => sig.parse::<i32>().ok(),
        _ => match init_status {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(sig as i32),
            _ => None,
        },
    };
    let Some(sig) = signal.and_then(|s| Signal::try_from(s).ok()) else {
        return 1;
    };
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = set.thread_unblock();
    let _ = nix::sys::signal::raise(sig);
    128 + sig as i32
}

/// PID 1 of the task's namespace.
fn ns_init(cfg: &InitConfig, status: &mut Option<File>, report_w: OwnedFd) -> Result<(), String> {
    // If the shim dies, so does this namespace.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if cfg.network_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    nix::unistd::sethostname(&cfg.hostname).map_err(|e| format!("sethostname: {e}"))?;
    rootfs::enter(&cfg.root, &cfg.steps).map_err(|e| format!("building the task root: {e}"))?;
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let drop_caps: Vec<u32> = (0..=last_cap)
        .filter(|c| !(cfg.user.uid == 0 && ROOT_CAPS.contains(c)))
        .collect();
    let (uid, gid) = (cfg.user.uid, cfg.user.gid);
    let mut cmd = std::process::Command::new(&cfg.command);
    cmd.args(&cfg.args)
        .env_clear()
        .envs(&cfg.env)
        .current_dir(&cfg.work_dir);
    // SAFETY: runs in the forked child of this single-threaded process before exec; it only
    // makes syscalls (prctl, setgroups, setgid, setuid) on values computed beforehand.
    unsafe {
        cmd.pre_exec(move || {
            let err = std::io::Error::last_os_error;
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            {
                // Kernels without ambient capabilities have nothing to clear.
                let e = err();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            for cap in &drop_caps {
                if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(*cap), 0, 0, 0) != 0 {
                    let e = err();
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(e);
                    }
                }
            }
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(err());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(err());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cfg.command))?;
    let task = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    report(status, "ok");
    // Reap every child (orphans are re-parented to us) until the task itself ends.
    let line = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == task => break format!("exit {code}"),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == task => {
                break format!("signal {}", sig as i32)
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break format!("exit {}", 128 + e as i32),
        }
    };
    let _ = File::from(report_w).write_all(line.as_bytes());
    Ok(())
}
