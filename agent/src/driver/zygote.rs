//! The agent's side of the supervisor zygote: one process per agent (per supervisor binary),
//! `mlp __mlp-supervise-zygote`, exec'd once and kept single-threaded, that forks a task's
//! supervisor on request (`crate::task::supervisor`), so that a task start pays a fork of a small
//! process instead of a fork of the agent plus an exec of the `mlp` binary (its loading and
//! relocation, the Rust runtime's start).
//!
//! Requests go over a `SOCK_SEQPACKET` socket pair (the zygote's end on its fd 3): one message
//! per start, the supervisor's config path as bytes, with the start-status pipe, the
//! supervisor's diagnostics file and (`exec`) the cgroup-ready pipe passed as `SCM_RIGHTS`. The
//! zygote answers nothing: the supervisor it forks reports on the status pipe exactly as an
//! exec'd one did. The zygote keeps one supervisor forked ahead, the *spare*, which receives
//! the next request itself (a start wakes a sleeping process instead of waiting for a fork and
//! the child's first run) and tells the zygote to fork the next one; a spare dies with the
//! zygote until it took a request. Supervisors are the zygote's children
//! in their own sessions; it ignores `SIGCHLD`, so the kernel reaps them, and the agent waits
//! for them through pidfds. When the agent dies the zygote reads EOF and exits, and the
//! supervisors (and their tasks) run on, re-parented, until a new agent reattaches.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};

use super::DriverError;

/// The first argument that makes the supervisor binary the agent's zygote.
pub const ZYGOTE_ARG: &str = "__mlp-supervise-zygote";
/// The fd the zygote gets its end of the request socket on.
pub(crate) const CONTROL_FD: i32 = 3;
/// The longest config path a request carries (the zygote's receive buffer).
pub(crate) const MAX_REQUEST: usize = 4096;
/// What a spare writes first on the status pipe once it took a request and no longer dies with
/// the zygote: a status without it means that no supervisor ever saw the request (it reached
/// a spare that the zygote's death was killing), so nothing was started and it may be sent again.
/// The spare writes it followed by a space, before the status proper.
pub(crate) const TAKEN: &str = "taken";

/// A running zygote.
struct Zygote {
    control: OwnedFd,
    child: std::process::Child,
}

/// The agent's zygotes, by supervisor binary (one in a deployment; the agent crate's tests run
/// drivers side by side in one process).
static ZYGOTES: Mutex<BTreeMap<PathBuf, Zygote>> = Mutex::new(BTreeMap::new());

impl Zygote {
    fn start(exe: &Path) -> Result<Zygote, DriverError> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| DriverError::Isolation(format!("socketpair for the supervisor zygote: {e}")))?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        // stderr stays the agent's: the zygote's own diagnostics belong in the agent's log.
        cmd.arg(ZYGOTE_ARG).env_clear().current_dir("/").stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: runs in the forked child before exec and only calls setsid(2) and dup2(2),
        // which are async-signal-safe; dup2 onto fd 3 clears close-on-exec for the zygote.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 || libc::dup2(theirs_raw, CONTROL_FD) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DriverError::Spawn { command: exe.display().to_string(), source })?;
        drop(theirs);
        tracing::debug!(exe = %exe.display(), pid = child.id(), "supervisor zygote started");
        Ok(Zygote { control: ours, child })
    }

    fn send(&self, config: &Path, fds: &[RawFd]) -> nix::Result<()> {
        let bytes = config.as_os_str().as_bytes();
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(self.control.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map(|_| ())
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Its supervisors are not its: they run on (re-parented) when it goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the zygote for `exe` now unless it runs, so that the first task start does not pay
/// for it. Errors are the first start's to report.
pub(crate) fn prestart(exe: &Path) {
    let mut zygotes = ZYGOTES.lock().unwrap_or_else(|p| p.into_inner());
    if !zygotes.contains_key(exe) {
        match Zygote::start(exe) {
            Ok(z) => {
                zygotes.insert(exe.to_path_buf(), z);
            }
            Err(e) => tracing::warn!(exe = %exe.display(), error = %e, "starting the supervisor zygote failed"),
        }
    }
}

/// Has the zygote of `exe` (started if it is not running) fork a supervisor for `config`,
/// handing it `status` (its fd 3), `diag` (its stderr) and `ready` (its fd 4). A zygote that is
/// gone is replaced once.
pub(crate) fn launch(
    exe: &Path,
    config: &Path,
    status: BorrowedFd<'_>,
    diag: BorrowedFd<'_>,
    ready: Option<BorrowedFd<'_>>,
) -> Result<(), DriverError> {
    if config.as_os_str().len() > MAX_REQUEST {
        return Err(DriverError::Isolation(format!("supervisor config path too long: {}", config.display())));
    }
    let mut fds = vec![status.as_raw_fd(), diag.as_raw_fd()];
    fds.extend(ready.map(|r| r.as_raw_fd()));
    let mut zygotes = ZYGOTES.lock().unwrap_or_else(|p| p.into_inner());
    let mut last = None;
    for _ in 0..2 {
        // A zygote that exited is replaced before it is sent anything: its spare may still hold
        // the socket open while it dies, and would swallow the request.
        if let Some(z) = zygotes.get_mut(exe) {
            if !matches!(z.child.try_wait(), Ok(None)) {
                tracing::warn!(exe = %exe.display(), pid = z.child.id(), "the supervisor zygote exited; starting another");
                zygotes.remove(exe);
            }
        }
        if !zygotes.contains_key(exe) {
            zygotes.insert(exe.to_path_buf(), Zygote::start(exe)?);
        }
        let Some(z) = zygotes.get(exe) else { continue };
        match z.send(config, &fds) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(exe = %exe.display(), error = %e, "the supervisor zygote is gone; starting another");
                zygotes.remove(exe);
                last = Some(e);
            }
        }
    }
    Err(DriverError::Isolation(format!(
        "the supervisor zygote does not take requests: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}
