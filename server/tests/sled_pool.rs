//! The vendored sled's one patch (vendor/PATCHES.md): a job for sled's IO thread pool wakes one
//! waiting thread, not every one. Upstream woke all of them (7 at rest) for each job, and every
//! flush of the Raft log hands the pool at least one job (writing the sealed IO buffer).
//!
//! Counted, not timed: the pool threads' sleeps per flush. One wake per job costs
//! about one switch per flush; waking the whole pool costs at least one per waiting thread.

use std::collections::BTreeMap;

/// Voluntary context switches (a thread going to sleep: preemptions by a busy machine are not
/// counted) of each of this process's sled IO threads, by thread id.
fn pool_switches() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sled-io") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    out
}

#[test]
fn a_flush_wakes_one_pool_thread_not_the_whole_pool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::open(dir.path().join("db")).expect("open sled");
    // The pool starts with its first job; let its threads reach their wait.
    for i in 0u32..5 {
        db.insert(i.to_be_bytes(), vec![1u8; 512]).expect("insert");
        db.flush().expect("flush");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = pool_switches();
    assert!(before.len() >= 2, "expected sled's IO pool to be running, found threads {before:?}");

    const FLUSHES: u64 = 50;
    for i in 0..FLUSHES {
        db.insert((1000 + i).to_be_bytes(), vec![2u8; 512]).expect("insert");
        db.flush().expect("flush");
    }
    let after = pool_switches();
    let switches: u64 = after.iter().map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
    let per_flush = switches as f64 / FLUSHES as f64;
    eprintln!("sled IO pool: {switches} context switches for {FLUSHES} flushes ({per_flush:.2} per flush)");
    // One wake per job: ~1–2 switches per flush. Waking every waiting thread: ≥ 6 per flush with
    // the pool's 7 resting threads (measured: 7–10).
    assert!(
        per_flush < 4.0,
        "sled's IO pool threads switched {switches} times for {FLUSHES} flushes ({per_flush:.1} per flush, {} threads): \
         is the vendored sled's one-wake-per-job patch (vendor/PATCHES.md) lost?",
        after.len()
    );
}
