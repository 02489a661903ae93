//! Killing a process a test found by scanning `/proc`, without the risk of killing whoever got
//! its number since.
//!
//! The build VM's `pid_max` is 32,768 and the suite wraps it every few seconds, so between a
//! scan that finds a task's pid and a `kill(pid)` the number can come to name another test's
//! process (nextest runs tests side by side). A pidfd pins one process: the check runs again on
//! the pinned number, and the signal can only reach that process.
#![allow(dead_code)]

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

/// SIGKILLs `pid` if `still(pid)` holds once the process is pinned; false when it did not (or
/// the process is gone).
pub fn kill_if(pid: i32, still: impl Fn(i32) -> bool) -> bool {
    let Some(p) = Pid::from_raw(pid) else { return false };
    let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else { return false };
    // /proc/<pid> shows the pinned process until it is reaped; if the number is reused after
    // that, the check may look at the newcomer, but the signal still goes to the pinned
    // process only, and fails (ESRCH) because it is gone.
    still(pid) && pidfd_send_signal(&fd, Signal::KILL).is_ok()
}
