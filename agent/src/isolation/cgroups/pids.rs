//! The pids controller: caps the number of processes (and threads) a task may have, which is
//! what stops a fork bomb.

use std::path::Path;

use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::MaxValue;

use super::{CgroupError, Limits};

/// Writes `pids.max`.
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let Some(max) = limits.pids else {
        return Ok(());
    };
    let ctrl = PidController::new(dir.to_path_buf(), root.to_path_buf(), v2);
    ctrl.set_pid_max(MaxValue::Value(i64::try_from(max).unwrap_or(i64::MAX))).map_err(|e| CgroupError::Limit {
        what: "pids.max",
        path: dir.to_path_buf(),
        message: e.to_string(),
    })
}

/// `pids.current`.
pub fn current(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("pids.current")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}
