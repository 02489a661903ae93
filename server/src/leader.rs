//! What only the leader does: run pending evaluations through the scheduler, re-check and commit
//! their plans (the plan applier), keep blocked evaluations until capacity frees, and mark nodes
//! that miss their heartbeat TTL as down.
//!
//! Everything here is rebuilt from the replicated state whenever this server becomes leader, so a
//! leader change loses nothing: pending evaluations are in the state, blocked ones too, and
//! heartbeat deadlines restart with a grace period.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_proto::consts::{alloc_client, eval_status, eval_trigger, node_status};
use mlp_proto::v1::{AllocMetric, Allocation, Evaluation};
use tokio::sync::{mpsc, Mutex};

use crate::metrics::Metrics;
use crate::raft::node::RaftNode;
use crate::scheduler;
use crate::state::{Command, Effect, PlanResult, Request, StateHandle};

/// Heartbeat settings.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatSettings {
    /// A node that sends nothing for this long is marked down.
    pub ttl: Duration,
    /// Extra time every node gets when a server becomes leader.
    pub failover_grace: Duration,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings { ttl: Duration::from_secs(10), failover_grace: Duration::from_secs(10) }
    }
}

/// Milliseconds since the Unix epoch, the clock written into commands.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Heartbeat deadlines, shared with the agent RPCs that refresh them.
#[derive(Debug, Default)]
pub struct Heartbeats {
    deadlines: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Heartbeats {
    pub fn touch(&self, node_id: &str, ttl: Duration) {
        if let Ok(mut d) = self.deadlines.lock() {
            d.insert(node_id.to_string(), Instant::now() + ttl);
        }
    }

    fn expired(&self, now: Instant) -> Vec<String> {
        match self.deadlines.lock() {
            Ok(mut d) => {
                let gone: Vec<String> = d.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
                for k in &gone {
                    d.remove(k);
                }
                gone
            }
            Err(_) => Vec::new(),
        }
    }

    fn reset(&self, nodes: impl Iterator<Item = String>, deadline: Instant) {
        if let Ok(mut d) = self.deadlines.lock() {
            d.clear();
            for n in nodes {
                d.insert(n, deadline);
            }
        }
    }
}

/// The leader's scheduling loop.
pub struct Leader {
    pub raft: Arc<RaftNode>,
    pub state: Arc<StateHandle>,
    pub metrics: Arc<Metrics>,
    pub heartbeats: Arc<Heartbeats>,
    pub settings: HeartbeatSettings,
    /// Serializes plan application so that each plan is checked against the latest state.
    pub plan_lock: Mutex<()>,
}

/// Blocked evaluations in the order they get capacity: priority first, then submit order.
type BlockedKey = (Reverse<i32>, u64, String);

impl Leader {
    /// Runs until `effects` closes. Does work only while this server is leader.
    pub async fn run(self: Arc<Self>, mut effects: mpsc::UnboundedReceiver<Effect>) {
        let mut leader_rx = self.raft.leader_watch();
        let mut ready: VecDeque<String> = VecDeque::new();
        let mut queued: BTreeSet<String> = BTreeSet::new();
        let mut blocked: BTreeSet<BlockedKey> = BTreeSet::new();
        let mut was_leader = false;
        let mut capacity_changed = false;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let is_leader = *leader_rx.borrow();
            if is_leader && !was_leader {
                self.rebuild(&mut ready, &mut queued, &mut blocked);
                capacity_changed = true;
                tracing::info!(pending = ready.len(), blocked = blocked.len(), "became leader; scheduling queues rebuilt");
            }
            was_leader = is_leader;

            if is_leader && !ready.is_empty() {
                // Drain effects that arrived meanwhile so that dedupe sees them, then work.
                while let Ok(e) = effects.try_recv() {
                    self.absorb(e, &mut ready, &mut queued, &mut blocked, &mut capacity_changed);
                }
                if let Some(id) = ready.pop_front() {
                    queued.remove(&id);
                    self.run_eval(&id, &mut blocked).await;
                }
                continue;
            }
            if is_leader && capacity_changed {
                capacity_changed = false;
                self.unblock(&mut blocked).await;
                continue;
            }

            tokio::select! {
                e = effects.recv() => {
                    let Some(e) = e else { return };
                    self.absorb(e, &mut ready, &mut queued, &mut blocked, &mut capacity_changed);
                }
                r = leader_rx.changed() => {
                    if r.is_err() { return; }
                }
                _ = tick.tick() => {
                    if is_leader {
                        self.check_heartbeats().await;
                    }
                }
            }
        }
    }

    fn absorb(
        &self,
        e: Effect,
        ready: &mut VecDeque<String>,
        queued: &mut BTreeSet<String>,
        blocked: &mut BTreeSet<BlockedKey>,
        capacity_changed: &mut bool,
    ) {
        match e {
            Effect::EvalsPending(ids) => {
                for id in ids {
                    if queued.insert(id.clone()) {
                        ready.push_back(id);
                    }
                }
            }
            Effect::CapacityChanged => *capacity_changed = true,
            Effect::Reset => {
                self.rebuild(ready, queued, blocked);
                *capacity_changed = true;
            }
        }
    }

    fn rebuild(&self, ready: &mut VecDeque<String>, queued: &mut BTreeSet<String>, blocked: &mut BTreeSet<BlockedKey>) {
        ready.clear();
        queued.clear();
        blocked.clear();
        let st = self.state.read();
        let mut pending: Vec<&Evaluation> = st.evals.values().filter(|e| e.status == eval_status::PENDING).collect();
        pending.sort_by_key(|e| (Reverse(e.priority), e.create_index));
        for e in pending {
            queued.insert(e.id.clone());
            ready.push_back(e.id.clone());
        }
        for e in st.evals.values().filter(|e| e.status == eval_status::BLOCKED) {
            blocked.insert((Reverse(e.priority), e.create_index, e.id.clone()));
        }
        let deadline = Instant::now() + self.settings.ttl + self.settings.failover_grace;
        self.heartbeats.reset(
            st.nodes.values().filter(|n| n.status != node_status::DOWN).map(|n| n.id.clone()),
            deadline,
        );
    }

    /// Re-runs blocked evaluations in priority, then submit, order. Runs that place nothing
    /// write nothing, so a long blocked queue costs scheduler time only, not Raft writes.
    async fn unblock(&self, blocked: &mut BTreeSet<BlockedKey>) {
        let order: Vec<BlockedKey> = blocked.iter().cloned().collect();
        // Requests that failed for lack of capacity in this pass: a later evaluation asking for
        // at least as much in every dimension can't fit either.
        let mut exhausted: Vec<[u64; 4]> = Vec::new();
        for key in order {
            let ask = {
                let st = self.state.read();
                st.evals.get(&key.2).and_then(|e| st.job(&e.namespace, &e.job_id)).map(scheduler_ask)
            };
            if let Some(ask) = ask {
                if exhausted.iter().any(|x| ask.iter().zip(x).all(|(a, b)| a >= b)) {
                    continue;
                }
            }
            blocked.remove(&key);
            let outcome = self.run_eval(&key.2, blocked).await;
            if outcome == EvalOutcome::StillBlocked {
                if let Some(ask) = ask {
                    exhausted.push(ask);
                }
            }
        }
    }

    async fn check_heartbeats(&self) {
        let expired = self.heartbeats.expired(Instant::now());
        for node_id in expired {
            let evals = {
                let st = self.state.read();
                match st.nodes.get(&node_id) {
                    Some(n) if n.status != node_status::DOWN => {}
                    _ => continue,
                }
                node_evals(&st, &node_id)
            };
            tracing::warn!(node_id, ttl_ms = self.settings.ttl.as_millis() as u64, "node missed its heartbeat TTL; marking down");
            let req = Request {
                now_ms: now_ms(),
                command: Command::UpdateNodeStatus {
                    node_id: node_id.clone(),
                    status: node_status::DOWN.to_string(),
                    description: format!("missed heartbeat TTL of {}s", self.settings.ttl.as_secs_f64()),
                    evals,
                },
            };
            match self.raft.write(req).await {
                Ok(_) => Metrics::inc(&self.metrics.nodes_marked_down),
                Err(e) => tracing::warn!(node_id, error = %e, "could not mark node down"),
            }
        }
    }

    /// Schedules one evaluation and commits what fits.
    async fn run_eval(&self, eval_id: &str, blocked: &mut BTreeSet<BlockedKey>) -> EvalOutcome {
        let _plan_guard = self.plan_lock.lock().await;
        let started = Instant::now();
        let computed = {
            let st = self.state.read();
            let Some(eval) = st.evals.get(eval_id).cloned() else { return EvalOutcome::Done };
            if eval.status != eval_status::PENDING && eval.status != eval_status::BLOCKED {
                return EvalOutcome::Done;
            }
            let job = st.job(&eval.namespace, &eval.job_id).cloned();
            let plan = scheduler::schedule(&st, job.as_ref(), &eval, now_ms());
            let checked = check_plan(&st, plan.placements);
            // Other blocked evaluations of the same job are superseded by this one.
            let superseded: Vec<Evaluation> = st
                .evals_for_job(&eval.namespace, &eval.job_id)
                .filter(|e| e.id != eval.id && e.status == eval_status::BLOCKED)
                .cloned()
                .map(|mut e| {
                    e.status = eval_status::CANCELED.to_string();
                    e.status_description = format!("superseded by evaluation {}", eval.id);
                    e
                })
                .collect();
            (eval, plan.stops, plan.failed_tg_allocs, plan.queued_allocations, checked, superseded)
        };
        let (mut eval, stops, failed, mut queued, (accepted, rejected), superseded) = computed;
        Metrics::add(&self.metrics.schedule_micros_total, started.elapsed().as_micros() as u64);
        Metrics::inc(&self.metrics.evals_processed);
        if rejected > 0 {
            Metrics::add(&self.metrics.plan_placements_rejected, rejected as u64);
        }

        let unplaced: u32 = queued.values().sum();
        let was_blocked = eval.status == eval_status::BLOCKED;
        let mut new_evals = superseded;
        for e in &mut new_evals {
            blocked.retain(|k| k.2 != e.id);
        }
        let outcome;
        if rejected > 0 {
            // The plan went stale between snapshot and apply: commit what fits, retry the rest.
            queued.clear();
            eval.status = eval_status::PENDING.to_string();
            eval.status_description = format!("{rejected} placements conflicted with newer state; retrying");
            outcome = EvalOutcome::Retry;
        } else if unplaced > 0 {
            Metrics::inc(&self.metrics.evals_blocked);
            if was_blocked && accepted.is_empty() && stops.is_empty() && new_evals.is_empty() {
                blocked.insert((Reverse(eval.priority), eval.create_index, eval.id.clone()));
                return EvalOutcome::StillBlocked;
            }
            if was_blocked {
                eval.queued_allocations = queued;
                eval.failed_tg_allocs = failed;
                eval.status_description = format!("{unplaced} allocations wait for capacity");
                blocked.insert((Reverse(eval.priority), eval.create_index, eval.id.clone()));
                outcome = EvalOutcome::StillBlocked;
            } else {
                let blocked_eval = Evaluation {
                    id: uuid::Uuid::new_v4().to_string(),
                    namespace: eval.namespace.clone(),
                    job_id: eval.job_id.clone(),
                    priority: eval.priority,
                    r#type: eval.r#type.clone(),
                    triggered_by: eval_trigger::QUEUED_ALLOCS.to_string(),
                    status: eval_status::BLOCKED.to_string(),
                    status_description: format!("{unplaced} allocations wait for capacity"),
                    job_modify_index: eval.job_modify_index,
                    queued_allocations: queued.clone(),
                    failed_tg_allocs: failed.clone(),
                    previous_eval: eval.id.clone(),
                    ..Default::default()
                };
                eval.blocked_eval = blocked_eval.id.clone();
                eval.status = eval_status::COMPLETE.to_string();
                eval.queued_allocations = queued;
                eval.failed_tg_allocs = failed;
                new_evals.push(blocked_eval);
                outcome = EvalOutcome::NewlyBlocked;
            }
        } else {
            eval.status = eval_status::COMPLETE.to_string();
            eval.status_description.clear();
            eval.queued_allocations = queued;
            eval.failed_tg_allocs = BTreeMap::new();
            outcome = EvalOutcome::Done;
        }
        let placed = accepted.len() as u64;
        let new_blocked: Vec<BlockedKey> = new_evals
            .iter()
            .filter(|e| e.status == eval_status::BLOCKED)
            .map(|e| (Reverse(e.priority), u64::MAX, e.id.clone()))
            .collect();
        let req = Request {
            now_ms: now_ms(),
            command: Command::ApplyPlan(PlanResult { eval: Some(eval), placements: accepted, stops, new_evals }),
        };
        match self.raft.write(req).await {
            Ok(resp) => {
                Metrics::inc(&self.metrics.plans_applied);
                Metrics::add(&self.metrics.placements, placed);
                // The blocked eval's create index is the plan's index: keep submit order.
                for (p, _, id) in new_blocked {
                    blocked.insert((p, resp.index, id));
                }
            }
            Err(e) => {
                tracing::warn!(eval_id, error = %e, "could not commit plan; the evaluation stays pending");
            }
        }
        outcome
    }
}

/// How an evaluation run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvalOutcome {
    Done,
    Retry,
    NewlyBlocked,
    StillBlocked,
}

/// A job's biggest per-allocation request: cpu, memory, disk, gpus.
fn scheduler_ask(job: &mlp_proto::v1::Job) -> [u64; 4] {
    let mut ask = [0u64; 4];
    for g in &job.groups {
        let mut s = [0u64; 4];
        for t in &g.tasks {
            if let Some(r) = &t.resources {
                s[0] += r.cpu_mhz;
                s[1] += r.memory_mib;
                s[2] += r.disk_mib;
                s[3] += r.gpu.as_ref().map(|g| u64::from(g.count)).unwrap_or(0);
            }
        }
        for i in 0..4 {
            ask[i] = ask[i].max(s[i]);
        }
    }
    ask
}

/// The plan applier's check: every node's placements must still fit the latest state.
/// Returns the accepted placements and how many were rejected.
fn check_plan(st: &crate::state::ClusterState, placements: Vec<Allocation>) -> (Vec<Allocation>, usize) {
    let mut by_node: BTreeMap<String, Vec<Allocation>> = BTreeMap::new();
    for p in placements {
        by_node.entry(p.node_id.clone()).or_default().push(p);
    }
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (node_id, allocs) in by_node {
        let fits = match st.nodes.get(&node_id) {
            Some(node) => {
                let refs: Vec<&Allocation> = allocs.iter().collect();
                scheduler::check_node_fit(st, node, &refs)
            }
            None => Err(format!("node {node_id} is gone")),
        };
        match fits {
            Ok(()) => accepted.extend(allocs),
            Err(why) => {
                tracing::debug!(node_id, why, "plan applier rejected placements");
                rejected += allocs.len();
            }
        }
    }
    (accepted, rejected)
}

/// Evaluations for every job with live allocations on a node whose status changed.
pub fn node_evals(st: &crate::state::ClusterState, node_id: &str) -> Vec<Evaluation> {
    let mut jobs = BTreeSet::new();
    for a in st.allocs_for_node(node_id) {
        if !alloc_client::is_terminal(&a.client_status) {
            jobs.insert((a.namespace.clone(), a.job_id.clone()));
        }
    }
    jobs.into_iter()
        .filter_map(|(ns, id)| st.job(&ns, &id).map(|j| (ns, id, j.priority, j.r#type.clone())))
        .map(|(ns, id, priority, ty)| Evaluation {
            id: uuid::Uuid::new_v4().to_string(),
            namespace: ns,
            job_id: id,
            priority,
            r#type: ty,
            triggered_by: eval_trigger::NODE_UPDATE.to_string(),
            node_id: node_id.to_string(),
            status: eval_status::PENDING.to_string(),
            ..Default::default()
        })
        .collect()
}

/// Placement failure explanation lines for every failed task group.
pub fn explain_failures(failed: &BTreeMap<String, AllocMetric>) -> Vec<String> {
    let mut out = Vec::new();
    for (group, m) in failed {
        out.push(format!("task group {group:?}: {} nodes evaluated, {} filtered, {} exhausted", m.nodes_evaluated, m.nodes_filtered, m.nodes_exhausted));
        for line in scheduler::explain(m) {
            out.push(format!("  * {line}"));
        }
    }
    out
}
