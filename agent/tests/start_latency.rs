//! Task start latency through the real drivers: N `/bin/true` tasks started one after the other
//! through `exec` (namespaces, root, cgroup, user) and through `raw_exec`, each through its own
//! supervisor (the test-only `mlp-supervise-helper`, the supervisor part of `mlp`). Every start
//! must succeed and every task must exit 0 (the test's assertions); the timings are printed,
//! not asserted:
//!
//! ```text
//! MLP_START_BENCH_N=200 RUST_LOG=mlp_agent=debug \
//!   cargo nextest run -p mlp-agent --test start_latency --no-capture
//! ```
//!
//! prints p50/p99 of `Driver::start` (until the task's process exists) for both drivers and
//! their difference, the isolation overhead. With `RUST_LOG=mlp_agent=debug` the `exec` driver
//! also logs each start's phases (cgroup, supervisor, init: unshare, mounts, pivot_root, exec).
//! Add `--release` (`cargo nextest run --release ...`) for numbers comparable to a deployment.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use mlp_agent::driver::exec::ExecDriver;
use mlp_agent::driver::{signal_group, Driver, ProcessDriver, TaskSpec};
use mlp_agent::isolation::IsolationSettings;
use nix::sys::signal::Signal;

#[path = "../../tests/prereq/mod.rs"]
mod prereq;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn helper() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_mlp-supervise-helper").into()
}

fn spec(dir: &Path, i: usize) -> TaskSpec {
    let alloc_dir = dir.join(format!("a{i}"));
    let task_dir = alloc_dir.join("t");
    let local = task_dir.join("local");
    let logs = alloc_dir.join("alloc").join("logs");
    let _ = std::fs::create_dir_all(&local);
    let _ = std::fs::create_dir_all(&logs);
    TaskSpec {
        name: "t".into(),
        command: "/bin/true".into(),
        args: Vec::new(),
        env: BTreeMap::new(),
        work_dir: local,
        log_dir: logs,
        log_max_file_bytes: 1 << 20,
        log_max_files: 2,
        alloc_id: format!("startlat-{}-{i}", std::process::id()),
        task_dir,
        alloc_shared_dir: alloc_dir.join("alloc"),
        hostname: format!("startlat-{i}"),
        ..Default::default()
    }
}

/// Kills the process groups of tasks still running when a test fails.
#[derive(Default)]
struct Guard(Vec<u32>);
impl Drop for Guard {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = signal_group(*pid, Signal::SIGKILL);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Starts `n` tasks one after the other; returns each start's duration (sorted).
async fn run(driver: &dyn Driver, dir: &Path, n: usize) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(n);
    let mut guard = Guard::default();
    for i in 0..n {
        let s = spec(dir, i);
        let t0 = Instant::now();
        let mut h = driver.start(&s).await.map_err(|e| format!("{} start {i}: {e}", driver.name()))?;
        times.push(t0.elapsed());
        guard.0.push(h.pid());
        let st =
            tokio::time::timeout(Duration::from_secs(20), h.wait()).await.map_err(|_| format!("{} task {i} did not end", driver.name()))?;
        if st.code != Some(0) {
            return Err(format!("{} task {i} ended with {st:?}", driver.name()));
        }
        guard.0.pop();
    }
    times.sort();
    Ok(times)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_raw_exec_start_latency() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let n: usize = std::env::var("MLP_START_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let dir = tempfile::tempdir()?;
    let exec = ExecDriver::new(IsolationSettings { supervisor_exe: Some(helper()), ..Default::default() });
    let raw = ProcessDriver::with_supervisor(Some(helper()));
    // One warm-up start each (page cache, first cgroup directories).
    run(&exec, &dir.path().join("warm-exec"), 1).await?;
    run(&raw, &dir.path().join("warm-raw"), 1).await?;
    let e = run(&exec, &dir.path().join("exec"), n).await?;
    let r = run(&raw, &dir.path().join("raw"), n).await?;
    assert_eq!((e.len(), r.len()), (n, n));
    let (e50, e99) = (percentile(&e, 0.5), percentile(&e, 0.99));
    let (r50, r99) = (percentile(&r, 0.5), percentile(&r, 0.99));
    println!(
        "start latency over {n} starts: exec p50 {e50:.2} ms p99 {e99:.2} ms; \
         raw_exec p50 {r50:.2} ms p99 {r99:.2} ms; isolation overhead p50 {:.2} ms",
        e50 - r50
    );
    Ok(())
}
