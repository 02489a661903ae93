//! The task runner: drives one task through its lifecycle (received → started → exited →
//! restart decision, stop, max run duration) via a [`Driver`], and emits every state change.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::consts::{task_event, task_state};
use mlp_proto::v1::{RestartPolicy, Task, TaskEvent, TaskState};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::restart::{decide, fmt_duration_ms, RestartDecision, RestartTracker};
use crate::driver::{proc_start_time, Driver, ExitStatus, TaskHandle, TaskSpec};
use crate::isolation::phases::Phases;

/// A running task's process, recognisable after an agent restart (persisted with its
/// allocation's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcRecord {
    /// Pid (= process group id).
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat at start.
    pub start_time: u64,
}

/// Events kept per task.
pub const MAX_EVENTS: usize = 20;
/// How often a running task's cgroup statistics are sampled and reported.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(10);

/// A usage report from cgroup statistics; `last` carries the previous CPU sample so the CPU
/// percentage covers the interval since.
pub fn usage_of(stats: &crate::isolation::cgroups::Stats, last: &mut Option<(u64, std::time::Instant)>) -> mlp_proto::v1::TaskUsage {
    let now = std::time::Instant::now();
    let cpu_percent = match *last {
        Some((cpu, at)) => {
            let wall = now.duration_since(at).as_nanos() as f64;
            if wall > 0.0 {
                stats.cpu_total_ns.saturating_sub(cpu) as f64 * 100.0 / wall
            } else {
                0.0
            }
        }
        None => 0.0,
    };
    *last = Some((stats.cpu_total_ns, now));
    mlp_proto::v1::TaskUsage {
        sampled_at_ms: now_ms(),
        cpu_percent,
        cpu_total_ns: stats.cpu_total_ns,
        cpu_throttled_ns: stats.cpu_throttled_ns,
        memory_rss_bytes: stats.memory_rss_bytes,
        memory_cache_bytes: stats.memory_cache_bytes,
        memory_max_usage_bytes: stats.memory_max_usage_bytes,
        pids: stats.pids,
        ..Default::default()
    }
}

/// Kill timeout used when a task sets none.
pub const DEFAULT_KILL_TIMEOUT_MS: u64 = 5_000;

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Appends an event, keeping the newest [`MAX_EVENTS`].
pub fn push_event<'a>(st: &'a mut TaskState, kind: &str, message: impl Into<String>) -> &'a mut TaskEvent {
    st.events.push(TaskEvent { r#type: kind.to_string(), time_ms: now_ms(), message: message.into(), exit_code: None, signal: 0 });
    if st.events.len() > MAX_EVENTS {
        let extra = st.events.len() - MAX_EVENTS;
        st.events.drain(..extra);
    }
    let last = st.events.len() - 1;
    &mut st.events[last]
}

/// Everything a task runner needs.
#[derive(Clone)]
pub struct TaskContext {
    /// Allocation id.
    pub alloc_id: String,
    /// Allocation name (job.group[index]).
    pub alloc_name: String,
    /// Allocation index.
    pub alloc_index: u32,
    /// Job name.
    pub job_name: String,
    /// Job type (batch | service).
    pub job_type: String,
    /// Group name.
    pub group_name: String,
    /// `data_dir/allocs/<id>`.
    pub alloc_dir: PathBuf,
    /// The task.
    pub task: Task,
    /// The group's restart policy.
    pub restart: RestartPolicy,
    /// The task's driver; None when this agent lacks it.
    pub driver: Option<Arc<dyn Driver>>,
    /// Log rotation size.
    pub log_max_file_bytes: u64,
    /// Log files kept per stream.
    pub log_max_files: u32,
    /// The task's GPUs, out of its allocation's (`crate::gpu::task_gpus`).
    pub gpus: crate::gpu::TaskGpus,
    /// NVML, when the node's GPUs are real (the task's GPU usage).
    pub nvml: Option<crate::gpu::nvml::NvmlGpus>,
    /// Devices NVML reported unhealthy: id → reason.
    pub gpu_health: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>,
    /// The agent's MPS daemons: a share of a real device runs as a client of its device's
    /// (`crate::gpu::mps::shared_device`); None fails such a task's start.
    pub mps: Option<Arc<crate::gpu::mps::MpsManager>>,
    /// Its first start's phases so far (the allocation's receipt, the alloc runner), which
    /// the driver continues; later starts are timed from the task runner.
    pub phases: Phases,
    /// Variables of the allocation's ports and gang rendezvous (`MLP_PORT_*`, `RANK`, ...).
    pub net_env: std::collections::BTreeMap<String, String>,
    /// `MLP_META_<key>` of the job's, group's and task's `meta` (issue 16 §2).
    pub meta_env: std::collections::BTreeMap<String, String>,
    /// The allocation's bridge-mode network, which the task joins.
    pub network: Option<crate::network::TaskNetwork>,
    /// Where the task's `artifact` blocks may fetch from, and the limits.
    pub artifacts: std::sync::Arc<crate::artifact::ArtifactSettings>,
    /// The task's host volumes resolved through the agent's configuration
    /// (`crate::volumes::resolve`), or why they cannot be: then the task fails to start.
    pub volumes: Result<Vec<crate::volumes::VolumeBind>, String>,
    /// `MLFLOW_TRACKING_URI` and `MLFLOW_RUN_CONTEXT` (`crate::tracking`), under the task's
    /// own env.
    pub tracking_env: std::collections::BTreeMap<String, String>,
}

impl TaskContext {
    /// `<alloc_dir>/<task>`.
    pub fn task_dir(&self) -> PathBuf {
        self.alloc_dir.join(&self.task.name)
    }

    /// The driver spec for this task.
    pub fn spec(&self) -> TaskSpec {
        let task_dir = self.task_dir();
        let local = task_dir.join("local");
        let log_dir = task_dir.join("logs");
        let mut env = self.task.env.clone();
        let alloc_shared = self.alloc_dir.join("alloc");
        for (k, v) in [
            ("MLP_ALLOC_ID", self.alloc_id.clone()),
            ("MLP_ALLOC_NAME", self.alloc_name.clone()),
            ("MLP_ALLOC_INDEX", self.alloc_index.to_string()),
            ("MLP_JOB_NAME", self.job_name.clone()),
            ("MLP_GROUP_NAME", self.group_name.clone()),
            ("MLP_TASK_NAME", self.task.name.clone()),
            ("MLP_ALLOC_DIR", alloc_shared.to_string_lossy().into_owned()),
            // exec overrides the two directories with their paths inside the task's root.
            ("MLP_TASK_DIR", local.to_string_lossy().into_owned()),
        ] {
            env.insert(k.to_string(), v);
        }
        for (k, v) in self.meta_env.iter().chain(&self.net_env) {
            env.insert(k.clone(), v.clone());
        }
        // Over the task's own env: a task cannot widen its GPU assignment.
        for (k, v) in crate::gpu::gpu_env(&self.gpus) {
            env.insert(k.to_string(), v);
        }
        let config = self.task.config.clone().unwrap_or_default();
        // The driver config's env (wasm) lies under the task's own and the MLP_* variables.
        for (k, v) in config.env {
            env.entry(k).or_insert(v);
        }
        for (k, v) in &self.tracking_env {
            env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        TaskSpec {
            name: self.task.name.clone(),
            command: config.command,
            args: config.args,
            module: config.module,
            image: config.image,
            entrypoint: config.entrypoint,
            image_work_dir: config.work_dir,
            registry_auth: config.auth.map(|a| crate::image::Credentials { username: a.username, password: a.password }),
            progress: None,
            env,
            work_dir: local,
            log_dir,
            log_max_file_bytes: self.log_max_file_bytes,
            log_max_files: self.log_max_files,
            resources: self.task.resources.clone(),
            alloc_id: self.alloc_id.clone(),
            task_dir,
            alloc_shared_dir: alloc_shared,
            hostname: crate::isolation::hostname_for(&self.group_name, self.alloc_index, &self.alloc_id),
            user: self.task.user.clone(),
            network_mode: self.task.network_mode.clone(),
            network: self.network.clone(),
            gpus: self.gpus.clone(),
            rw_paths: Vec::new(),
            volumes: self.volumes.clone().unwrap_or_default(),
            phases: Phases::default(),
        }
    }

    fn kill_timeout_ms(&self) -> u64 {
        if self.task.kill_timeout_ms == 0 {
            DEFAULT_KILL_TIMEOUT_MS
        } else {
            self.task.kill_timeout_ms
        }
    }
}

/// One emitted state change of a task.
#[derive(Debug, Clone)]
pub struct TaskUpdate {
    /// Task name.
    pub task: String,
    /// Its full state.
    pub state: TaskState,
    /// Its process, while running.
    pub proc: Option<ProcRecord>,
}

/// Resolves when stop is asked for; never when the sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

enum Outcome {
    Exited(ExitStatus),
    Stop,
    MaxRun,
}

/// SIGTERM to the group, SIGKILL after the kill timeout; returns how the task ended.
async fn kill_task(handle: &mut dyn TaskHandle, kill_timeout_ms: u64) -> ExitStatus {
    if let Err(e) = handle.signal(Signal::SIGTERM) {
        tracing::warn!(pid = handle.pid(), error = %e, "SIGTERM failed");
    }
    match tokio::time::timeout(Duration::from_millis(kill_timeout_ms), handle.wait()).await {
        Ok(ex) => ex,
        Err(_) => {
            if let Err(e) = handle.signal(Signal::SIGKILL) {
                tracing::warn!(pid = handle.pid(), error = %e, "SIGKILL failed");
            }
            handle.wait().await
        }
    }
}

/// Runs a task to its end, sending every state change on `tx`. `initial` is the state
/// remembered from before an agent restart, if any. Returns the final state.
pub async fn run_task(
    ctx: TaskContext,
    initial: Option<TaskState>,
    stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<TaskUpdate>,
) -> TaskState {
    run_task_attached(ctx, initial, None, stop, tx).await
}

/// [`run_task`] for a task that may already run: `attached` is the handle of a task a previous
/// agent run started (reattached), which the runner watches instead of starting the task (its
/// state, restart count included, carries on from `initial`).
///
/// A share of a real device holds its device's MPS daemon from its first start (or reattach)
/// until it ends for good (restarts keep it), so that the daemon outlives none of its clients
/// and stops after the last.
pub async fn run_task_attached(
    ctx: TaskContext,
    initial: Option<TaskState>,
    attached: Option<Box<dyn TaskHandle>>,
    stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<TaskUpdate>,
) -> TaskState {
    let mut mps: Option<MpsHold> = None;
    let st = run_task_holding(&ctx, initial, attached, stop, tx, &mut mps).await;
    if let Some(hold) = mps {
        hold.manager.release(&hold.uuid).await;
    }
    st
}

/// A task's hold on its device's MPS daemon.
struct MpsHold {
    manager: Arc<crate::gpu::mps::MpsManager>,
    uuid: String,
    client: crate::gpu::mps::MpsClient,
}

/// Takes the task's hold on its device's MPS daemon if it shares a real device and holds none
/// yet. Err: why the task cannot start.
async fn hold_mps(ctx: &TaskContext, mps: &mut Option<MpsHold>) -> Result<(), String> {
    let Some(uuid) = crate::gpu::mps::shared_device(&ctx.gpus) else { return Ok(()) };
    if mps.is_some() {
        return Ok(());
    }
    let Some(manager) = ctx.mps.clone() else {
        return Err(format!("GPU share of {uuid} needs MPS, and this agent runs no MPS manager"));
    };
    let client = manager.acquire(uuid).await.map_err(|e| e.to_string())?;
    *mps = Some(MpsHold { manager, uuid: uuid.to_string(), client });
    Ok(())
}

async fn run_task_holding(
    ctx: &TaskContext,
    initial: Option<TaskState>,
    mut attached: Option<Box<dyn TaskHandle>>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<TaskUpdate>,
    mps: &mut Option<MpsHold>,
) -> TaskState {
    let name = ctx.task.name.clone();
    let emit = |st: &TaskState, proc: Option<ProcRecord>| {
        let _ = tx.send(TaskUpdate { task: name.clone(), state: st.clone(), proc });
    };
    let mut st = initial.unwrap_or_default();
    if st.state == task_state::DEAD && attached.is_none() {
        emit(&st, None);
        return st;
    }
    if st.events.is_empty() {
        st.state = task_state::PENDING.into();
        push_event(&mut st, task_event::RECEIVED, "Task received by client");
        emit(&st, None);
    }
    let mut tracker = RestartTracker { count: 0, interval_start_ms: now_ms() };
    let mut first_phases = Some(ctx.phases.clone());
    // Artifacts are fetched once per run of the task (not again on a restart), and never for a
    // task reattached after an agent restart (it has them).
    let mut artifacts_fetched = attached.is_some() || ctx.task.artifacts.is_empty();
    loop {
        if attached.is_none() && *stop.borrow() {
            st.state = task_state::DEAD.into();
            st.pid = 0;
            st.finished_at_ms = now_ms();
            push_event(&mut st, task_event::KILLED, "Task stopped before it started");
            emit(&st, None);
            return st;
        }
        if let Err(why) = hold_mps(ctx, mps).await {
            tracing::warn!(alloc = %ctx.alloc_id, task = %name, why, "task cannot start");
            if let Some(mut h) = attached.take() {
                // A reattached share whose daemon is gone runs unenforced: it is stopped.
                let _ = kill_task(h.as_mut(), ctx.kill_timeout_ms()).await;
            }
            return fail_start(&mut st, why, &emit);
        }
        let mut handle = match attached.take() {
            Some(handle) => {
                // Reattached after an agent restart: the task kept running (or ended meanwhile,
                // which `wait` reports at once).
                let pid = handle.pid();
                st.state = task_state::RUNNING.into();
                st.pid = pid;
                if st.started_at_ms == 0 {
                    st.started_at_ms = now_ms();
                }
                let proc = proc_start_time(pid).map(|start_time| ProcRecord { pid, start_time });
                emit(&st, proc);
                tracing::info!(alloc = %ctx.alloc_id, task = %name, pid, "task reattached");
                handle
            }
            None => {
                let Some(driver) = ctx.driver.clone() else {
                    let msg = format!("driver {:?} is not available on this node", ctx.task.driver);
                    return fail_start(&mut st, msg, &emit);
                };
                if let Err(e) = &ctx.volumes {
                    tracing::warn!(alloc = %ctx.alloc_id, task = %name, error = %e, "host volume unavailable");
                    return fail_start(&mut st, format!("host volume unavailable: {e}"), &emit);
                }
                if !artifacts_fetched {
                    push_event(&mut st, task_event::DOWNLOADING_ARTIFACTS, format!("fetching {} artifact(s)", ctx.task.artifacts.len()));
                    emit(&st, None);
                    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
                    let report = move |line: String| {
                        let _ = lines_tx.send(line);
                    };
                    let task_dir = ctx.alloc_dir.join(&ctx.task.name);
                    let fetched = crate::artifact::fetch_all(&ctx.artifacts, &task_dir, &ctx.task.artifacts, &report).await;
                    while let Ok(line) = lines_rx.try_recv() {
                        push_event(&mut st, task_event::DOWNLOADING_ARTIFACTS, line);
                    }
                    if let Err(e) = fetched {
                        tracing::warn!(alloc = %ctx.alloc_id, task = %name, error = %e, "artifact download failed");
                        st.state = task_state::DEAD.into();
                        st.failed = true;
                        st.pid = 0;
                        st.finished_at_ms = now_ms();
                        push_event(&mut st, task_event::ARTIFACT_FAILED, e.to_string());
                        emit(&st, None);
                        return st;
                    }
                    artifacts_fetched = true;
                }
                let mut spec = ctx.spec();
                if let Some(hold) = mps.as_ref() {
                    for (k, v) in hold.client.env() {
                        spec.env.insert(k.to_string(), v);
                    }
                    spec.rw_paths.push(hold.client.pipe_dir.clone());
                }
                let mut phases = first_phases.take().unwrap_or_else(Phases::start);
                phases.mark("task_runner");
                spec.phases = phases;
                // What the driver reports before the task runs (an image pull) becomes events.
                let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<String>();
                spec.progress = Some(progress_tx);
                let started = {
                    let start = driver.start(&spec);
                    tokio::pin!(start);
                    loop {
                        tokio::select! {
                            r = &mut start => break r,
                            Some(message) = progress_rx.recv() => {
                                push_event(&mut st, task_event::DRIVER, message);
                                emit(&st, None);
                            }
                        }
                    }
                };
                while let Ok(message) = progress_rx.try_recv() {
                    push_event(&mut st, task_event::DRIVER, message);
                }
                let handle = match started {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(alloc = %ctx.alloc_id, task = %name, error = %e, "task failed to start");
                        return fail_start(&mut st, format!("failed to start task: {e}"), &emit);
                    }
                };
                let pid = handle.pid();
                st.state = task_state::RUNNING.into();
                st.pid = pid;
                st.started_at_ms = now_ms();
                st.finished_at_ms = 0;
                st.exit_code = None;
                push_event(&mut st, task_event::STARTED, "Task started by client");
                let proc = proc_start_time(pid).map(|start_time| ProcRecord { pid, start_time });
                emit(&st, proc);
                tracing::info!(alloc = %ctx.alloc_id, task = %name, pid, "task started");
                handle
            }
        };
        let pid = handle.pid();
        let proc = proc_start_time(pid).map(|start_time| ProcRecord { pid, start_time });

        let max_run = ctx.task.max_run_duration_ms;
        // A reattached task has been running since it started, not since the agent did.
        let ran_ms = now_ms().saturating_sub(st.started_at_ms);
        let outcome = {
            let max_run_timer = async {
                if max_run > 0 {
                    tokio::time::sleep(Duration::from_millis(max_run.saturating_sub(ran_ms))).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::pin!(max_run_timer);
            let mut sample = tokio::time::interval_at(tokio::time::Instant::now() + USAGE_INTERVAL, USAGE_INTERVAL);
            let mut last_cpu: Option<(u64, std::time::Instant)> = None;
            let gpu_ids: Vec<String> = ctx.gpus.devices.iter().map(|a| a.id.clone()).collect();
            // Health is published per device and, for a lost GPU, per physical GPU: a task on
            // one of its MIG instances watches the parent too.
            let watched: BTreeSet<String> = gpu_ids
                .iter()
                .cloned()
                .chain(ctx.gpus.node_devices.iter().filter(|d| !d.parent_id.is_empty()).map(|d| d.parent_id.clone()))
                .collect();
            // None once the agent's health publisher is gone (nothing more will change).
            let mut health = (!gpu_ids.is_empty()).then(|| ctx.gpu_health.clone());
            let mut reported: BTreeSet<String> = BTreeSet::new();
            loop {
                // A device of this task that became unhealthy is an event on the task.
                let bad: Vec<(String, String)> = match health.as_mut() {
                    Some(h) => h
                        .borrow_and_update()
                        .iter()
                        .filter(|(id, _)| watched.contains(*id) && !reported.contains(*id))
                        .map(|(id, why)| (id.clone(), why.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                for (id, why) in bad {
                    push_event(&mut st, task_event::GPU_UNHEALTHY, format!("GPU {id} is unhealthy: {why}"));
                    reported.insert(id);
                    emit(&st, proc);
                }
                tokio::select! {
                    ex = handle.wait() => break Outcome::Exited(ex),
                    _ = stopped(&mut stop) => break Outcome::Stop,
                    _ = &mut max_run_timer => break Outcome::MaxRun,
                    changed = async {
                        match health.as_mut() {
                            Some(h) => h.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if changed.is_err() {
                            health = None;
                        }
                    }
                    _ = sample.tick() => {
                        // The cgroup's figures (isolated tasks), and NVML's for a task with
                        // real GPUs (raw_exec ones too: their processes are found by group).
                        let stats = handle.stats();
                        let gpu = match (&ctx.nvml, gpu_ids.is_empty() || ctx.gpus.simulated) {
                            (Some(nvml), false) => {
                                let pids: BTreeSet<u32> = handle.pids().into_iter().collect();
                                let (nvml, ids) = (nvml.clone(), gpu_ids.clone());
                                // A hung NVML call must not hold up stops and kills: give up on it.
                                let query = tokio::task::spawn_blocking(move || nvml.usage_of(&ids, &pids));
                                tokio::time::timeout(Duration::from_secs(2), query).await.ok().and_then(Result::ok)
                            }
                            _ => None,
                        };
                        if stats.is_none() && gpu.is_none() {
                            continue;
                        }
                        let mut usage = match &stats {
                            Some(stats) => usage_of(stats, &mut last_cpu),
                            None => mlp_proto::v1::TaskUsage { sampled_at_ms: now_ms(), ..Default::default() },
                        };
                        if let Some((util, mem)) = gpu {
                            usage.gpu_utilization_percent = util;
                            usage.gpu_memory_used_mib = mem;
                        }
                        st.usage = Some(usage);
                        emit(&st, proc);
                    }
                }
            }
        };
        let kill_timeout = ctx.kill_timeout_ms();
        match outcome {
            Outcome::Stop | Outcome::MaxRun => {
                let failed = matches!(outcome, Outcome::MaxRun);
                if failed {
                    push_event(&mut st, task_event::MAX_RUN_DURATION, format!("exceeded max_run_duration of {}", fmt_duration_ms(max_run)));
                }
                push_event(&mut st, task_event::KILLING, format!("sent SIGTERM, kill_timeout {}", fmt_duration_ms(kill_timeout)));
                emit(&st, proc);
                let ex = kill_task(handle.as_mut(), kill_timeout).await;
                st.usage = None;
                st.state = task_state::DEAD.into();
                st.failed = failed;
                st.pid = 0;
                st.exit_code = ex.code;
                st.finished_at_ms = now_ms();
                let ev = push_event(&mut st, task_event::KILLED, format!("Task killed ({ex})"));
                ev.exit_code = ex.code;
                ev.signal = ex.signal.unwrap_or(0);
                emit(&st, None);
                tracing::info!(alloc = %ctx.alloc_id, task = %name, "task killed");
                return st;
            }
            Outcome::Exited(ex) => {
                st.pid = 0;
                st.usage = None;
                st.exit_code = ex.code;
                st.finished_at_ms = now_ms();
                let mut message = match ex.oom_limit_mib {
                    Some(_) => ex.to_string(),
                    None => format!("Exit Code: {}, Signal: {}", ex.code.unwrap_or(-1), ex.signal.unwrap_or(0)),
                };
                if let Some(reason) = handle.exit_reason() {
                    message = format!("{message}: {reason}");
                }
                let ev = push_event(&mut st, task_event::EXITED, message);
                ev.exit_code = ex.code;
                ev.signal = ex.signal.unwrap_or(0);
                tracing::info!(alloc = %ctx.alloc_id, task = %name, status = %ex, "task exited");
                let (decision, next) = decide(&ctx.job_type, ex.success(), &ctx.restart, tracker, now_ms());
                tracker = next;
                match decision {
                    RestartDecision::Done => {
                        st.state = task_state::DEAD.into();
                        emit(&st, None);
                        return st;
                    }
                    RestartDecision::Fail { message } => {
                        st.state = task_state::DEAD.into();
                        st.failed = true;
                        push_event(&mut st, task_event::NOT_RESTARTING, message);
                        emit(&st, None);
                        return st;
                    }
                    RestartDecision::Restart { delay_ms } => {
                        st.state = task_state::PENDING.into();
                        push_event(&mut st, task_event::RESTARTING, format!("restarting in {}", fmt_duration_ms(delay_ms)));
                        emit(&st, None);
                        let stop_now = tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => false,
                            _ = stopped(&mut stop) => true,
                        };
                        if stop_now {
                            st.state = task_state::DEAD.into();
                            push_event(&mut st, task_event::KILLED, "Task stopped while waiting to restart");
                            emit(&st, None);
                            return st;
                        }
                        st.restarts += 1;
                    }
                }
            }
        }
    }
}

fn fail_start(st: &mut TaskState, message: String, emit: &impl Fn(&TaskState, Option<ProcRecord>)) -> TaskState {
    st.state = task_state::DEAD.into();
    st.failed = true;
    st.pid = 0;
    st.finished_at_ms = now_ms();
    push_event(st, task_event::DRIVER_FAILURE, message);
    emit(st, None);
    st.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_capped() {
        let mut st = TaskState::default();
        for i in 0..30 {
            push_event(&mut st, task_event::STARTED, format!("{i}"));
        }
        assert_eq!(st.events.len(), MAX_EVENTS);
        assert_eq!(st.events[0].message, "10");
        assert_eq!(st.events[19].message, "29");
    }
}
