//! The alloc runner: prepares an allocation's directories, runs one task runner per task of
//! its group, derives the allocation's client status from the task states, persists it
//! (`state.json`) and emits an [`AllocClientUpdate`] on every change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mlp_proto::consts::{alloc_client, task_event, task_state};
use mlp_proto::v1::{AllocClientUpdate, Allocation, TaskGroup, TaskState};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::state::{self, AllocRegistry, AllocView, PersistedAlloc};
use crate::driver::{Driver, TaskHandle};
use crate::isolation::phases::Phases;
use crate::task::restart::default_policy;
use crate::task::runner::{now_ms, push_event, run_task_attached, TaskContext, TaskUpdate};

/// What every alloc runner shares.
#[derive(Clone)]
pub struct RunnerEnv {
    /// `data_dir/allocs`.
    pub alloc_root: PathBuf,
    /// Enabled drivers by name.
    pub drivers: BTreeMap<String, Arc<dyn Driver>>,
    /// Log rotation size.
    pub log_max_file_bytes: u64,
    /// Log files kept per stream.
    pub log_max_files: u32,
    /// Registry read by the Logs RPC.
    pub registry: AllocRegistry,
    /// The node's GPU devices (to tell tasks whether theirs are simulated).
    pub gpus: Vec<mlp_proto::v1::GpuDevice>,
    /// NVML, when the node's GPUs are real (tasks' GPU usage).
    pub nvml: Option<crate::gpu::nvml::NvmlGpus>,
    /// Devices NVML reported unhealthy: id → reason.
    pub gpu_health: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>,
    /// The MPS daemons of shared real devices; None: a share task of a real device fails to
    /// start (it never runs unenforced).
    pub mps: Option<Arc<crate::gpu::mps::MpsManager>>,
    /// Bridge-mode networks; None: a bridge-mode allocation fails (tests without one).
    pub network: Option<Arc<crate::network::NetworkManager>>,
    /// The node's address (where its host ports are reached): `MLP_IP_*` in host mode.
    pub node_address: String,
    /// This node's id (a gang's leader on this node is reached at its allocation address).
    pub node_id: String,
    /// Where tasks' `artifact` blocks may fetch from, and the limits.
    pub artifacts: Arc<crate::artifact::ArtifactSettings>,
    /// The MLflow tracking URI tasks get (issue 17 §3).
    pub tracking: crate::tracking::TrackingUri,
    /// The agent's host volumes by name (`host_volume` blocks of its configuration), which
    /// tasks' `volume_mount`s resolve through (`crate::volumes`).
    pub host_volumes: Arc<BTreeMap<String, crate::config_file::HostVolume>>,
}

/// A running alloc runner.
pub struct AllocHandle {
    stop: watch::Sender<bool>,
    join: JoinHandle<PersistedAlloc>,
}

impl AllocHandle {
    /// Asks every task to stop (SIGTERM, SIGKILL after its kill timeout).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
    /// Whether the runner has finished (every task dead, final state emitted).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
    /// Waits for the runner to finish; returns its final state.
    pub async fn wait(self) -> Option<PersistedAlloc> {
        self.join.await.ok()
    }
    /// Stops the runner's loop without touching its tasks (agent shutdown).
    pub fn abort(&self) {
        self.join.abort();
    }
}

/// The allocation's client status and description, derived from its task states.
pub fn client_status(tasks: &[String], states: &BTreeMap<String, TaskState>) -> (&'static str, String) {
    let get = |t: &String| states.get(t).cloned().unwrap_or_default();
    let failed: Vec<&String> = tasks.iter().filter(|t| get(t).failed).collect();
    let all_dead = tasks.iter().all(|t| get(t).state == task_state::DEAD);
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|s| s.as_str()).collect();
        return (alloc_client::FAILED, format!("Failed tasks: {}", names.join(", ")));
    }
    if all_dead {
        return (alloc_client::COMPLETE, "All tasks have completed".into());
    }
    let all_started = tasks.iter().all(|t| {
        let s = get(t);
        s.state == task_state::RUNNING || s.started_at_ms > 0 || s.restarts > 0 || s.state == task_state::DEAD
    });
    if all_started {
        (alloc_client::RUNNING, "Tasks are running".into())
    } else {
        (alloc_client::PENDING, "No tasks have started".into())
    }
}

fn find_group(alloc: &Allocation) -> Option<(TaskGroup, String, String)> {
    let job = alloc.job.as_ref()?;
    let g = job.groups.iter().find(|g| g.name == alloc.task_group)?;
    Some((g.clone(), job.name.clone(), job.r#type.clone()))
}

/// The update that refuses an allocation whose names cannot be used in paths: failed, with
/// the reason, and no task states (nothing ran, nothing was written).
pub fn refused_update(alloc_id: &str, why: &crate::paths::UnsafeName) -> AllocClientUpdate {
    AllocClientUpdate {
        alloc_id: alloc_id.to_string(),
        client_status: alloc_client::FAILED.into(),
        client_description: format!("refused by the agent: {why}"),
        task_states: BTreeMap::new(),
    }
}

/// Starts an alloc runner. `prior` is the state remembered from before an agent restart.
pub fn spawn_alloc_runner(
    alloc: Allocation,
    prior: Option<PersistedAlloc>,
    env: RunnerEnv,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
) -> AllocHandle {
    spawn_alloc_runner_attached(alloc, prior, BTreeMap::new(), env, updates, Phases::start())
}

/// [`spawn_alloc_runner`] with the handles of tasks a previous agent run started (reattached,
/// by task name): those tasks are watched, not started again. `received` times the tasks'
/// first starts (from the allocation's receipt; see [`Phases`]).
pub fn spawn_alloc_runner_attached(
    alloc: Allocation,
    prior: Option<PersistedAlloc>,
    attached: BTreeMap<String, Box<dyn TaskHandle>>,
    env: RunnerEnv,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
    received: Phases,
) -> AllocHandle {
    let (stop_tx, stop_rx) = watch::channel(false);
    let join = tokio::spawn(run_alloc(alloc, prior, attached, env, stop_rx, updates, received));
    AllocHandle { stop: stop_tx, join }
}

struct Reporter {
    alloc_id: String,
    dir: PathBuf,
    tasks: Vec<String>,
    persisted: PersistedAlloc,
    registry: AllocRegistry,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
    last_sent: Option<AllocClientUpdate>,
    /// What was last written to disk: a change the servers see (an event, a status) is saved,
    /// a publish that changed nothing is not.
    last_saved: Option<SavedParts>,
    /// Where the next save goes (the runner is the allocation's only writer while it runs).
    slots: state::Slots,
    /// The allocation, shared with the registry's views.
    alloc: Arc<Allocation>,
}

/// The parts of a [`PersistedAlloc`] that change while its allocation runs, as last saved.
/// Its id and allocation (with the job, most of its size) are set before the first save and
/// never change within a run, so they are neither compared again nor copied at each publish.
#[derive(PartialEq)]
struct SavedParts {
    client_status: String,
    client_description: String,
    task_states: BTreeMap<String, TaskState>,
    procs: BTreeMap<String, state::ProcRecord>,
}

impl SavedParts {
    fn of(p: &PersistedAlloc) -> SavedParts {
        SavedParts {
            client_status: p.client_status.clone(),
            client_description: p.client_description.clone(),
            task_states: p.task_states.clone(),
            procs: p.procs.clone(),
        }
    }

    fn matches(&self, p: &PersistedAlloc) -> bool {
        self.client_status == p.client_status
            && self.client_description == p.client_description
            && self.task_states == p.task_states
            && self.procs == p.procs
    }
}

impl Reporter {
    fn publish(&mut self) {
        let (status, desc) = client_status(&self.tasks, &self.persisted.task_states);
        self.persisted.client_status = status.to_string();
        self.persisted.client_description = desc.clone();
        if !self.last_saved.as_ref().is_some_and(|saved| saved.matches(&self.persisted)) {
            match self.slots.save(&self.dir, &self.persisted) {
                Ok(()) => self.last_saved = Some(SavedParts::of(&self.persisted)),
                Err(e) => tracing::warn!(alloc = %self.alloc_id, error = %e, "persisting alloc state failed"),
            }
        }
        self.registry.put(
            &self.alloc_id,
            AllocView {
                dir: self.dir.clone(),
                tasks: self.tasks.clone(),
                client_status: status.to_string(),
                task_states: self.persisted.task_states.clone(),
                alloc: Some(self.alloc.clone()),
            },
        );
        let upd = AllocClientUpdate {
            alloc_id: self.alloc_id.clone(),
            client_status: status.to_string(),
            client_description: desc,
            task_states: self.persisted.task_states.clone(),
        };
        if self.last_sent.as_ref() != Some(&upd) {
            let _ = self.updates.send(upd.clone());
            self.last_sent = Some(upd);
        }
    }
}

async fn run_alloc(
    alloc: Allocation,
    prior: Option<PersistedAlloc>,
    mut attached: BTreeMap<String, Box<dyn TaskHandle>>,
    env: RunnerEnv,
    mut stop: watch::Receiver<bool>,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
    mut phases: Phases,
) -> PersistedAlloc {
    phases.mark("alloc_runner");
    // One copy of the allocation, which the registry's views share.
    let shared = Arc::new(alloc);
    let alloc = &*shared;
    if let Err(e) = crate::paths::check_allocation(alloc) {
        // Refused before any path is built from it (the manager refuses these first; this
        // guards the runner's own callers).
        tracing::warn!(error = %e, "refusing an allocation with an unsafe name");
        let refused = refused_update(&alloc.id, &e);
        let _ = updates.send(refused.clone());
        kill_handles(attached).await;
        return PersistedAlloc {
            alloc_id: alloc.id.clone(),
            client_status: refused.client_status,
            client_description: refused.client_description,
            ..Default::default()
        };
    }
    let dir = env.alloc_root.join(&alloc.id);
    let group = find_group(alloc);
    let tasks: Vec<String> = group.as_ref().map(|(g, _, _)| g.tasks.iter().map(|t| t.name.clone()).collect()).unwrap_or_default();
    let mut persisted = prior.unwrap_or_default();
    persisted.alloc_id = alloc.id.clone();
    persisted.alloc = Some(alloc.clone());
    let mut rep = Reporter {
        alloc_id: alloc.id.clone(),
        dir: dir.clone(),
        tasks: tasks.clone(),
        persisted,
        registry: env.registry.clone(),
        updates,
        last_sent: None,
        last_saved: None,
        slots: state::Slots::default(),
        alloc: shared.clone(),
    };

    let mut setup = std::fs::create_dir_all(dir.join("alloc"));
    for t in &tasks {
        if setup.is_ok() {
            setup = std::fs::create_dir_all(dir.join(t).join("local")).and_then(|_| std::fs::create_dir_all(dir.join(t).join("logs")));
        }
        // A dispatched job's payload (issue 16 §2), in every task's `local/payload`.
        if let (Ok(()), Some(job)) = (&setup, alloc.job.as_ref().filter(|j| !j.payload.is_empty())) {
            setup = write_payload(&dir.join(t).join("local"), &job.payload);
        }
    }
    let Some((group, job_name, job_type)) = group else {
        tracing::warn!(alloc = %alloc.id, group = %alloc.task_group, "task group not found in the allocation's job");
        let _ = std::fs::create_dir_all(&dir);
        rep.persisted.client_status = alloc_client::FAILED.into();
        rep.persisted.client_description = format!("task group {:?} not found in job", alloc.task_group);
        let _ = rep.slots.save(&dir, &rep.persisted);
        let _ = rep.updates.send(AllocClientUpdate {
            alloc_id: alloc.id.clone(),
            client_status: alloc_client::FAILED.into(),
            client_description: rep.persisted.client_description.clone(),
            task_states: BTreeMap::new(),
        });
        kill_handles(std::mem::take(&mut attached)).await;
        return rep.persisted;
    };
    if let Err(e) = setup {
        tracing::warn!(alloc = %alloc.id, error = %e, "creating alloc dirs failed");
        for t in &tasks {
            let st = rep.persisted.task_states.entry(t.clone()).or_default();
            st.state = task_state::DEAD.into();
            st.failed = true;
            push_event(st, task_event::DRIVER_FAILURE, format!("failed to create alloc dir: {e}"));
        }
        rep.publish();
        kill_handles(std::mem::take(&mut attached)).await;
        return rep.persisted;
    }

    phases.mark("alloc_dirs");
    let (net_env, task_network, bridge) = match network_for(alloc, &group, &env).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(alloc = %alloc.id, error = %e, "allocation network set-up failed");
            for t in &tasks {
                let st = rep.persisted.task_states.entry(t.clone()).or_default();
                st.state = task_state::DEAD.into();
                st.failed = true;
                push_event(st, task_event::DRIVER_FAILURE, format!("network set-up failed: {e}"));
            }
            rep.publish();
            kill_handles(std::mem::take(&mut attached)).await;
            return rep.persisted;
        }
    };
    phases.mark("alloc_network");
    let restart = group.restart.clone().unwrap_or_else(|| default_policy(&job_type));
    let (kill_tx, kill_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel::<TaskUpdate>();
    let mut joins = Vec::new();
    for task in &group.tasks {
        let ctx = TaskContext {
            alloc_id: alloc.id.clone(),
            alloc_name: alloc.name.clone(),
            alloc_index: alloc.index,
            job_name: job_name.clone(),
            job_type: job_type.clone(),
            group_name: group.name.clone(),
            alloc_dir: dir.clone(),
            task: task.clone(),
            restart: restart.clone(),
            driver: env.drivers.get(&task.driver).cloned(),
            log_max_file_bytes: env.log_max_file_bytes,
            log_max_files: env.log_max_files,
            gpus: crate::gpu::task_gpus(&group, &task.name, alloc.resources.as_ref(), &env.gpus),
            nvml: env.nvml.clone(),
            gpu_health: env.gpu_health.clone(),
            mps: env.mps.clone(),
            phases: phases.clone(),
            net_env: net_env.clone(),
            meta_env: meta_env(alloc.job.as_ref(), &group, task),
            network: task_network.as_ref().map(|n| n.task_network(&crate::isolation::hostname_for(&group.name, alloc.index, &alloc.id))),
            artifacts: env.artifacts.clone(),
            volumes: crate::volumes::resolve(&group, task, &env.host_volumes, |p| p.is_dir()).map_err(|e| e.to_string()),
            tracking_env: {
                let lineage = crate::tracking::Lineage {
                    job: job_name.clone(),
                    job_version: alloc.job_version,
                    namespace: alloc.job.as_ref().map(|j| j.namespace.clone()).unwrap_or_default(),
                    group: group.name.clone(),
                    alloc_id: alloc.id.clone(),
                    alloc_name: alloc.name.clone(),
                    task: task.name.clone(),
                    node_id: env.node_id.clone(),
                };
                let mut vars = BTreeMap::new();
                crate::tracking::add_task_env(&mut vars, env.tracking.current(), &lineage);
                vars
            },
        };
        let initial = rep.persisted.task_states.get(&task.name).cloned();
        joins.push(AbortOnDrop(tokio::spawn(run_task_attached(ctx, initial, attached.remove(&task.name), kill_rx.clone(), tx.clone()))));
    }
    drop(tx);
    drop(kill_rx);
    // Tasks of a previous run that are no longer in the group.
    kill_handles(std::mem::take(&mut attached)).await;

    let mut stop_seen = false;
    // `shutdown_delay`: the servers deregister a stopped allocation's services when they stop
    // it; its tasks are signalled this much later, so that clients stop sending it traffic first.
    let shutdown_delay = std::time::Duration::from_millis(group.shutdown_delay_ms);
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        let upd = tokio::select! {
            u = rx.recv() => u,
            r = stop.wait_for(|v| *v), if !stop_seen => {
                stop_seen = true;
                if r.is_ok() {
                    if shutdown_delay.is_zero() {
                        tracing::info!(alloc = %alloc.id, "stopping allocation");
                        let _ = kill_tx.send(true);
                    } else {
                        tracing::info!(alloc = %alloc.id, delay_ms = group.shutdown_delay_ms, "stopping allocation after its shutdown delay");
                        kill_at = Some(tokio::time::Instant::now() + shutdown_delay);
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                tracing::info!(alloc = %alloc.id, "stopping allocation");
                let _ = kill_tx.send(true);
                continue;
            }
        };
        let Some(mut upd) = upd else { break };
        // Drain whatever else is queued so that one publish covers it.
        loop {
            apply(&mut rep.persisted, upd);
            match rx.try_recv() {
                Ok(u) => upd = u,
                Err(_) => break,
            }
        }
        // A failed task takes the others down with it.
        let any_failed = rep.persisted.task_states.values().any(|s| s.failed);
        if any_failed && !*kill_tx.borrow() {
            tracing::info!(alloc = %alloc.id, "a task failed; stopping the others");
            let _ = kill_tx.send(true);
        }
        rep.publish();
    }
    for mut j in joins {
        let _ = (&mut j.0).await;
    }
    rep.persisted.procs.clear();
    if bridge {
        if let Some(network) = &env.network {
            network.teardown(&alloc.id).await;
        }
    }
    rep.publish();
    tracing::info!(alloc = %alloc.id, status = %rep.persisted.client_status, "allocation finished");
    rep.persisted
}

/// The allocation's network: the environment its ports and gang rendezvous give every task,
/// its bridge-mode network (set up now, or reattached), and whether it is in bridge mode.
async fn network_for(
    alloc: &Allocation,
    group: &TaskGroup,
    env: &RunnerEnv,
) -> Result<(BTreeMap<String, String>, Option<crate::network::AllocNetwork>, bool), String> {
    let ports = alloc.resources.as_ref().map(|r| r.ports.clone()).unwrap_or_default();
    let bridge = group.network.as_ref().is_some_and(|n| n.mode == "bridge");
    let mut vars = BTreeMap::new();
    let mut net = None;
    if bridge {
        let manager = env.network.as_ref().ok_or("this agent has no bridge networking")?;
        let (made, _took) = manager.setup(&alloc.id, &alloc.namespace, &ports).await.map_err(|e| e.to_string())?;
        vars.extend(crate::network::port_env(&ports, &made.ip.to_string(), true));
        vars.insert("MLP_ALLOC_IP".into(), made.ip.to_string());
        net = Some(made);
    } else {
        vars.extend(crate::network::port_env(&ports, &env.node_address, false));
    }
    if let Some(rv) = &alloc.rendezvous {
        // A leader in bridge mode on this node is reached at its own address; give its network
        // a moment to exist (its allocation starts at the same time as this one).
        let leader = match &env.network {
            Some(m) if rv.leader_node_id == env.node_id && rv.leader_alloc_id != alloc.id && bridge => {
                m.leader_of(rv, std::time::Duration::from_secs(10)).await
            }
            Some(m) if rv.leader_alloc_id == alloc.id => m.leader_of(rv, std::time::Duration::ZERO).await,
            _ => (rv.leader_ip.clone(), rv.leader_port),
        };
        vars.extend(crate::network::rendezvous_env(rv, leader));
    }
    Ok((vars, net, bridge))
}

/// Kills reattached tasks that nothing will run any more, and waits for them (which cleans up
/// their cgroups).
pub async fn kill_handles(handles: BTreeMap<String, Box<dyn TaskHandle>>) {
    for (task, mut h) in handles {
        tracing::info!(task = %task, pid = h.pid(), "killing a reattached task that no longer runs here");
        if let Err(e) = h.signal(nix::sys::signal::Signal::SIGKILL) {
            tracing::warn!(task = %task, error = %e, "killing a reattached task failed");
        }
        let _ = h.wait().await;
    }
}

/// Aborts a spawned task when dropped: when the alloc runner is aborted (agent shutdown) its
/// task runners stop too (their processes keep running).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn apply(p: &mut PersistedAlloc, upd: TaskUpdate) {
    match upd.proc {
        Some(proc) => {
            p.procs.insert(upd.task.clone(), proc);
        }
        None if upd.state.state != task_state::RUNNING => {
            p.procs.remove(&upd.task);
        }
        None => {}
    }
    p.task_states.insert(upd.task, upd.state);
}

/// An update built from a remembered state (an allocation this agent will not run again).
pub fn update_from_persisted(p: &PersistedAlloc) -> AllocClientUpdate {
    AllocClientUpdate {
        alloc_id: p.alloc_id.clone(),
        client_status: p.client_status.clone(),
        client_description: p.client_description.clone(),
        task_states: p.task_states.clone(),
    }
}

/// Marks every unfinished task of a remembered allocation dead (used when the servers ask to
/// stop an allocation whose tasks this agent already killed on restart).
pub fn finish_persisted(p: &mut PersistedAlloc, message: &str) {
    let tasks: Vec<String> = p.task_states.keys().cloned().collect();
    for t in &tasks {
        if let Some(st) = p.task_states.get_mut(t) {
            if st.state != task_state::DEAD {
                st.state = task_state::DEAD.into();
                st.pid = 0;
                st.finished_at_ms = now_ms();
                push_event(st, task_event::KILLED, message);
            }
        }
    }
    p.procs.clear();
    let (status, desc) = client_status(&tasks, &p.task_states);
    p.client_status = status.into();
    p.client_description = desc;
}

/// Writes a dispatch payload to `<local>/payload` (readable by the task's user, replaced
/// whole: a restart of the agent writes the same bytes again).
fn write_payload(local: &std::path::Path, payload: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = local.join("payload");
    let tmp = local.join(".payload.tmp");
    std::fs::write(&tmp, payload)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path)
}

/// `MLP_META_<key>` for the job's, then the group's, then the task's `meta` (a later one wins),
/// as Nomad exports `NOMAD_META_*` (issue 16 §2).
fn meta_env(job: Option<&mlp_proto::v1::Job>, group: &mlp_proto::v1::TaskGroup, task: &mlp_proto::v1::Task) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let maps = job.map(|j| &j.meta).into_iter().chain([&group.meta, &task.meta]);
    for m in maps {
        for (k, v) in m {
            env.insert(mlp_proto::jobspec::jobtypes::meta_env_name(k), v.clone());
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(state: &str, failed: bool, started: u64) -> TaskState {
        TaskState { state: state.into(), failed, started_at_ms: started, ..Default::default() }
    }

    /// A publish that changed nothing the runner tracks writes nothing; a changed task state is
    /// written, whole, with the allocation.
    #[test]
    fn a_publish_saves_only_what_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alloc = Allocation { id: "a1".into(), task_group: "g".into(), ..Default::default() };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = Arc::new(alloc.clone());
        let mut rep = Reporter {
            alloc_id: alloc.id.clone(),
            dir: dir.path().to_path_buf(),
            tasks: vec!["t".into()],
            persisted: PersistedAlloc { alloc_id: alloc.id.clone(), alloc: Some(alloc), ..Default::default() },
            registry: AllocRegistry::default(),
            updates: tx,
            last_sent: None,
            last_saved: None,
            slots: state::Slots::default(),
            alloc: shared,
        };
        let files = || std::fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(0);
        rep.publish();
        assert!(files() > 0, "the first publish is saved");
        assert!(rx.try_recv().is_ok());
        for f in std::fs::read_dir(dir.path()).expect("read_dir").flatten() {
            std::fs::remove_file(f.path()).expect("remove");
        }
        rep.publish();
        assert_eq!(files(), 0, "an unchanged publish writes nothing");
        rep.persisted.task_states.insert("t".into(), st(task_state::RUNNING, false, 5));
        rep.publish();
        assert!(files() > 0, "a changed task state is saved");
        let saved = state::load(dir.path()).expect("load").expect("a saved state");
        assert_eq!(saved.task_states.get("t").map(|s| s.state.as_str()), Some(task_state::RUNNING));
        assert_eq!(saved.alloc.as_ref().map(|a| a.id.as_str()), Some("a1"));
        assert_eq!(saved.client_status, alloc_client::RUNNING);
        rep.persisted.procs.insert("t".into(), state::ProcRecord { pid: 7, start_time: 9 });
        for f in std::fs::read_dir(dir.path()).expect("read_dir").flatten() {
            std::fs::remove_file(f.path()).expect("remove");
        }
        rep.publish();
        assert!(files() > 0, "a changed process record is saved");
    }

    #[test]
    fn status_table() {
        let tasks = vec!["a".to_string(), "b".to_string()];
        let cases = [
            (st("pending", false, 0), st("pending", false, 0), alloc_client::PENDING),
            (st("running", false, 1), st("pending", false, 0), alloc_client::PENDING),
            (st("running", false, 1), st("running", false, 1), alloc_client::RUNNING),
            (st("dead", false, 1), st("running", false, 1), alloc_client::RUNNING),
            (st("pending", false, 1), st("running", false, 1), alloc_client::RUNNING),
            (st("dead", false, 1), st("dead", false, 1), alloc_client::COMPLETE),
            (st("dead", true, 1), st("running", false, 1), alloc_client::FAILED),
            (st("dead", true, 0), st("dead", false, 1), alloc_client::FAILED),
        ];
        for (i, (a, b, want)) in cases.into_iter().enumerate() {
            let mut m = BTreeMap::new();
            m.insert("a".to_string(), a);
            m.insert("b".to_string(), b);
            assert_eq!(client_status(&tasks, &m).0, want, "case {i}");
        }
    }
}
