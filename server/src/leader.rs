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
use tokio::sync::mpsc;

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

/// How many evaluations are planned at once. Plans are computed in parallel on the shared
/// state; the plan applier serializes their checks.
pub const SCHEDULER_WORKERS: usize = 4;

/// The leader's scheduling loop.
pub struct Leader {
    pub raft: Arc<RaftNode>,
    pub state: Arc<StateHandle>,
    pub metrics: Arc<Metrics>,
    pub heartbeats: Arc<Heartbeats>,
    pub settings: HeartbeatSettings,
    /// Placements that passed the plan applier and are being committed, by allocation id. The
    /// applier checks new plans against the state plus these, so two plans in flight at once
    /// can never overcommit a node between them.
    pub in_flight: std::sync::Mutex<BTreeMap<String, Allocation>>,
}

/// Blocked evaluations in the order they get capacity: priority first, then submit order.
type BlockedKey = (Reverse<i32>, u64, String);

/// The leader's in-memory queues, all rebuilt from the state on leadership.
#[derive(Default)]
struct Queues {
    ready: VecDeque<String>,
    queued: BTreeSet<String>,
    blocked: BTreeSet<BlockedKey>,
    /// Jobs with an evaluation being planned: a job's evaluations never run concurrently.
    busy_jobs: BTreeSet<String>,
    capacity_changed: bool,
}

impl Queues {
    fn absorb(&mut self, e: Effect, leader: &Leader) {
        match e {
            Effect::EvalsPending(ids) => {
                for id in ids {
                    if self.queued.insert(id.clone()) {
                        self.ready.push_back(id);
                    }
                }
            }
            Effect::CapacityChanged => self.capacity_changed = true,
            Effect::Reset => {
                leader.rebuild(self);
                self.capacity_changed = true;
            }
        }
    }

    /// The next ready evaluation whose job is not being planned, with its job key.
    fn next_runnable(&mut self, state: &StateHandle) -> Option<(String, String)> {
        let st = state.read();
        let pos = self.ready.iter().position(|id| match st.evals.get(id) {
            Some(e) => !self.busy_jobs.contains(&crate::state::job_key(&e.namespace, &e.job_id)),
            None => true,
        })?;
        let id = self.ready.remove(pos)?;
        self.queued.remove(&id);
        let key = st.evals.get(&id).map(|e| crate::state::job_key(&e.namespace, &e.job_id)).unwrap_or_default();
        Some((id, key))
    }

    fn record(&mut self, report: EvalReport) {
        for id in &report.unblocked {
            self.blocked.retain(|k| &k.2 != id);
        }
        self.blocked.extend(report.blocked);
    }
}

/// What one evaluation run changed in the blocked set.
#[derive(Debug, Default)]
struct EvalReport {
    outcome: Option<EvalOutcome>,
    blocked: Vec<BlockedKey>,
    unblocked: Vec<String>,
}

impl Leader {
    /// Runs until `effects` closes. Does work only while this server is leader.
    pub async fn run(self: Arc<Self>, mut effects: mpsc::UnboundedReceiver<Effect>) {
        let mut leader_rx = self.raft.leader_watch();
        let mut q = Queues::default();
        let mut workers: tokio::task::JoinSet<(String, EvalReport)> = tokio::task::JoinSet::new();
        let mut was_leader = false;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let is_leader = *leader_rx.borrow();
            if is_leader && !was_leader {
                self.rebuild(&mut q);
                q.capacity_changed = true;
                tracing::info!(pending = q.ready.len(), blocked = q.blocked.len(), "became leader; scheduling queues rebuilt");
            }
            was_leader = is_leader;

            if is_leader {
                while let Ok(e) = effects.try_recv() {
                    q.absorb(e, &self);
                }
                while workers.len() < SCHEDULER_WORKERS {
                    let Some((id, job)) = q.next_runnable(&self.state) else { break };
                    q.busy_jobs.insert(job.clone());
                    let me = self.clone();
                    workers.spawn(async move { (job, me.run_eval(&id).await) });
                }
                // Blocked evaluations get capacity in order, so they run alone and in sequence.
                if workers.is_empty() && q.ready.is_empty() && q.capacity_changed {
                    q.capacity_changed = false;
                    self.unblock(&mut q).await;
                    continue;
                }
            }

            tokio::select! {
                Some(done) = workers.join_next(), if !workers.is_empty() => {
                    match done {
                        Ok((job, report)) => {
                            q.busy_jobs.remove(&job);
                            q.record(report);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "scheduler worker failed");
                            q.busy_jobs.clear();
                        }
                    }
                }
                e = effects.recv() => {
                    let Some(e) = e else { return };
                    q.absorb(e, &self);
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

    fn rebuild(&self, q: &mut Queues) {
        q.ready.clear();
        q.queued.clear();
        q.blocked.clear();
        let st = self.state.read();
        let mut pending: Vec<&Evaluation> = st.evals.values().filter(|e| e.status == eval_status::PENDING).collect();
        pending.sort_by_key(|e| (Reverse(e.priority), e.create_index));
        for e in pending {
            q.queued.insert(e.id.clone());
            q.ready.push_back(e.id.clone());
        }
        for e in st.evals.values().filter(|e| e.status == eval_status::BLOCKED) {
            q.blocked.insert((Reverse(e.priority), e.create_index, e.id.clone()));
        }
        let deadline = Instant::now() + self.settings.ttl + self.settings.failover_grace;
        self.heartbeats.reset(
            st.nodes.values().filter(|n| n.status != node_status::DOWN).map(|n| n.id.clone()),
            deadline,
        );
    }

    /// Re-runs blocked evaluations in priority, then submit, order. Runs that place nothing
    /// write nothing, so a long blocked queue costs scheduler time only, not Raft writes.
    async fn unblock(&self, q: &mut Queues) {
        let order: Vec<BlockedKey> = q.blocked.iter().cloned().collect();
        // Requests that failed for lack of capacity in this pass: a later evaluation asking for
        // at least as much in every dimension can't fit either.
        let mut exhausted: Vec<[u64; 4]> = Vec::new();
        for key in order {
            if !q.blocked.contains(&key) {
                continue; // superseded during this pass
            }
            let ask = {
                let st = self.state.read();
                st.evals.get(&key.2).and_then(|e| st.job(&e.namespace, &e.job_id)).map(scheduler_ask)
            };
            if let Some(ask) = ask {
                if exhausted.iter().any(|x| ask.iter().zip(x).all(|(a, b)| a >= b)) {
                    continue;
                }
            }
            q.blocked.remove(&key);
            let report = self.run_eval(&key.2).await;
            let still_blocked = report.outcome == Some(EvalOutcome::StillBlocked);
            q.record(report);
            if still_blocked {
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

    /// Plan applier, first half: checks placements against the latest state plus every plan
    /// still being committed, and reserves the accepted ones. Returns (accepted, rejected count).
    fn admit(&self, placements: Vec<Allocation>) -> (Vec<Allocation>, usize) {
        let mut in_flight = match self.in_flight.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let st = self.state.read();
        let (accepted, rejected) = check_plan(&st, placements, &in_flight);
        for a in &accepted {
            in_flight.insert(a.id.clone(), a.clone());
        }
        (accepted, rejected)
    }

    /// Plan applier, second half: the committed (or failed) placements are no longer in flight.
    fn release(&self, placements: &[Allocation]) {
        let mut in_flight = match self.in_flight.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for a in placements {
            in_flight.remove(&a.id);
        }
    }

    /// Schedules one evaluation and commits what fits.
    async fn run_eval(&self, eval_id: &str) -> EvalReport {
        let mut report = EvalReport::default();
        let started = Instant::now();
        let computed = {
            let st = self.state.read();
            let Some(eval) = st.evals.get(eval_id).cloned() else { return report };
            if eval.status != eval_status::PENDING && eval.status != eval_status::BLOCKED {
                return report;
            }
            let job = st.job(&eval.namespace, &eval.job_id).cloned();
            let plan = scheduler::schedule(&st, job.as_ref(), &eval, now_ms());
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
            (eval, plan, superseded)
        };
        let (mut eval, plan, superseded) = computed;
        let (accepted, rejected) = self.admit(plan.placements);
        let (stops, failed, mut queued) = (plan.stops, plan.failed_tg_allocs, plan.queued_allocations);
        Metrics::add(&self.metrics.schedule_micros_total, started.elapsed().as_micros() as u64);
        Metrics::inc(&self.metrics.evals_processed);
        if rejected > 0 {
            Metrics::add(&self.metrics.plan_placements_rejected, rejected as u64);
        }

        let unplaced: u32 = queued.values().sum();
        let was_blocked = eval.status == eval_status::BLOCKED;
        let mut new_evals = superseded;
        report.unblocked = new_evals.iter().map(|e| e.id.clone()).collect();
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
                report.blocked.push((Reverse(eval.priority), eval.create_index, eval.id.clone()));
                report.outcome = Some(EvalOutcome::StillBlocked);
                return report;
            }
            if was_blocked {
                eval.queued_allocations = queued;
                eval.failed_tg_allocs = failed;
                eval.status_description = format!("{unplaced} allocations wait for capacity");
                report.blocked.push((Reverse(eval.priority), eval.create_index, eval.id.clone()));
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
        report.outcome = Some(outcome);
        let placed = accepted.len() as u64;
        let new_blocked: Vec<(Reverse<i32>, String)> = new_evals
            .iter()
            .filter(|e| e.status == eval_status::BLOCKED)
            .map(|e| (Reverse(e.priority), e.id.clone()))
            .collect();
        let committed = accepted.clone();
        let req = Request {
            now_ms: now_ms(),
            command: Command::ApplyPlan(PlanResult { eval: Some(eval), placements: accepted, stops, new_evals }),
        };
        let result = self.raft.write(req).await;
        self.release(&committed);
        match result {
            Ok(resp) => {
                Metrics::inc(&self.metrics.plans_applied);
                Metrics::add(&self.metrics.placements, placed);
                // A new blocked evaluation's create index is the plan's index: submit order.
                for (p, id) in new_blocked {
                    report.blocked.push((p, resp.index, id));
                }
            }
            Err(e) => {
                tracing::warn!(eval_id, error = %e, "could not commit plan; the evaluation stays pending");
                report.blocked.retain(|k| k.2 != eval_id);
            }
        }
        report
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

/// A job's biggest per-allocation request, per dimension: cpu, memory, disk, milli-GPUs. Uses the
/// scheduler's own arithmetic (`Ask::for_group`) so both agree on what a group asks for.
fn scheduler_ask(job: &mlp_proto::v1::Job) -> [u64; 4] {
    let mut ask = [0u64; 4];
    for g in &job.groups {
        let a = scheduler::resources::Ask::for_group(g);
        let gpu: u64 = a.gpus.iter().map(|x| x.shape.total_milli()).sum();
        for (slot, v) in ask.iter_mut().zip([a.cpu_mhz, a.memory_mib, a.disk_mib, gpu]) {
            *slot = (*slot).max(v);
        }
    }
    ask
}

/// The plan applier's check: every node's placements must still fit the latest state plus the
/// placements of plans still being committed. Returns the accepted placements and how many were
/// rejected; only the conflicting nodes' part of a plan is rejected.
fn check_plan(
    st: &crate::state::ClusterState,
    placements: Vec<Allocation>,
    in_flight: &BTreeMap<String, Allocation>,
) -> (Vec<Allocation>, usize) {
    let mut by_node: BTreeMap<String, Vec<Allocation>> = BTreeMap::new();
    for p in placements {
        by_node.entry(p.node_id.clone()).or_default().push(p);
    }
    let mut accepted = Vec::new();
    let mut rejected = 0;
    for (node_id, allocs) in by_node {
        let fits = match st.nodes.get(&node_id) {
            Some(node) => {
                let refs: Vec<&Allocation> =
                    in_flight.values().filter(|a| a.node_id == node_id).chain(allocs.iter()).collect();
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
