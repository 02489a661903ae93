//! The allocation manager: diffs every full allocation set from the servers against the alloc
//! runners (start, stop, report remembered final states), restores what a previous agent run
//! left in `data_dir/allocs`, and garbage-collects terminal allocations the servers dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use mlp_proto::consts::{alloc_client, alloc_desired, task_event, task_state};
use mlp_proto::v1::{AllocClientUpdate, Allocation};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::alloc_runner::{
    finish_persisted, spawn_alloc_runner, update_from_persisted, AllocHandle, RunnerEnv,
};
use crate::driver::{proc_start_time, signal_group};
use crate::state::{self, AllocView, PersistedAlloc};
use crate::task_runner::push_event;

/// Tracks every allocation this agent runs or remembers.
pub struct AllocManager {
    env: RunnerEnv,
    updates: mpsc::UnboundedSender<AllocClientUpdate>,
    runners: BTreeMap<String, AllocHandle>,
    /// Allocations that will not run again here (final state known).
    finished: BTreeMap<String, PersistedAlloc>,
    /// Unfinished allocations remembered from before an agent restart.
    restored: BTreeMap<String, PersistedAlloc>,
    /// Ids in the last set from the servers (None before the first).
    last_seen: Option<BTreeSet<String>>,
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
            last_seen: None,
        }
    }

    /// Loads what a previous agent run left: kills its still-running task processes (this
    /// version cannot reattach), remembers finished allocations so they never run again.
    pub fn restore(&mut self) {
        let root = self.env.alloc_root.clone();
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
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
            for (task, proc) in &p.procs {
                if proc.pid > 1 && proc_start_time(proc.pid) == Some(proc.start_time) {
                    tracing::warn!(alloc = %p.alloc_id, task = %task, pid = proc.pid,
                        "killing task left over from the previous agent run (no reattach yet)");
                    if let Err(e) = signal_group(proc.pid, Signal::SIGKILL) {
                        tracing::warn!(pid = proc.pid, error = %e, "killing leftover task failed");
                    }
                }
            }
            // exec tasks' cgroups outlive a killed agent; the shims were just killed.
            if let Some(layout) = crate::cgroups::host_layout() {
                for task in p.procs.keys() {
                    crate::cgroups::remove_leftover(&layout, &format!("{}.{task}", p.alloc_id));
                }
            }
            if alloc_client::is_terminal(&p.client_status) {
                p.procs.clear();
                self.env.registry.put(&p.alloc_id, view_of(&dir, &p));
                self.finished.insert(p.alloc_id.clone(), p);
                continue;
            }
            let had_procs: BTreeSet<String> = p.procs.keys().cloned().collect();
            for (name, st) in p.task_states.iter_mut() {
                if st.state == task_state::RUNNING || had_procs.contains(name) {
                    st.state = task_state::PENDING.into();
                    st.pid = 0;
                    push_event(
                        st,
                        task_event::RESTARTING,
                        "agent restarted; task restarted",
                    );
                }
            }
            p.procs.clear();
            if let Err(e) = state::save(&dir, &p) {
                tracing::warn!(alloc = %p.alloc_id, error = %e, "persisting alloc state failed");
            }
            self.env.registry.put(&p.alloc_id, view_of(&dir, &p));
            self.restored.insert(p.alloc_id.clone(), p);
        }
        tracing::info!(
            finished = self.finished.len(),
            unfinished = self.restored.len(),
            "restored allocations from the data dir"
        );
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
        self.reap();
    }

    /// Applies a partial update: only allocations that changed since the previous message of
    /// the stream. Absent allocations are unchanged, not removed (the servers never delete an
    /// allocation between two messages of one stream without sending it first).
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
        if !stop {
            let prior = self.restored.remove(&a.id);
            tracing::info!(alloc = %a.id, name = %a.name, restored = prior.is_some(), "starting allocation");
            let id = a.id.clone();
            let h = spawn_alloc_runner(a, prior, self.env.clone(), self.updates.clone());
            self.runners.insert(id, h);
            return;
        }
        // Asked to stop something that is not running here.
        let dir = self.env.alloc_root.join(&a.id);
        let mut p = self
            .restored
            .remove(&a.id)
            .unwrap_or_else(|| PersistedAlloc {
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
        let done: Vec<String> = self
            .runners
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            if let Some(h) = self.runners.remove(&id) {
                // Finished: the join handle is ready, so this does not block.
                if let Some(Some(p)) = futures::FutureExt::now_or_never(h.wait()) {
                    self.finished.insert(id, p);
                }
            }
        }
        let Some(seen) = &self.last_seen else { return };
        let gone: Vec<String> = self
            .finished
            .keys()
            .chain(self.restored.keys())
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.finished.remove(&id);
            self.restored.remove(&id);
            self.env.registry.remove(&id);
            let dir = self.env.alloc_root.join(&id);
            tracing::info!(alloc = %id, "garbage-collecting allocation dir");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing alloc dir failed");
                }
            }
        }
    }

    /// Stops the runner loops without touching their tasks (agent shutdown).
    pub fn abort_all(&mut self) {
        for h in self.runners.values() {
            h.abort();
        }
        self.runners.clear();
    }

    /// Ids of running alloc runners.
    pub fn running(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }
}
