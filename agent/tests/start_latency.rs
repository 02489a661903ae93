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
use mlp_agent::driver::{Driver, ProcessDriver, TaskSpec};
use mlp_agent::isolation::IsolationSettings;

#[path = "../../tests/prereq/mod.rs"]
mod prereq;
mod shared;
use shared::Guard;

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
        guard.add(h.pid());
        let st =
            tokio::time::timeout(Duration::from_secs(20), h.wait()).await.map_err(|_| format!("{} task {i} did not end", driver.name()))?;
        if st.code != Some(0) {
            return Err(format!("{} task {i} ended with {st:?}", driver.name()));
        }
        guard.remove(h.pid());
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

/// Prints "hello, world\n" and returns.
const HELLO_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hello, world\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 13))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Starts `n` tasks of `spec_of(i)` one after the other, each to its end; returns the sorted
/// durations of `Driver::start` and of start → exit.
async fn run_to_exit(driver: &dyn Driver, n: usize, spec_of: impl Fn(usize) -> TaskSpec) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let (mut starts, mut totals) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut guard = Guard::default();
    for i in 0..n {
        let s = spec_of(i);
        let t0 = Instant::now();
        let mut h = driver.start(&s).await.map_err(|e| format!("{} start {i}: {e}", driver.name()))?;
        starts.push(t0.elapsed());
        guard.add(h.pid());
        let st =
            tokio::time::timeout(Duration::from_secs(20), h.wait()).await.map_err(|_| format!("{} task {i} did not end", driver.name()))?;
        totals.push(t0.elapsed());
        if st.code != Some(0) {
            return Err(format!("{} task {i} ended with {st:?}", driver.name()));
        }
        guard.remove(h.pid());
    }
    starts.sort();
    totals.sort();
    Ok((starts, totals))
}

/// The wasm driver's first start (the module compiled by Cranelift: a driver without a cache)
/// against a cached start (the compiled module mapped back from `<cache>/<sha256>.cwasm`), and a
/// hello-world module's start → exit against an `exec` of `/bin/true` (`raw_exec` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_first_and_cached_start_against_exec() -> TestResult {
    if !prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]) {
        return Ok(());
    }
    let n: usize = std::env::var("MLP_START_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let dir = tempfile::tempdir()?;
    let module = dir.path().join("hello.wasm");
    std::fs::write(&module, wat::parse_str(HELLO_WAT)?)?;
    let wasm_spec = |sub: &str, i: usize| {
        let mut s = spec(&dir.path().join(sub), i);
        s.command = String::new();
        s.module = module.to_string_lossy().into_owned();
        s
    };
    let compiling = mlp_agent::driver::WasmDriver::new(None)?;
    let cached = mlp_agent::driver::WasmDriver::new(Some(dir.path().join("wasm-cache")))?;
    let exec = ExecDriver::new(IsolationSettings { supervisor_exe: Some(helper()), ..Default::default() });
    let raw = ProcessDriver::with_supervisor(Some(helper()));
    // Warm-ups: the cache file written, page cache, first cgroup directories.
    run_to_exit(&cached, 1, |i| wasm_spec("warm-wasm", i)).await?;
    run(&exec, &dir.path().join("warm-exec"), 1).await?;
    run(&raw, &dir.path().join("warm-raw"), 1).await?;
    let (fs, ft) = run_to_exit(&compiling, n, |i| wasm_spec("first", i)).await?;
    let (cs, ct) = run_to_exit(&cached, n, |i| wasm_spec("cached", i)).await?;
    let (es, et) = run_to_exit(&exec, n, |i| spec(&dir.path().join("exec"), i)).await?;
    let (rs, rt) = run_to_exit(&raw, n, |i| spec(&dir.path().join("raw"), i)).await?;
    assert_eq!(compiling.cache_stats().compiled, n as u64);
    assert_eq!(cached.cache_stats(), mlp_agent::driver::wasm::CacheStats { compiled: 1, cached: n as u64 });
    let line = |what: &str, s: &[Duration], t: &[Duration]| {
        println!(
            "{what:<34} start p50 {:>7.2} ms p99 {:>7.2} ms | start->exit p50 {:>7.2} ms p99 {:>7.2} ms",
            percentile(s, 0.5),
            percentile(s, 0.99),
            percentile(t, 0.5),
            percentile(t, 0.99)
        )
    };
    println!("over {n} starts each:");
    line("wasm hello, first start (compile)", &fs, &ft);
    line("wasm hello, cached start", &cs, &ct);
    line("exec /bin/true", &es, &et);
    line("raw_exec /bin/true", &rs, &rt);
    Ok(())
}
