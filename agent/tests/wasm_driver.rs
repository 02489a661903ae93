//! The `wasm` driver: modules written as WAT here, compiled by the `wat` crate, run through the
//! alloc and task runners (events, limits, stop) and through the driver itself (the cache).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_agent::alloc::runner::{spawn_alloc_runner, AllocHandle, RunnerEnv};
use mlp_agent::alloc::state::AllocRegistry;
use mlp_agent::driver::wasm::CacheStats;
use mlp_agent::driver::{Driver, TaskSpec, WasmDriver};
use mlp_agent::task::logs::{log_base, LogReader};
use mlp_proto::consts::{alloc_client, task_event, task_state};
use mlp_proto::v1::{AllocClientUpdate, Allocation, Job, Resources, RestartPolicy, Task, TaskConfig, TaskGroup};
use tokio::sync::mpsc;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

const ALLOC_ID: &str = "0123456789abcdef0123456789abcdef";

/// Prints its argv and its environment (NUL-separated, as WASI hands them over) on stdout and
/// a greeting on stderr.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 8192)))
    (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 4)))
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $environ_get (i32.const 1024) (i32.const 16384)))
    (call $write (i32.const 1) (i32.const 16384) (i32.load (i32.const 4)))
    (call $write (i32.const 2) (i32.const 512) (i32.const 16)))
  (data (i32.const 512) "hello from wasm\n"))"#;

/// Creates `hello.txt` in its first preopened directory (fd 3, `/local`) and writes into it;
/// exits 0, or 100 + errno when the write fails, or 99 when `../escape.txt` could be created.
const WRITE_FILE: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "hello.txt")
  (data (i32.const 200) "written by a wasm module\n")
  (data (i32.const 300) "../escape.txt")
  (func (export "_start") (local $err i32)
    ;; O_CREAT|O_TRUNC, rights FD_READ|FD_WRITE
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 9)
      (i32.const 9) (i64.const 0x42) (i64.const 0x42) (i32.const 0) (i32.const 0)))
    (if (local.get $err) (then (call $proc_exit (i32.add (i32.const 100) (local.get $err)))))
    (i32.store (i32.const 16) (i32.const 200))
    (i32.store (i32.const 20) (i32.const 25))
    (local.set $err (call $fd_write (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 24)))
    (if (local.get $err) (then (call $proc_exit (i32.add (i32.const 100) (local.get $err)))))
    (drop (call $fd_close (i32.load (i32.const 0))))
    (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 300) (i32.const 13)
      (i32.const 9) (i64.const 0x42) (i64.const 0x42) (i32.const 0) (i32.const 0)))
      (then (call $proc_exit (i32.const 99))))))"#;

/// Never ends.
const LOOP: &str = r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

/// Grows its memory by 1 MiB at a time until it fails, then exits 42.
const GROW: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (call $proc_exit (i32.const 42))))"#;

/// Sleeps an hour in a host call (`poll_oneoff` on the monotonic clock).
const SLEEP: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 0: userdata 0, tag 0 (clock), clock id 1 (monotonic), timeout 3600 s
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))))"#;

/// Exits with code 7 through `proc_exit`.
const EXIT7: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $proc_exit (i32.const 7))))"#;

/// Traps.
const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#;

fn write_module(dir: &Path, name: &str, wat: &str) -> Res<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, wat::parse_str(wat)?)?;
    Ok(path)
}

fn wasm_task(name: &str, module: &str, args: &[&str]) -> Task {
    Task {
        name: name.into(),
        driver: "wasm".into(),
        config: Some(TaskConfig {
            module: module.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("GREETING".to_string(), "from-config".to_string()), ("SHADOWED".to_string(), "config".to_string())]),
            ..Default::default()
        }),
        env: BTreeMap::from([("SHADOWED".to_string(), "task".to_string())]),
        resources: Some(Resources { cpu_mhz: 100, memory_mib: 64, ..Default::default() }),
        kill_timeout_ms: 500,
        ..Default::default()
    }
}

fn alloc(task: Task) -> Allocation {
    Allocation {
        id: ALLOC_ID.into(),
        name: "j.g[0]".into(),
        task_group: "g".into(),
        desired_status: "run".into(),
        job: Some(Job {
            id: "j".into(),
            name: "j".into(),
            r#type: "batch".into(),
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(1),
                tasks: vec![task],
                // No restarts: a failure ends the allocation.
                restart: Some(RestartPolicy { attempts: 0, interval_ms: 60_000, delay_ms: 0, mode: "fail".into() }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Harness {
    dir: tempfile::TempDir,
    handle: Option<AllocHandle>,
    rx: mpsc::UnboundedReceiver<AllocClientUpdate>,
    last: Option<AllocClientUpdate>,
}

impl Harness {
    fn new() -> Res<Self> {
        let (_tx, rx) = mpsc::unbounded_channel();
        Ok(Harness { dir: tempfile::tempdir()?, handle: None, rx, last: None })
    }

    fn run(&mut self, a: Allocation) -> Res<()> {
        let driver = WasmDriver::new(Some(self.dir.path().join("wasm-cache")))?;
        let mut drivers: BTreeMap<String, Arc<dyn Driver>> = BTreeMap::new();
        drivers.insert("wasm".into(), Arc::new(driver));
        let env = RunnerEnv {
            alloc_root: self.dir.path().join("allocs"),
            drivers,
            log_max_file_bytes: 1 << 20,
            log_max_files: 2,
            registry: AllocRegistry::default(),
            gpus: Vec::new(),
            nvml: None,
            gpu_health: tokio::sync::watch::channel(Default::default()).1,
            mps: None,
            network: None,
            node_address: "127.0.0.1".into(),
            node_id: String::new(),
            artifacts: Default::default(),
            tracking: Default::default(),
            host_volumes: Default::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.handle = Some(spawn_alloc_runner(a, None, env, tx));
        self.rx = rx;
        Ok(())
    }

    fn task_dir(&self, task: &str) -> PathBuf {
        self.dir.path().join("allocs").join(ALLOC_ID).join(task)
    }

    async fn until(&mut self, secs: u64, pred: impl Fn(&AllocClientUpdate) -> bool) -> Res<AllocClientUpdate> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let u = tokio::time::timeout(left, self.rx.recv())
                .await
                .map_err(|_| format!("timed out; last update {:?}", self.last))?
                .ok_or("runner channel closed")?;
            self.last = Some(u.clone());
            if pred(&u) {
                return Ok(u);
            }
        }
    }

    async fn terminal(&mut self) -> Res<AllocClientUpdate> {
        let u = self.until(30, |u| alloc_client::is_terminal(&u.client_status)).await?;
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), h.wait()).await?;
        }
        Ok(u)
    }

    fn log(&self, task: &str, stderr: bool) -> Res<String> {
        let bytes = LogReader::new(&self.task_dir(task).join("logs"), &log_base(task, stderr), 0, 0)?.read_to_end()?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn last_event(u: &AllocClientUpdate, task: &str) -> (String, String) {
    u.task_states[task].events.last().map(|e| (e.r#type.clone(), e.message.clone())).unwrap_or_default()
}

#[tokio::test]
async fn hello_prints_args_and_env_into_the_logs() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "hello.wasm", HELLO)?;
    h.run(alloc(wasm_task("t", module.to_str().ok_or("path")?, &["first", "second arg"])))?;
    let u = h.terminal().await?;
    assert_eq!(u.client_status, alloc_client::COMPLETE, "{:?}", u.task_states);
    let st = &u.task_states["t"];
    assert_eq!(st.exit_code, Some(0));
    let out = h.log("t", false)?;
    assert!(out.starts_with("hello.wasm\0first\0second arg\0"), "{out:?}");
    let env: Vec<&str> = out.split('\0').collect();
    for want in ["GREETING=from-config", "SHADOWED=task", "MLP_TASK_NAME=t", "MLP_TASK_DIR=/local", "MLP_ALLOC_DIR=/alloc"] {
        assert!(env.contains(&want), "{want} not in {env:?}");
    }
    // Never the agent's own environment.
    assert!(!env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert_eq!(h.log("t", true)?, "hello from wasm\n");
    Ok(())
}

#[tokio::test]
async fn module_in_the_task_dir_writes_under_local() -> TestResult {
    let mut h = Harness::new()?;
    // The module is in the task dir (where an artifact would put it), named relative to it.
    let task_dir = h.task_dir("w");
    std::fs::create_dir_all(task_dir.join("local"))?;
    write_module(&task_dir.join("local"), "app.wasm", WRITE_FILE)?;
    h.run(alloc(wasm_task("w", "local/app.wasm", &[])))?;
    let u = h.terminal().await?;
    let st = &u.task_states["w"];
    assert_eq!(st.exit_code, Some(0), "{:?}", st.events);
    assert_eq!(std::fs::read_to_string(task_dir.join("local/hello.txt"))?, "written by a wasm module\n");
    assert!(!task_dir.join("escape.txt").exists());
    Ok(())
}

#[tokio::test]
async fn loop_forever_is_killed_by_max_run_duration() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "loop.wasm", LOOP)?;
    let mut t = wasm_task("l", module.to_str().ok_or("path")?, &[]);
    t.max_run_duration_ms = 300;
    h.run(alloc(t))?;
    let started = Instant::now();
    let u = h.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let st = &u.task_states["l"];
    let types: Vec<&str> = st.events.iter().map(|e| e.r#type.as_str()).collect();
    assert!(types.contains(&task_event::MAX_RUN_DURATION), "{types:?}");
    // SIGTERM ends a module at its next epoch tick, well before the kill timeout.
    let (kind, message) = last_event(&u, "l");
    assert_eq!(kind, task_event::KILLED);
    assert!(message.contains("signal 15"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn loop_forever_is_stopped() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "loop.wasm", LOOP)?;
    h.run(alloc(wasm_task("l", module.to_str().ok_or("path")?, &[])))?;
    h.until(10, |u| u.task_states.get("l").is_some_and(|s| s.state == task_state::RUNNING)).await?;
    if let Some(handle) = &h.handle {
        handle.stop();
    }
    let u = h.terminal().await?;
    let st = &u.task_states["l"];
    assert_eq!(st.state, task_state::DEAD);
    assert!(!st.failed);
    let (kind, message) = last_event(&u, "l");
    assert_eq!(kind, task_event::KILLED);
    assert!(message.contains("signal 15"), "{message}");
    Ok(())
}

#[tokio::test]
async fn signal_kill_interrupts_a_looping_module() -> TestResult {
    let dir = tempfile::tempdir()?;
    let driver = WasmDriver::new(None)?;
    let spec = spec(dir.path(), write_module(dir.path(), "loop.wasm", LOOP)?)?;
    let mut handle = driver.start(&spec).await?;
    assert_eq!(handle.pid(), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.signal(nix::sys::signal::Signal::SIGKILL)?;
    let ex = tokio::time::timeout(Duration::from_secs(5), handle.wait()).await?;
    assert_eq!(ex.signal, Some(9));
    // wait again returns the same status.
    assert_eq!(handle.wait().await.signal, Some(9));
    Ok(())
}

#[tokio::test]
async fn signal_interrupts_a_module_sleeping_in_a_host_call() -> TestResult {
    let dir = tempfile::tempdir()?;
    let driver = WasmDriver::new(None)?;
    let spec = spec(dir.path(), write_module(dir.path(), "sleep.wasm", SLEEP)?)?;
    let mut handle = driver.start(&spec).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.signal(nix::sys::signal::Signal::SIGTERM)?;
    let ex = tokio::time::timeout(Duration::from_secs(5), handle.wait()).await?;
    assert_eq!(ex.signal, Some(15));
    Ok(())
}

#[tokio::test]
async fn growing_past_memory_fails_as_oom_with_reason() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "grow.wasm", GROW)?;
    let mut t = wasm_task("g", module.to_str().ok_or("path")?, &[]);
    t.resources = Some(Resources { cpu_mhz: 100, memory_mib: 16, ..Default::default() });
    h.run(alloc(t))?;
    let u = h.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let exited = u.task_states["g"].events.iter().find(|e| e.r#type == task_event::EXITED).ok_or("no exited event")?;
    assert!(exited.message.starts_with("OOM killed (limit 16 MiB)"), "{}", exited.message);
    assert!(exited.message.contains("memory limit of 16 MiB reached: the module asked for 17 MiB"), "{}", exited.message);
    Ok(())
}

/// Two memories of 10 MiB each: 20 MiB together.
const TWO_MEMORIES: &str = r#"(module (memory 160) (memory 160) (func (export "_start")))"#;

#[tokio::test]
async fn memories_count_together_against_the_cap() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "two.wasm", TWO_MEMORIES)?;
    let mut t = wasm_task("m", module.to_str().ok_or("path")?, &[]);
    t.resources = Some(Resources { cpu_mhz: 100, memory_mib: 16, ..Default::default() });
    h.run(alloc(t))?;
    let u = h.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let (kind, message) = last_event(&u, "m");
    assert_eq!(kind, task_event::DRIVER_FAILURE);
    assert!(message.contains("memory limit of 16 MiB reached: the module asked for 20 MiB"), "{message}");
    Ok(())
}

#[tokio::test]
async fn exit_codes_and_traps() -> TestResult {
    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "exit7.wasm", EXIT7)?;
    h.run(alloc(wasm_task("e", module.to_str().ok_or("path")?, &[])))?;
    let u = h.terminal().await?;
    assert_eq!(u.task_states["e"].exit_code, Some(7));

    let mut h = Harness::new()?;
    let module = write_module(h.dir.path(), "trap.wasm", TRAP)?;
    h.run(alloc(wasm_task("t", module.to_str().ok_or("path")?, &[])))?;
    let u = h.terminal().await?;
    assert_eq!(u.client_status, alloc_client::FAILED);
    let exited = u.task_states["t"].events.iter().find(|e| e.r#type == task_event::EXITED).ok_or("no exited event")?;
    assert!(exited.message.contains("wasm trap"), "{}", exited.message);
    assert!(exited.message.contains("unreachable"), "{}", exited.message);

    // A module that is not there, or not wasm, fails the start with the reason.
    let mut h = Harness::new()?;
    h.run(alloc(wasm_task("m", "/nonexistent/app.wasm", &[])))?;
    let u = h.terminal().await?;
    let (kind, message) = last_event(&u, "m");
    assert_eq!(kind, task_event::DRIVER_FAILURE);
    assert!(message.contains("reading the module /nonexistent/app.wasm"), "{message}");
    Ok(())
}

fn spec(dir: &Path, module: PathBuf) -> Res<TaskSpec> {
    let task_dir = dir.join("task");
    std::fs::create_dir_all(task_dir.join("local"))?;
    Ok(TaskSpec {
        name: "t".into(),
        module: module.to_str().ok_or("path")?.into(),
        work_dir: task_dir.join("local"),
        log_dir: task_dir.join("logs"),
        log_max_file_bytes: 1 << 20,
        log_max_files: 2,
        alloc_id: ALLOC_ID.into(),
        task_dir,
        resources: Some(Resources { memory_mib: 64, ..Default::default() }),
        ..Default::default()
    })
}

#[tokio::test]
async fn second_start_loads_the_cached_compilation() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("wasm-cache");
    let module = write_module(dir.path(), "hello.wasm", HELLO)?;
    let spec = spec(dir.path(), module.clone())?;

    let driver = WasmDriver::new(Some(cache.clone()))?;
    let mut first = driver.start(&spec).await?;
    assert_eq!(first.wait().await.code, Some(0));
    assert_eq!(driver.cache_stats(), CacheStats { compiled: 1, cached: 0 });
    let file = WasmDriver::cache_file(&cache, &std::fs::read(&module)?);
    assert!(file.is_file(), "{} missing", file.display());

    let mut second = driver.start(&spec).await?;
    assert_eq!(second.wait().await.code, Some(0));
    assert_eq!(driver.cache_stats(), CacheStats { compiled: 1, cached: 1 });

    // A new driver (an agent restart) finds it on disk too.
    let again = WasmDriver::new(Some(cache.clone()))?;
    let mut third = again.start(&spec).await?;
    assert_eq!(third.wait().await.code, Some(0));
    assert_eq!(again.cache_stats(), CacheStats { compiled: 0, cached: 1 });

    Ok(())
}
