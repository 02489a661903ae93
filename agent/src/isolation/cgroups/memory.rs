//! The memory controller: hard limit (with swap held at zero so the limit holds), a soft target
//! when a burst limit is above it, usage statistics and the OOM-kill counter behind
//! "OOM killed" exit reasons.

use std::path::Path;

use cgroups_rs::fs::memory::MemController;

use super::cpu::keyed;
use super::{limit_err as err, CgroupError, Limits};

/// Writes the memory limits.
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let ctrl = MemController::new(dir.to_path_buf(), root.to_path_buf(), v2);
    if let Some(bytes) = limits.memory_bytes {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        ctrl.set_limit(bytes).map_err(|e| err(dir, "memory limit", e))?;
        // Without this a task could page out to swap and outgrow its limit.
        if v2 {
            if dir.join("memory.swap.max").exists() {
                std::fs::write(dir.join("memory.swap.max"), "0").map_err(|e| err(dir, "memory.swap.max", e))?;
            }
        } else if dir.join("memory.memsw.limit_in_bytes").exists() {
            ctrl.set_memswap_limit(bytes).map_err(|e| err(dir, "memory+swap limit", e))?;
        }
    }
    if let Some(soft) = limits.memory_soft_bytes {
        let soft = i64::try_from(soft).unwrap_or(i64::MAX);
        // v1: soft_limit_in_bytes; v2: memory.low (cgroups-rs picks the file).
        ctrl.set_soft_limit(soft).map_err(|e| err(dir, "memory soft limit", e))?;
    }
    Ok(())
}

/// Memory statistics: (rss, cache, max usage), in bytes.
pub fn stats(dir: &Path, v2: bool) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let read_u64 = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    if v2 {
        (keyed(&stat, "anon").unwrap_or(0), keyed(&stat, "file").unwrap_or(0), read_u64("memory.peak"))
    } else {
        (
            keyed(&stat, "total_rss").or_else(|| keyed(&stat, "rss")).unwrap_or(0),
            keyed(&stat, "total_cache").or_else(|| keyed(&stat, "cache")).unwrap_or(0),
            read_u64("memory.max_usage_in_bytes"),
        )
    }
}

/// How many processes the OOM killer killed in this cgroup (v1 `memory.oom_control`'s
/// `oom_kill`, v2 `memory.events`' `oom_kill`).
pub fn oom_kills(dir: &Path, v2: bool) -> u64 {
    let file = if v2 { "memory.events" } else { "memory.oom_control" };
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    keyed(&text, "oom_kill").unwrap_or(0)
}
