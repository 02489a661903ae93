//! What the agent's tests share: fresh allocation ids, and a guard that kills what a test
//! started without reaching anybody else's processes.
//!
//! nextest runs the tests of a file as separate processes at the same time, each test process
//! the leader of its own process group, and this suite wraps the build VM's pids (`pid_max`
//! 32,768) every few seconds. So a test must not use host-wide names another test may use at the
//! same time, and must not kill by a number it recorded earlier without checking that the number
//! still names its own process.
#![allow(dead_code)]

use mlp_agent::driver::{proc_start_time, signal_leftover_group};
use mlp_agent::isolation::cgroups::{self, Layout};
use nix::sys::signal::Signal;
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};

/// A fresh allocation id (32 hex digits, like the server's). An `exec` or `oci` task's cgroup
/// is `mlp/<alloc id>.<task>` on the host: with one fixed id, two tests shared a cgroup, and one
/// test's teardown removed it while the other's init was moving in ("moving the init into
/// cgroup …: No such file or directory"), or killed the other's task.
pub fn alloc_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Processes a test started (tasks, which lead their process groups, and supervisors), killed
/// with their groups when dropped, also when the test fails half-way. Each is pinned to its
/// start time when added; one whose number names another process by then is left alone.
#[derive(Default)]
pub struct Guard(Vec<(u32, u64)>);

impl Guard {
    /// A guard over `pids`, each pinned now.
    pub fn of(pids: impl IntoIterator<Item = u32>) -> Guard {
        let mut g = Guard::default();
        for pid in pids {
            g.add(pid);
        }
        g
    }

    /// Adds `pid` if it still runs (one that ended left at most its group, which its
    /// supervisor kills).
    pub fn add(&mut self, pid: u32) {
        if let Some(start) = (pid > 1).then(|| proc_start_time(pid)).flatten() {
            if !self.0.contains(&(pid, start)) {
                self.0.push((pid, start));
            }
        }
    }

    /// Stops guarding `pid` (a task that ended as it should).
    pub fn remove(&mut self, pid: u32) {
        self.0.retain(|&(p, _)| p != pid);
    }

    /// How many processes it guards.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for &(pid, start) in &self.0 {
            // The group, unless its number now names another process.
            let _ = signal_leftover_group(pid, start, Signal::SIGKILL);
            // The process itself (a supervisor leads no group), through a pidfd: it is killed
            // only if the pinned process is still the one added.
            let Some(pinned) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { continue };
            if let Ok(fd) = pidfd_open(pinned, PidfdFlags::empty()) {
                if proc_start_time(pid) == Some(start) {
                    let _ = pidfd_send_signal(&fd, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// `exec` tasks a test started straight through the driver (no runner to clean up after them):
/// killed as [`Guard`] does, then their cgroups removed, also when the test fails half-way.
pub struct Cleanup {
    layout: Layout,
    guard: Guard,
    cgroups: Vec<String>,
}

impl Cleanup {
    pub fn new(layout: Layout) -> Cleanup {
        Cleanup { layout, guard: Guard::default(), cgroups: Vec::new() }
    }

    /// Adds the task whose pid is `pid` and whose cgroup is `cgroup` (`<alloc>.<task>`).
    pub fn add(&mut self, pid: u32, cgroup: String) {
        self.guard.add(pid);
        self.cgroups.push(cgroup);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The tasks first (their groups), then their cgroups.
        drop(std::mem::take(&mut self.guard));
        for cgroup in &self.cgroups {
            cgroups::remove_leftover(&self.layout, cgroup);
        }
    }
}
