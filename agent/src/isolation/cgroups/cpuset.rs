//! The cpuset controller: `cores = N` pins a task to N CPUs of its own. The servers count
//! cores per node without naming them, so the agent picks them: [`CoreAllocator`] hands each
//! pinned task distinct CPUs out of those the `mlp/` parent may use, frees them when the task
//! ends, and is rebuilt from the task cgroups' `cpuset.cpus` when a restarted agent reattaches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use cgroups_rs::fs::cpuset::CpuSetController;

use super::{CgroupError, Limits};

/// Why a task cannot have the cores it asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Fewer free CPUs than asked for.
    #[error("task cgroup {task} asks for {asked} cores, but only {free} of this node's {total} CPUs are free (the others are pinned to running tasks)")]
    NotEnough {
        /// The task's cgroup name.
        task: String,
        /// Cores asked for.
        asked: u32,
        /// CPUs free now.
        free: usize,
        /// CPUs the agent may hand out.
        total: usize,
    },
}

/// Which CPUs each pinned task holds, by task (its cgroup name under `mlp/`).
#[derive(Debug, Default)]
pub struct CoreAllocator {
    pool: Vec<u32>,
    taken: Mutex<BTreeMap<String, Vec<u32>>>,
}

impl CoreAllocator {
    /// An allocator over `pool`, the CPUs tasks may be pinned to.
    pub fn new(pool: Vec<u32>) -> Self {
        let pool: BTreeSet<u32> = pool.into_iter().collect();
        CoreAllocator { pool: pool.into_iter().collect(), taken: Mutex::new(BTreeMap::new()) }
    }

    /// The CPUs tasks may be pinned to.
    pub fn pool(&self) -> &[u32] {
        &self.pool
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u32>>> {
        // The map stays consistent whatever panicked while holding it (each change is one
        // insert or remove).
        self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives `task` `n` CPUs no other task holds (the lowest free ones), replacing what it held
    /// before (an earlier run of the same task).
    pub fn take(&self, task: &str, n: u32) -> Result<Vec<u32>, CoreError> {
        let mut taken = self.lock();
        taken.remove(task);
        let used: BTreeSet<u32> = taken.values().flatten().copied().collect();
        let free: Vec<u32> = self.pool.iter().copied().filter(|c| !used.contains(c)).collect();
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        if want == 0 || free.len() < want {
            return Err(CoreError::NotEnough { task: task.to_string(), asked: n, free: free.len(), total: self.pool.len() });
        }
        let chosen: Vec<u32> = free.into_iter().take(want).collect();
        taken.insert(task.to_string(), chosen.clone());
        Ok(chosen)
    }

    /// Records that `task` (reattached after an agent restart) holds `cpus`, as its cgroup
    /// says. Returns the CPUs another task holds too (double-booked; nothing moves a running
    /// task, so the caller reports it).
    pub fn claim(&self, task: &str, cpus: &[u32]) -> Vec<u32> {
        let mut taken = self.lock();
        taken.remove(task);
        let used: BTreeSet<u32> = taken.values().flatten().copied().collect();
        let clash = cpus.iter().copied().filter(|c| used.contains(c)).collect();
        if !cpus.is_empty() {
            taken.insert(task.to_string(), cpus.to_vec());
        }
        clash
    }

    /// Frees what `task` holds (it ended, or its start failed).
    pub fn release(&self, task: &str) {
        self.lock().remove(task);
    }

    /// What each task holds.
    pub fn taken(&self) -> BTreeMap<String, Vec<u32>> {
        self.lock().clone()
    }
}

/// A cpu list as the kernel writes it (`0-2,5`).
pub fn format_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

/// Expands a cpu list such as `0-3,8` into cpu numbers.
pub fn parse_list(list: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.trim().parse::<u32>().ok()),
        }
    }
    out
}

/// v1 needs `cpuset.cpus` and `cpuset.mems` filled in before a process can join: copies them
/// from the parent where empty.
pub fn inherit_v1(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let own = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        if own.trim().is_empty() {
            let from = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
            std::fs::write(dir.join(f), from.trim()).map_err(|e| CgroupError::Limit {
                what: "cpuset inheritance",
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// Pins the cgroup to the CPUs chosen for its `cores` ([`Limits::cpus`], from the agent's
/// [`CoreAllocator`]).
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let Some(cores) = limits.cores else {
        return Ok(());
    };
    if usize::try_from(cores).ok() != Some(limits.cpus.len()) {
        // Never fall back to some CPUs: that is how two tasks would end up sharing cores.
        return Err(CgroupError::Limit {
            what: "cpuset.cpus",
            path: dir.to_path_buf(),
            message: format!("{cores} cores asked for but {} CPUs chosen", limits.cpus.len()),
        });
    }
    let ctrl = CpuSetController::new(dir.to_path_buf(), root.to_path_buf(), v2);
    ctrl.set_cpus(&format_list(&limits.cpus)).map_err(|e| CgroupError::Limit {
        what: "cpuset.cpus",
        path: dir.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_list("0-3,8\n"), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_list(""), Vec::<u32>::new());
        assert_eq!(format_list(&[8, 0, 1, 2, 3, 5]), "0-3,5,8");
        assert_eq!(format_list(&[]), "");
        assert_eq!(parse_list(&format_list(&[4, 6, 7])), vec![4, 6, 7]);
    }

    #[test]
    fn tasks_get_distinct_cpus_until_none_are_left() {
        let a = CoreAllocator::new(vec![3, 0, 1, 2]);
        assert_eq!(a.pool(), [0, 1, 2, 3]);
        assert_eq!(a.take("x.t", 1), Ok(vec![0]));
        assert_eq!(a.take("y.t", 2), Ok(vec![1, 2]));
        let e = a.take("z.t", 2).err();
        assert_eq!(e, Some(CoreError::NotEnough { task: "z.t".into(), asked: 2, free: 1, total: 4 }));
        assert!(e.map(|e| e.to_string()).unwrap_or_default().contains("only 1 of this node's 4 CPUs are free"));
        // A failed take holds nothing.
        assert!(!a.taken().contains_key("z.t"));
        a.release("x.t");
        assert_eq!(a.take("z.t", 2), Ok(vec![0, 3]));
        // A task's next run replaces what its previous run held.
        assert_eq!(a.take("y.t", 1), Ok(vec![1]));
        assert_eq!(a.taken().values().flatten().count(), 3);
        assert!(a.take("w.t", 0).is_err(), "zero cores is not a pin");
        assert!(CoreAllocator::new(Vec::new()).take("t", 1).is_err());
    }

    #[test]
    fn reattached_tasks_keep_their_cpus_and_are_never_double_booked() {
        let a = CoreAllocator::new(vec![0, 1, 2, 3]);
        // A restarted agent learns what running tasks hold from their cgroups.
        assert_eq!(a.claim("old.t", &[2]), Vec::<u32>::new());
        assert_eq!(a.claim("old.u", &[0, 3]), Vec::<u32>::new());
        assert_eq!(a.take("new.t", 1), Ok(vec![1]));
        assert!(a.take("new.u", 1).is_err());
        // A cgroup that says otherwise is recorded and reported.
        assert_eq!(a.claim("odd.t", &[1, 2]), vec![1, 2]);
        // An unpinned reattached task holds nothing.
        assert!(a.claim("free.t", &[]).is_empty());
        assert!(!a.taken().contains_key("free.t"));
        a.release("old.t");
        a.release("old.u");
        a.release("odd.t");
        assert_eq!(a.take("new.u", 3), Ok(vec![0, 2, 3]));
    }
}
