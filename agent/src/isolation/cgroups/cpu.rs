//! The cpu controller (and v1's cpuacct): relative weight from the task's `cpu` MHz, an
//! optional CFS hard cap, and CPU time / throttled time statistics.

use std::path::Path;

use cgroups_rs::fs::cpu::CpuController;

use super::{limit_err as err, shares_to_weight, CgroupError, Limits, CFS_PERIOD_US};

/// Writes the weight (v1 `cpu.shares`, v2 `cpu.weight`) and the hard cap, if any.
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let ctrl = CpuController::new(dir.to_path_buf(), root.to_path_buf(), v2);
    let share = if v2 { shares_to_weight(limits.cpu_shares) } else { limits.cpu_shares };
    if share > 0 {
        ctrl.set_shares(share).map_err(|e| err(dir, "cpu weight", e))?;
    }
    if let Some(quota) = limits.cpu_quota_us {
        let quota = i64::try_from(quota).unwrap_or(i64::MAX);
        ctrl.set_cfs_quota_and_period(Some(quota), Some(CFS_PERIOD_US)).map_err(|e| err(dir, "cpu quota", e))?;
    }
    Ok(())
}

/// Reads `key value` out of a flat-keyed file's text.
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// (CPU time, throttled time) in nanoseconds. v1 reads `cpuacct.usage` from `acct_dir` and
/// `cpu.stat`'s `throttled_time`; v2 reads `cpu.stat`'s `usage_usec` and `throttled_usec`.
pub fn stats(dir: &Path, acct_dir: &Path, v2: bool) -> (u64, u64) {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
    if v2 {
        let usage = keyed(&stat, "usage_usec").unwrap_or(0).saturating_mul(1000);
        let throttled = keyed(&stat, "throttled_usec").unwrap_or(0).saturating_mul(1000);
        (usage, throttled)
    } else {
        let usage = std::fs::read_to_string(acct_dir.join("cpuacct.usage")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        (usage, keyed(&stat, "throttled_time").unwrap_or(0))
    }
}
