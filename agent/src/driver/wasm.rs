//! The `wasm` driver ([`WasmDriver`]): a WebAssembly module (WASI preview 1 command) run by
//! wasmtime inside the agent process, one thread per task.
//!
//! * **Module**: `config.module`, a path in the task dir (`local/app.wasm`) or an absolute path
//!   on the node. It is compiled by Cranelift once per content: the compiled code is cached on
//!   disk as `<cache>/<sha256 of the module>.cwasm` (`Module::serialize`, written to a temporary
//!   file and renamed), so a later start with the same bytes only maps it back in
//!   (`Module::deserialize_file`). A cache file the engine refuses (another wasmtime, other
//!   settings) is compiled again and replaced.
//! * **WASI**: argv is the module's file name then `config.args`; the environment is
//!   `config.env` under the task's own (the task's `env`, `MLP_*`), never the agent's;
//!   `MLP_TASK_DIR` and `MLP_ALLOC_DIR` are the guest paths. The task's `local/` is preopened as
//!   `/local` (read-write, fd 3), the group's shared `alloc/` as `/alloc` (fd 4), the task's
//!   `secrets/` as `/secrets` (fd 5); nothing else of the host. WASI preview 1 has no working
//!   directory: wasi-libc resolves relative paths from `/`, so a module names `/local/...`.
//!   No sockets (no network), stdin is empty, stdout and stderr go into the task's size-rotated
//!   log files.
//! * **Limits**: the module's linear memories together may not grow past the task's `memory`
//!   (or `memory_max`); a growth past it traps and the task ends as OOM-killed at that limit.
//!   An engine-wide ticker thread advances the epoch every [`EPOCH_TICK`] while a module runs
//!   (it sleeps while none does); at every tick a running module yields to its thread's
//!   executor, and a module whose task was signalled (stop, kill, `max_run_duration`) is
//!   interrupted there, also while it waits in a host call.
//! * **Exit**: `proc_exit(n)` is exit code `n`, a return from `_start` is 0, a signal (SIGTERM,
//!   SIGKILL: both end the module at once, it cannot catch them) is that signal, a trap has no
//!   code and its reason is [`TaskHandle::exit_reason`].
//!
//! A wasm task lives in the agent process: it has no pid ([`TaskHandle::pid`] is 0), no
//! cgroup and no supervisor, and it ends with the agent. An agent restart cannot reattach it:
//! it writes no run record, so the next agent run restarts it like any task it could not
//! reattach (docs/security.md).

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mlp_proto::consts::driver as driver_names;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::logs::{log_base, RotatingWriter};
use super::{Driver, DriverError, ExitStatus, TaskHandle, TaskSpec};

/// How often the engine's epoch advances: the longest a signalled module keeps running.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Table elements a module may grow its tables to (a pointer each).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Memory cap of a task that asks for no resources.
const DEFAULT_MEMORY_MIB: u64 = 300;

/// Counters of the module cache, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules compiled by Cranelift.
    pub compiled: u64,
    /// Modules loaded from the on-disk cache.
    pub cached: u64,
}

/// The `wasm` driver: one wasmtime engine (Cranelift, epoch interruption) per agent.
#[derive(Clone)]
pub struct WasmDriver {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<WasmTask>,
    cache_dir: Option<PathBuf>,
    compiled: AtomicU64,
    cached: AtomicU64,
    ticker: Arc<Ticker>,
}

/// Wakes the epoch ticker only while modules run: an idle agent's ticker sleeps.
#[derive(Default)]
struct Ticker {
    running: Mutex<usize>,
    wake: std::sync::Condvar,
}

impl Ticker {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a running module for as long as the guard lives.
    fn hold(self: &Arc<Self>) -> TickerHold {
        *self.lock() += 1;
        self.wake.notify_all();
        TickerHold(self.clone())
    }

    /// The ticker thread: every [`EPOCH_TICK`] while a module runs, the engine's epoch
    /// advances; it ends once the engine is gone.
    fn run(&self, engine: wasmtime::EngineWeak) {
        loop {
            let mut running = self.lock();
            while *running == 0 {
                running = self.wake.wait_timeout(running, Duration::from_secs(1)).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                if engine.upgrade().is_none() {
                    return;
                }
            }
            drop(running);
            std::thread::sleep(EPOCH_TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        }
    }
}

struct TickerHold(Arc<Ticker>);

impl Drop for TickerHold {
    fn drop(&mut self) {
        let mut running = self.0.lock();
        *running = running.saturating_sub(1);
    }
}

/// A store's data: the module's WASI context and its memory cap.
struct WasmTask {
    wasi: WasiP1Ctx,
    limits: MemoryCap,
}

/// Caps the linear memories of a module, all of them together; records a refused growth.
struct MemoryCap {
    max_bytes: usize,
    limit_mib: u64,
    /// Bytes of linear memory granted so far, over every memory of the instance.
    used: usize,
    /// Set to the total asked for when a growth past the cap was refused.
    refused: Arc<AtomicU64>,
}

/// A module asked for more memory than its task's cap.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit_mib} MiB reached: the module asked for {asked_mib} MiB of linear memory")]
struct MemoryLimit {
    limit_mib: u64,
    asked_mib: u64,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            self.refused.store(total as u64, Ordering::SeqCst);
            return Err(wasmtime::Error::new(MemoryLimit { limit_mib: self.limit_mib, asked_mib: (total as u64).div_ceil(1 << 20) }));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

fn wasm_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> DriverError {
    DriverError::Wasm(format!("{what}: {e}"))
}

impl WasmDriver {
    /// A driver whose compiled modules are cached in `cache_dir` (created on first use; None
    /// compiles every start). Starts the engine's epoch ticker thread, which ticks only while a
    /// module runs and ends with the last user of the engine.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, DriverError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| wasm_err("creating the wasmtime engine", e))?;
        let mut linker: Linker<WasmTask> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |t: &mut WasmTask| &mut t.wasi)
            .map_err(|e| wasm_err("linking WASI preview 1", e))?;
        let (weak, ticker) = (engine.weak(), Arc::new(Ticker::default()));
        let t = ticker.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || t.run(weak))
            .map_err(|e| wasm_err("starting the epoch ticker", e))?;
        Ok(WasmDriver {
            inner: Arc::new(Inner { engine, linker, cache_dir, compiled: AtomicU64::new(0), cached: AtomicU64::new(0), ticker }),
        })
    }

    /// How many modules this driver compiled and how many it loaded from its cache.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats { compiled: self.inner.compiled.load(Ordering::SeqCst), cached: self.inner.cached.load(Ordering::SeqCst) }
    }

    /// The cache file of a module's bytes.
    pub fn cache_file(cache_dir: &Path, bytes: &[u8]) -> PathBuf {
        cache_dir.join(format!("{}.cwasm", hex(&Sha256::digest(bytes))))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Inner {
    /// The module at `path`, from the cache or compiled (and then cached). Blocking.
    fn load(&self, path: &Path) -> Result<(Module, bool), DriverError> {
        let bytes = std::fs::read(path).map_err(|e| wasm_err(format!("reading the module {}", path.display()), e))?;
        let cache_file = self.cache_dir.as_deref().map(|dir| WasmDriver::cache_file(dir, &bytes));
        if let Some(file) = cache_file.as_deref().filter(|f| f.is_file()) {
            // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output: only this
            // agent writes its cache directory (0700, under its data dir), each file complete
            // (written to a temporary name, then renamed) and named by the hash of the module it
            // was compiled from; wasmtime itself checks its version and the engine's settings.
            match unsafe { Module::deserialize_file(&self.engine, file) } {
                Ok(module) => {
                    self.cached.fetch_add(1, Ordering::SeqCst);
                    return Ok((module, true));
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cached module refused; compiling it again");
                    let _ = std::fs::remove_file(file);
                }
            }
        }
        let module =
            Module::from_binary(&self.engine, &bytes).map_err(|e| wasm_err(format!("compiling the module {}", path.display()), e))?;
        self.compiled.fetch_add(1, Ordering::SeqCst);
        if let (Some(file), Some(dir)) = (cache_file, self.cache_dir.as_deref()) {
            if let Err(e) = store_cache(dir, &file, &module) {
                tracing::warn!(file = %file.display(), error = %e, "caching the compiled module failed");
            }
        }
        Ok((module, false))
    }
}

/// Writes the compiled module to `file` (a temporary file renamed into place).
fn store_cache(dir: &Path, file: &Path, module: &Module) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| e.to_string())?;
    let code = module.serialize().map_err(|e| e.to_string())?;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".tmp.{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&tmp, &code).and_then(|()| std::fs::rename(&tmp, file)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}

/// The module's path on the host: relative ones are in the task dir.
fn module_path(spec: &TaskSpec) -> Result<PathBuf, DriverError> {
    let module = spec.module.as_str();
    if module.is_empty() {
        return Err(DriverError::Wasm("no module given (config.module)".into()));
    }
    let path = Path::new(module);
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(DriverError::Wasm(format!("module path {module:?} must not contain `..`")));
    }
    Ok(if path.is_absolute() { path.to_path_buf() } else { spec.task_dir.join(path) })
}

/// The task's memory cap in MiB: `memory_max`, else `memory`.
fn memory_mib(spec: &TaskSpec) -> u64 {
    match &spec.resources {
        Some(r) if r.memory_max_mib > 0 => r.memory_max_mib,
        Some(r) if r.memory_mib > 0 => r.memory_mib,
        _ => DEFAULT_MEMORY_MIB,
    }
}

/// A stdout or stderr stream of a module into the task's rotated log files.
#[derive(Clone)]
struct LogStream(Arc<Mutex<RotatingWriter>>);

impl LogStream {
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut w) => w.write_all(bytes),
            Err(_) => Err(std::io::Error::other("log writer poisoned")),
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait]
impl wasmtime_wasi::p2::Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl wasmtime_wasi::p2::OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        LogStream::write(self, &bytes).map_err(|e| wasmtime_wasi::p2::StreamError::LastOperationFailed(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.write(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The WASI context of a task (blocking: opens log files and directories).
fn wasi_ctx(spec: &TaskSpec, module: &Path) -> Result<WasiP1Ctx, DriverError> {
    let open = |stderr| {
        RotatingWriter::open(&spec.log_dir, &log_base(&spec.name, stderr), spec.log_max_file_bytes, spec.log_max_files)
            .map(|w| LogStream(Arc::new(Mutex::new(w))))
            .map_err(|source| DriverError::Logs { dir: spec.log_dir.clone(), source })
    };
    let mut b = WasiCtxBuilder::new();
    b.stdout(open(false)?).stderr(open(true)?);
    let argv0 = module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.module.clone());
    b.arg(argv0);
    for a in &spec.args {
        b.arg(a);
    }
    let mut env: BTreeMap<String, String> = spec.env.clone();
    env.insert("MLP_TASK_DIR".into(), "/local".into());
    env.insert("MLP_ALLOC_DIR".into(), "/alloc".into());
    for (k, v) in &env {
        b.env(k, v);
    }
    let secrets = spec.task_dir.join("secrets");
    for (host, guest) in [(&spec.work_dir, "/local"), (&spec.alloc_shared_dir, "/alloc"), (&secrets, "/secrets")] {
        if !host.is_dir() {
            continue;
        }
        b.preopened_dir(host, guest, FsPerms::ReadWrite).map_err(|e| wasm_err(format!("opening {} for the module", host.display()), e))?;
    }
    Ok(b.build_p1())
}

/// How a module's run ended: its status and, for a trap or a limit, why.
#[derive(Debug, Clone, Default)]
struct Done {
    status: ExitStatus,
    reason: Option<String>,
}

#[async_trait]
impl Driver for WasmDriver {
    fn name(&self) -> &'static str {
        driver_names::WASM
    }

    async fn start(&self, spec: &TaskSpec) -> Result<Box<dyn TaskHandle>, DriverError> {
        crate::paths::check_task_name(&spec.name)?;
        if let Some(v) = spec.volumes.first() {
            return Err(DriverError::Wasm(format!(
                "the wasm driver cannot mount host volumes (volume {:?}); run the task with exec, oci or raw_exec",
                v.label
            )));
        }
        let path = module_path(spec)?;
        let t0 = Instant::now();
        let (module, cached, wasi) = {
            let (inner, spec, path) = (self.inner.clone(), spec.clone(), path.clone());
            tokio::task::spawn_blocking(move || -> Result<_, DriverError> {
                let (module, cached) = inner.load(&path)?;
                let wasi = wasi_ctx(&spec, &path)?;
                Ok((module, cached, wasi))
            })
            .await
            .map_err(|e| wasm_err("loading the module", e))??
        };
        let loaded_us = t0.elapsed().as_micros();
        let pre = self.inner.linker.instantiate_pre(&module).map_err(|e| wasm_err(format!("linking {}", path.display()), e))?;
        let limit_mib = memory_mib(spec);
        let refused = Arc::new(AtomicU64::new(0));
        let limits = MemoryCap {
            max_bytes: usize::try_from(limit_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            limit_mib,
            used: 0,
            refused: refused.clone(),
        };
        let (sig_tx, sig_rx) = watch::channel(0i32);
        let (done_tx, done_rx) = watch::channel::<Option<Done>>(None);
        let (started_tx, started_rx) = oneshot::channel::<Result<(), String>>();
        let run = Run { engine: self.inner.engine.clone(), pre, data: WasmTask { wasi, limits }, signal: sig_rx, refused, limit_mib };
        let ticker = self.inner.ticker.clone();
        std::thread::Builder::new()
            .name(format!("wasm-{}", spec.name))
            .spawn(move || {
                let _ticking = ticker.hold();
                let done = run.run(started_tx);
                done_tx.send_replace(Some(done));
            })
            .map_err(|e| wasm_err("starting the module's thread", e))?;
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(DriverError::Wasm(format!("instantiating {}: {why}", path.display()))),
            Err(_) => return Err(DriverError::Wasm(format!("instantiating {}: its thread ended", path.display()))),
        }
        tracing::debug!(task = %spec.name, module = %path.display(), cached, load_us = loaded_us as u64,
            start_us = t0.elapsed().as_micros() as u64, memory_mib = limit_mib, "wasm module started");
        Ok(Box::new(WasmHandle { signal: sig_tx, done: done_rx }))
    }

    fn reattach(&self, task_dir: &Path, _record: &super::supervised::TaskRecord) -> Result<Box<dyn TaskHandle>, DriverError> {
        Err(DriverError::Reattach { dir: task_dir.to_path_buf(), reason: "a wasm task runs inside the agent and ends with it".into() })
    }
}

/// One module's run, moved onto its own thread.
struct Run {
    engine: Engine,
    pre: InstancePre<WasmTask>,
    data: WasmTask,
    signal: watch::Receiver<i32>,
    refused: Arc<AtomicU64>,
    limit_mib: u64,
}

impl Run {
    /// Instantiates the module (reporting that on `started`), runs `_start` to its end or
    /// until the task is signalled, and says how it ended.
    fn run(self, started: oneshot::Sender<Result<(), String>>) -> Done {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = started.send(Err(format!("cannot build the module's runtime: {e}")));
                return Done::default();
            }
        };
        let Run { engine, pre, data, mut signal, refused, limit_mib } = self;
        let outcome =
            rt.block_on(async {
                let mut store = Store::new(&engine, data);
                store.limiter(|t| &mut t.limits);
                store.set_epoch_deadline(1);
                let sig = signal.clone();
                store.epoch_deadline_callback(move |_| {
                    if *sig.borrow() != 0 {
                        Ok(UpdateDeadline::Interrupt)
                    } else {
                        Ok(UpdateDeadline::Yield(1))
                    }
                });
                let instance = match pre.instantiate_async(&mut store).await {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = started.send(Err(describe(&e)));
                        return None;
                    }
                };
                let entry = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = started.send(Err(format!("no `_start` function (not a WASI command): {e}")));
                        return None;
                    }
                };
                let _ = started.send(Ok(()));
                tokio::select! {
                    r = entry.call_async(&mut store, ()) => Some(r),
                    _ = signal.wait_for(|s| *s != 0) => Some(Err(wasmtime::Error::msg("signalled"))),
                }
            });
        let sig = *signal.borrow();
        let asked = refused.load(Ordering::SeqCst);
        match outcome {
            None => Done::default(),
            Some(Ok(())) => Done { status: ExitStatus { code: Some(0), ..Default::default() }, reason: None },
            Some(Err(e)) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    Done { status: ExitStatus { code: Some(exit.0), ..Default::default() }, reason: None }
                } else if sig != 0 {
                    Done { status: ExitStatus { signal: Some(sig), ..Default::default() }, reason: None }
                } else if asked > 0 {
                    let why = MemoryLimit { limit_mib, asked_mib: asked.div_ceil(1 << 20) };
                    Done { status: ExitStatus { oom_limit_mib: Some(limit_mib), ..Default::default() }, reason: Some(why.to_string()) }
                } else {
                    Done { status: ExitStatus::default(), reason: Some(describe(&e)) }
                }
            }
        }
    }
}

/// A wasmtime error as one line: the trap's reason when it is one.
fn describe(e: &wasmtime::Error) -> String {
    if let Some(limit) = e.downcast_ref::<MemoryLimit>() {
        return limit.to_string();
    }
    match e.downcast_ref::<Trap>() {
        Some(trap) => format!("wasm trap: {trap}"),
        None => e.to_string(),
    }
}

/// A running wasm task.
struct WasmHandle {
    signal: watch::Sender<i32>,
    done: watch::Receiver<Option<Done>>,
}

#[async_trait]
impl TaskHandle for WasmHandle {
    /// No process of its own: 0.
    fn pid(&self) -> u32 {
        0
    }

    async fn wait(&mut self) -> ExitStatus {
        match self.done.wait_for(Option::is_some).await {
            Ok(done) => done.as_ref().map(|d| d.status).unwrap_or_default(),
            Err(_) => ExitStatus::default(),
        }
    }

    /// Any signal ends the module at its next epoch tick (it cannot handle signals).
    fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        self.signal.send_if_modified(|s| {
            if *s == 0 {
                *s = sig as i32;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn exit_reason(&self) -> Option<String> {
        self.done.borrow().as_ref().and_then(|d| d.reason.clone())
    }
}
