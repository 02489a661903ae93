//! The allocation manager: diffs every full allocation set from the servers against the alloc
//! runners (start, stop, report remembered final states), restores what a previous agent run
//! left in `data_dir/allocs` (reattaching to the tasks it started, which kept running under
//! their supervisors), and garbage-collects terminal allocations the servers dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use mlp_proto::consts::{alloc_client, alloc_desired, task_event, task_state};
use mlp_proto::v1::{AllocClientUpdate, Allocation};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::runner::{
    finish_persisted, kill_handles, refused_update, spawn_alloc_runner_attached, update_from_persisted, AllocHandle, RunnerEnv,
};
use super::state::{self, AllocView, PersistedAlloc};
use crate::driver::supervised;
use crate::driver::{proc_start_time, signal_group, TaskHandle};
use crate::isolation::phases::Phases;
use crate::task::runner::push_event;

/// Tracks every allocation this agent runs or remembers.
pub struct AllocManager {
    env: RunnerEnv,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
    runners: BTreeMap<String, AllocHandle>,
    /// Allocations that will not run again here (final state known).
    finished: BTreeMap<String, PersistedAlloc>,
    /// Unfinished allocations remembered from before an agent restart.
    restored: BTreeMap<String, PersistedAlloc>,
    /// Tasks of those allocations reattached after the restart, by alloc id and task name.
    attached: BTreeMap<String, BTreeMap<String, Box<dyn TaskHandle>>>,
    /// Ids in the last set from the servers (None before the first).
    last_seen: Option<BTreeSet<String>>,
    /// A full set arrived since the last `reap`: every finished allocation is checked against
    /// it. Otherwise only those that finished since are (a partial message removes nothing), so
    /// a message costs O(changes), not O(allocations the node ever ran).
    scan_gone: bool,
    /// When the allocations being applied arrived (`mono_ns`; 0 = unknown, now).
    received_ns: u64,
}

fn view_of(dir: &Path, p: &PersistedAlloc) -> AllocView {
    let tasks = p
        .alloc
        .as_ref()
        .and_then(|a| {
            let job = a.job.as_ref()?;
            let g = job.groups.iter().find(|g| g.name == a.task_group)?;
            Some(g.tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>())
        })
        .unwrap_or_else(|| p.task_states.keys().cloned().collect());
    AllocView {
        dir: dir.to_path_buf(),
        tasks,
        client_status: p.client_status.clone(),
        task_states: p.task_states.clone(),
        alloc: p.alloc.clone().map(Arc::new),
    }
}

impl AllocManager {
    /// A manager with nothing restored.
    pub fn new(env: RunnerEnv, updates: mpsc::UnboundedSender<AllocClientUpdate>) -> Self {
        AllocManager {
            env,
            updates,
            runners: BTreeMap::new(),
            finished: BTreeMap::new(),
            restored: BTreeMap::new(),
            attached: BTreeMap::new(),
            last_seen: None,
            scan_gone: false,
            received_ns: 0,
        }
    }

    /// Reattaches to the tasks of `p` that a previous agent run started (a run record in the
    /// task's dir): by task name. A task that cannot be reattached is killed (its supervisor
    /// and process group) and its cgroup removed.
    fn reattach_tasks(&self, dir: &Path, p: &PersistedAlloc) -> BTreeMap<String, Box<dyn TaskHandle>> {
        let mut names: BTreeSet<String> = p.task_states.keys().cloned().collect();
        names.extend(p.procs.keys().cloned());
        if let Some(job) = p.alloc.as_ref().and_then(|a| {
            let job = a.job.as_ref()?;
            job.groups.iter().find(|g| g.name == a.task_group)
        }) {
            names.extend(job.tasks.iter().map(|t| t.name.clone()));
        }
        let mut out = BTreeMap::new();
        for task in names {
            let task_dir = dir.join(&task);
            let record = match supervised::load_record(&task_dir) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(dir = %task_dir.display(), error = %e, "unreadable task record; ignored");
                    supervised::remove_run_files(&task_dir);
                    continue;
                }
            };
            let result = match self.env.drivers.get(&record.driver) {
                Some(driver) => driver.reattach(&task_dir, &record),
                None => Err(crate::driver::DriverError::Unknown(record.driver.clone())),
            };
            match result {
                Ok(h) => {
                    tracing::info!(alloc = %p.alloc_id, task = %task, pid = h.pid(), "reattached to a task of the previous agent run");
                    out.insert(task, h);
                }
                Err(e) => {
                    tracing::warn!(alloc = %p.alloc_id, task = %task, error = %e, "cannot reattach; killing what is left of the task");
                    for (pid, start) in [(record.pid, record.start_time), (record.supervisor_pid, record.supervisor_start_time)] {
                        if pid > 1 && proc_start_time(pid) == Some(start) {
                            let _ = signal_group(pid, Signal::SIGKILL);
                        }
                    }
                    if let (Some(layout), false) = (crate::isolation::cgroups::host_layout(), record.cgroup.is_empty()) {
                        crate::isolation::cgroups::remove_leftover(&layout, &record.cgroup);
                    }
                    supervised::remove_run_files(&task_dir);
                }
            }
        }
        out
    }

    /// Loads what a previous agent run left: reattaches to the tasks it started (they kept
    /// running under their supervisors, or their exits were recorded meanwhile and are reported
    /// once the allocation's runner starts), kills what cannot be reattached (and restarts it
    /// when the servers still want the allocation), remembers finished allocations so they
    /// never run again.
    pub fn restore(&mut self) {
        let root = self.env.alloc_root.clone();
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        let mut reattached = 0usize;
        for entry in rd.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let mut p = match state::load(&dir) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "unreadable alloc state; ignored");
                    continue;
                }
            };
            if p.alloc_id.is_empty() {
                p.alloc_id = entry.file_name().to_string_lossy().into_owned();
            }
            // Written by an agent that checked it, but the dir is all this run trusts.
            let checked =
                crate::paths::check_alloc_id(&p.alloc_id).and_then(|()| p.alloc.as_ref().map_or(Ok(()), crate::paths::check_allocation));
            if let Err(e) =
                checked.and_then(|()| p.task_states.keys().chain(p.procs.keys()).try_for_each(|t| crate::paths::check_task_name(t)))
            {
                tracing::warn!(dir = %dir.display(), error = %e, "alloc state with an unsafe name; ignored");
                continue;
            }
            let handles = self.reattach_tasks(&dir, &p);
            // Processes recorded without a run record (or whose reattach failed and were
            // killed above) are not the tasks' any more.
            for (task, proc) in &p.procs {
                if handles.contains_key(task) {
                    continue;
                }
                if proc.pid > 1 && proc_start_time(proc.pid) == Some(proc.start_time) {
                    tracing::warn!(alloc = %p.alloc_id, task = %task, pid = proc.pid,
                        "killing a task left over from the previous agent run that cannot be reattached");
                    if let Err(e) = signal_group(proc.pid, Signal::SIGKILL) {
                        tracing::warn!(pid = proc.pid, error = %e, "killing leftover task failed");
                    }
                }
                if let Some(layout) = crate::isolation::cgroups::host_layout() {
                    crate::isolation::cgroups::remove_leftover(&layout, &format!("{}.{task}", p.alloc_id));
                }
            }
            if alloc_client::is_terminal(&p.client_status) {
                p.procs.clear();
                if !handles.is_empty() {
                    tokio::spawn(kill_handles(handles));
                }
                self.env.registry.put(&p.alloc_id, view_of(&dir, &p));
                self.finished.insert(p.alloc_id.clone(), p);
                continue;
            }
            let had_procs: BTreeSet<String> = p.procs.keys().cloned().collect();
            for (name, st) in p.task_states.iter_mut() {
                if let Some(h) = handles.get(name) {
                    // Still its run: the state (restart count included) carries on.
                    st.pid = h.pid();
                    continue;
                }
                if st.state == task_state::RUNNING || had_procs.contains(name) {
                    st.state = task_state::PENDING.into();
                    st.pid = 0;
                    push_event(st, task_event::RESTARTING, "agent restarted; task restarted");
                }
            }
            p.procs.retain(|task, _| handles.contains_key(task));
            if let Err(e) = state::save(&dir, &p) {
                tracing::warn!(alloc = %p.alloc_id, error = %e, "persisting alloc state failed");
            }
            self.env.registry.put(&p.alloc_id, view_of(&dir, &p));
            reattached += handles.len();
            if !handles.is_empty() {
                self.attached.insert(p.alloc_id.clone(), handles);
            }
            self.restored.insert(p.alloc_id.clone(), p);
        }
        tracing::info!(
            finished = self.finished.len(),
            unfinished = self.restored.len(),
            reattached,
            "restored allocations from the data dir"
        );
    }

    /// The real devices that reattached tasks share through MPS
    /// (`crate::gpu::mps::shared_device`): their daemons are kept on agent start.
    pub fn attached_gpu_shares(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (alloc_id, handles) in &self.attached {
            let Some(alloc) = self.restored.get(alloc_id).and_then(|p| p.alloc.as_ref()) else { continue };
            let Some(group) = alloc.job.as_ref().and_then(|j| j.groups.iter().find(|g| g.name == alloc.task_group)) else {
                continue;
            };
            for task in handles.keys() {
                let gpus = crate::gpu::task_gpus(group, task, alloc.resources.as_ref(), &self.env.gpus);
                if let Some(uuid) = crate::gpu::mps::shared_device(&gpus) {
                    out.insert(uuid.to_string());
                }
            }
        }
        out
    }

    /// Notes when the next allocations to apply arrived on the servers' stream (their tasks'
    /// start phases are timed from it).
    pub fn received_at(&mut self, at_ns: u64) {
        self.received_ns = at_ns;
    }

    /// Applies a full allocation set from the servers.
    pub fn sync(&mut self, allocs: Vec<Allocation>) {
        let mut seen = BTreeSet::new();
        for a in allocs {
            seen.insert(a.id.clone());
            self.apply_one(a);
        }
        for (id, h) in &self.runners {
            if !seen.contains(id) {
                tracing::info!(alloc = %id, "allocation no longer assigned; stopping it");
                h.stop();
            }
        }
        self.last_seen = Some(seen);
        self.scan_gone = true;
        self.reap();
    }

    /// Applies a partial update: only allocations that changed since the previous message of
    /// the stream. Absent allocations are unchanged, not removed: the servers delete only
    /// terminal allocations (garbage collection), which have nothing left to run here; the next
    /// full set drops them.
    pub fn sync_partial(&mut self, allocs: Vec<Allocation>) {
        for a in allocs {
            if let Some(seen) = &mut self.last_seen {
                seen.insert(a.id.clone());
            }
            self.apply_one(a);
        }
        self.reap();
    }

    /// Starts, stops or reports one allocation the servers sent.
    fn apply_one(&mut self, a: Allocation) {
        if let Err(e) = crate::paths::check_allocation(&a) {
            // Never touches disk or the registry: reported failed until the servers know.
            if a.client_status != alloc_client::FAILED {
                tracing::warn!(error = %e, "refusing an allocation with an unsafe name");
                let _ = self.updates.send(refused_update(&a.id, &e));
            }
            return;
        }
        let stop = a.desired_status == alloc_desired::STOP;
        if let Some(h) = self.runners.get(&a.id) {
            if stop {
                h.stop();
            }
            return;
        }
        if let Some(p) = self.finished.get(&a.id) {
            if a.client_status != p.client_status {
                let _ = self.updates.send(update_from_persisted(p));
            }
            return;
        }
        let attached = self.attached.remove(&a.id).unwrap_or_default();
        if !stop || !attached.is_empty() {
            // Reattached tasks of an allocation to stop are stopped by its runner (kill
            // timeout, events, cgroup cleanup), like any running task.
            let prior = self.restored.remove(&a.id);
            tracing::info!(alloc = %a.id, name = %a.name, restored = prior.is_some(), reattached = attached.len(), "starting allocation");
            let id = a.id.clone();
            let received = match self.received_ns {
                0 => Phases::start(),
                at => Phases::starting_at("alloc_received", at),
            };
            let h = spawn_alloc_runner_attached(a, prior, attached, self.env.clone(), self.updates.clone(), received);
            if stop {
                h.stop();
            }
            self.runners.insert(id, h);
            return;
        }
        // Asked to stop something that is not running here.
        let dir = self.env.alloc_root.join(&a.id);
        let mut p = self.restored.remove(&a.id).unwrap_or_else(|| PersistedAlloc {
            alloc_id: a.id.clone(),
            alloc: Some(a.clone()),
            ..Default::default()
        });
        finish_persisted(&mut p, "Task stopped (agent restarted)");
        if p.task_states.is_empty() {
            p.client_status = alloc_client::COMPLETE.into();
            p.client_description = "Allocation stopped before it ran".into();
        }
        if dir.is_dir() {
            if let Err(e) = state::save(&dir, &p) {
                tracing::warn!(alloc = %a.id, error = %e, "persisting alloc state failed");
            }
        }
        let _ = self.updates.send(update_from_persisted(&p));
        self.finished.insert(a.id.clone(), p);
    }

    /// Collects finished runners and removes terminal allocations the servers dropped.
    pub fn reap(&mut self) {
        let done: Vec<String> = self.runners.iter().filter(|(_, h)| h.is_finished()).map(|(id, _)| id.clone()).collect();
        let mut just_finished = Vec::with_capacity(done.len());
        for id in done {
            if let Some(h) = self.runners.remove(&id) {
                // Finished: the join handle is ready, so this does not block.
                if let Some(Some(p)) = futures::FutureExt::now_or_never(h.wait()) {
                    self.finished.insert(id.clone(), p);
                    just_finished.push(id);
                }
            }
        }
        let scan_all = std::mem::take(&mut self.scan_gone);
        let Some(seen) = &self.last_seen else { return };
        let gone: Vec<String> = if scan_all {
            self.finished.keys().chain(self.restored.keys()).filter(|id| !seen.contains(*id)).cloned().collect()
        } else {
            just_finished.into_iter().filter(|id| !seen.contains(id)).collect()
        };
        for id in gone {
            if crate::paths::check_alloc_id(&id).is_err() {
                // Never a dir of ours: do not build a path from it.
                self.finished.remove(&id);
                self.restored.remove(&id);
                continue;
            }
            self.finished.remove(&id);
            self.restored.remove(&id);
            if let Some(handles) = self.attached.remove(&id) {
                tokio::spawn(kill_handles(handles));
            }
            self.env.registry.remove(&id);
            if let Some(network) = self.env.network.clone() {
                let id = id.clone();
                tokio::spawn(async move { network.teardown(&id).await });
            }
            let dir = self.env.alloc_root.join(&id);
            tracing::info!(alloc = %id, "garbage-collecting allocation dir");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing alloc dir failed");
                }
            }
        }
    }

    /// Stops the runner loops without touching their tasks (agent shutdown): the tasks keep
    /// running under their supervisors, and the next agent run reattaches to them.
    pub fn abort_all(&mut self) {
        for h in self.runners.values() {
            h.abort();
        }
        self.runners.clear();
        self.attached.clear();
    }

    /// Ids of the restored allocations that are not finished (they run again or were
    /// reattached): their networks are kept on agent start.
    pub fn unfinished(&self) -> BTreeSet<String> {
        self.restored.keys().cloned().collect()
    }

    /// Ids of running alloc runners.
    pub fn running(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::state::AllocRegistry;
    use mlp_proto::v1::{Job, Task, TaskGroup};

    fn tree(root: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p.clone());
                }
                out.push(p);
            }
        }
        out.sort();
        out
    }

    fn alloc(id: &str, group: &str, task: &str) -> Allocation {
        Allocation {
            id: id.into(),
            task_group: group.into(),
            desired_status: alloc_desired::RUN.into(),
            job: Some(Job {
                groups: vec![TaskGroup {
                    name: group.into(),
                    tasks: vec![Task { name: task.into(), driver: "raw_exec".into(), ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Hostile ids, group and task names are refused as failed, and nothing in or next to the
    /// data dir is created or removed, also when the servers drop them again (GC).
    #[tokio::test]
    async fn hostile_names_are_refused_and_touch_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("data").join("allocs");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(tmp.path().join("etc"))?;
        std::fs::write(tmp.path().join("etc").join("passwd"), "keep")?;
        let before = tree(tmp.path());
        let registry = AllocRegistry::default();
        let env = RunnerEnv {
            alloc_root: root.clone(),
            drivers: crate::driver::drivers_for(&["raw_exec".to_string()]),
            log_max_file_bytes: 1024,
            log_max_files: 1,
            registry: registry.clone(),
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut m = AllocManager::new(env, tx);
        let mut allocs = Vec::new();
        for (i, v) in crate::paths::tests::hostile().into_iter().enumerate() {
            allocs.push(alloc(&v, "g", "t"));
            allocs.push(alloc(&format!("ok-task-{i}"), "g", &v));
            if !v.is_empty() {
                allocs.push(alloc(&format!("ok-group-{i}"), &v, "t"));
            }
        }
        let n = allocs.len();
        m.sync(allocs);
        let mut failed = 0;
        while let Ok(u) = rx.try_recv() {
            assert_eq!(u.client_status, alloc_client::FAILED, "{u:?}");
            assert!(u.client_description.starts_with("refused by the agent: invalid "), "{u:?}");
            failed += 1;
        }
        assert_eq!(failed, n);
        assert!(m.running().is_empty());
        assert!(registry.resolve("ok").is_err(), "nothing registered");
        // Dropped by the servers: garbage collection builds no path from them either.
        m.sync(Vec::new());
        assert_eq!(tree(tmp.path()), before);
        assert_eq!(std::fs::read_to_string(tmp.path().join("etc").join("passwd"))?, "keep");
        Ok(())
    }
}
