//! The cpuset controller: `cores = N` pins a task to N of the CPUs its parent may use (the
//! first N; the scheduler does not hand out core ids yet).

use std::path::Path;

use cgroups_rs::fs::cpuset::CpuSetController;

use super::{CgroupError, Limits};

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

/// Pins the cgroup to the first `cores` CPUs its parent allows.
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let Some(cores) = limits.cores else {
        return Ok(());
    };
    let parent_file = if v2 {
        "cpuset.cpus.effective"
    } else {
        "cpuset.cpus"
    };
    let parent = dir
        .parent()
        .map(|p| p.join(parent_file))
        .unwrap_or_default();
    let allowed = parse_list(&std::fs::read_to_string(parent).unwrap_or_default());
    let n = usize::try_from(cores).unwrap_or(usize::MAX);
    let chosen: Vec<String> = allowed.iter().take(n).map(|c| c.to_string()).collect();
    if chosen.is_empty() {
        return Ok(());
    }
    let ctrl = CpuSetController::new(dir.to_path_buf(), root.to_path_buf(), v2);
    ctrl.set_cpus(&chosen.join(","))
        .map_err(|e| CgroupError::Limit {
            what: "cpuset.cpus",
            path: dir.to_path_buf(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists() {
        assert_eq!(super::parse_list("0-3,8\n"), vec![0, 1, 2, 3, 8]);
        assert_eq!(super::parse_list(""), Vec::<u32>::new());
    }
}
