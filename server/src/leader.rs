//! What only the leader does: run pending evaluations through the scheduler, re-check and commit
//! their plans (the plan applier), keep blocked evaluations until capacity frees, and mark nodes
//! that miss their heartbeat TTL as down, run delayed (rescheduling) evaluations when they are
//! due, and drive node drains (the drainer). Garbage collection is its own loop, in `gc.rs`.
//!
//! Everything here is rebuilt from the replicated state whenever this server becomes leader, so a
//! leader change loses nothing: pending evaluations are in the state, blocked ones too, and
//! heartbeat deadlines restart with a grace period.

pub mod gc;
pub mod periodic;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_proto::consts::{alloc_client, alloc_desired, eval_status, eval_trigger, node_status};
use mlp_proto::v1::{AllocMetric, Allocation, Evaluation};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::plan_apply::{check_plan, Checked};
use crate::raft::node::RaftNode;
use crate::scheduler;
use crate::state::{Command, Effect, PlanResult, Request, StateHandle};

/// Heartbeat settings. The TTL scales with the cluster like Nomad's:
/// `max(ttl, nodes / max_heartbeats_per_second)`, so the leader handles at most about
/// `max_heartbeats_per_second` heartbeats a second however many nodes there are.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatSettings {
    /// The smallest TTL (`--heartbeat-min-ttl`): a node that sends nothing for its TTL is
    /// marked down.
    pub ttl: Duration,
    /// Extra time every node gets when a server becomes leader.
    pub failover_grace: Duration,
    /// `--max-heartbeats-per-second`.
    pub max_heartbeats_per_second: f64,
}

/// Default `--max-heartbeats-per-second` (Nomad's).
pub const DEFAULT_MAX_HEARTBEATS_PER_SECOND: f64 = 50.0;

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings {
            ttl: Duration::from_secs(10),
            failover_grace: Duration::from_secs(10),
            max_heartbeats_per_second: DEFAULT_MAX_HEARTBEATS_PER_SECOND,
        }
    }
}

impl HeartbeatSettings {
    /// The TTL for a cluster of `nodes` live nodes.
    pub fn ttl_for(&self, nodes: usize) -> Duration {
        let scaled = if self.max_heartbeats_per_second > 0.0 {
            Duration::from_secs_f64(nodes as f64 / self.max_heartbeats_per_second)
        } else {
            Duration::ZERO
        };
        self.ttl.max(scaled)
    }

    /// The TTL for the nodes in `st` that are not down.
    pub fn ttl_in(&self, st: &crate::state::ClusterState) -> Duration {
        self.ttl_for(st.nodes.values().filter(|n| n.status != node_status::DOWN).count())
    }
}

/// Milliseconds since the Unix epoch, the clock written into commands.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Heartbeat deadlines, shared with the agent RPCs that refresh them.
#[derive(Debug, Default)]
pub struct Heartbeats {
    deadlines: std::sync::Mutex<HashMap<String, Instant>>,
    /// Each node's last GPU measurements, from its heartbeats (memory only, never in Raft).
    gpu_stats: std::sync::Mutex<HashMap<String, (Instant, Vec<mlp_proto::v1::GpuStats>)>>,
}

/// GPU measurements older than this many heartbeat TTLs are dropped (the node is down, gone,
/// or heartbeats another server now).
const GPU_STATS_TTLS: u32 = 3;

impl Heartbeats {
    /// Keeps `stats` as node `node_id`'s latest GPU measurements (none: forgets them).
    pub fn record_gpu_stats(&self, node_id: &str, stats: Vec<mlp_proto::v1::GpuStats>, ttl: Duration) {
        if let Ok(mut m) = self.gpu_stats.lock() {
            let now = Instant::now();
            m.retain(|_, (until, _)| *until > now);
            if stats.is_empty() {
                m.remove(node_id);
            } else {
                m.insert(node_id.to_string(), (now + ttl * GPU_STATS_TTLS, stats));
            }
        }
    }

    /// Node `node_id`'s latest GPU measurements as this server got them (none once they are
    /// older than a few heartbeat TTLs).
    pub fn gpu_stats(&self, node_id: &str) -> Vec<mlp_proto::v1::GpuStats> {
        let now = Instant::now();
        self.gpu_stats
            .lock()
            .ok()
            .and_then(|m| m.get(node_id).filter(|(until, _)| *until > now).map(|(_, s)| s.clone()))
            .unwrap_or_default()
    }

    /// Every node's latest GPU measurements that are still current.
    pub fn all_gpu_stats(&self) -> Vec<(String, Vec<mlp_proto::v1::GpuStats>)> {
        let now = Instant::now();
        self.gpu_stats
            .lock()
            .map(|m| m.iter().filter(|(_, (until, _))| *until > now).map(|(k, (_, v))| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

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
    /// Scheduler settings (preemption per job type).
    pub options: scheduler::Options,
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
    /// Blocked gang evaluations' wait deadlines (ms since the epoch), by evaluation id.
    deadlines: BTreeMap<String, u64>,
    /// Freed capacity went to the blocked evaluations that outrank the ready ones; the others
    /// are retried once the ready ones ran.
    unblock_rest: bool,
    /// Pending evaluations that wait until a time (delayed rescheduling): (wait_until_ms, id).
    delayed: BTreeSet<(u64, String)>,
}

impl Queues {
    fn absorb(&mut self, e: Effect, leader: &Leader) {
        match e {
            Effect::EvalsPending(ids) => {
                for id in ids {
                    let wait_until = leader.state.read().evals.get(&id).map(|e| e.wait_until_ms).unwrap_or(0);
                    self.enqueue(id, wait_until, now_ms());
                }
            }
            Effect::CapacityChanged => self.capacity_changed = true,
            Effect::Reset => {
                leader.rebuild(self);
                self.capacity_changed = true;
            }
        }
    }

    /// Empties the queues (not the jobs being planned: their workers still report back).
    fn forget(&mut self) {
        self.ready = Default::default();
        self.queued = Default::default();
        self.blocked = Default::default();
        self.deadlines = Default::default();
        self.delayed = Default::default();
    }

    /// Queues a pending evaluation: ready now, or delayed until `wait_until`.
    fn enqueue(&mut self, id: String, wait_until: u64, now: u64) {
        if wait_until > now {
            self.delayed.insert((wait_until, id));
        } else if self.queued.insert(id.clone()) {
            self.ready.push_back(id);
        }
    }

    /// Moves the delayed evaluations that are due to the ready queue.
    fn release_due(&mut self, now: u64) {
        while let Some((at, id)) = self.delayed.first().cloned() {
            if at > now {
                break;
            }
            self.delayed.remove(&(at, id.clone()));
            if self.queued.insert(id.clone()) {
                self.ready.push_back(id);
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
            self.deadlines.remove(id);
        }
        self.blocked.extend(report.blocked);
        self.deadlines.extend(report.deadlines);
    }

    /// Blocked gang evaluations whose wait ran out: they are re-run once more, and give up.
    fn expire(&mut self, now_ms: u64) {
        let due: Vec<String> = self.deadlines.iter().filter(|(_, d)| **d <= now_ms).map(|(id, _)| id.clone()).collect();
        for id in due {
            self.deadlines.remove(&id);
            let before = self.blocked.len();
            self.blocked.retain(|k| k.2 != id);
            if self.blocked.len() < before && self.queued.insert(id.clone()) {
                self.ready.push_back(id);
            }
        }
    }

    /// The highest priority among the ready evaluations (None when none is ready).
    fn ready_priority(&self, state: &StateHandle) -> Option<i32> {
        let st = state.read();
        self.ready.iter().filter_map(|id| st.evals.get(id)).map(|e| e.priority).max()
    }

    /// Whether a blocked evaluation must get freed capacity before the ready ones run: its
    /// priority is at least theirs (strict priority, see `Leader::run`).
    fn blocked_outranks(&self, state: &StateHandle) -> bool {
        let Some(top) = self.blocked.first().map(|k| k.0 .0) else { return false };
        self.ready_priority(state).is_none_or(|p| top >= p)
    }
}

/// What one evaluation run changed in the blocked set.
#[derive(Debug, Default)]
struct EvalReport {
    outcome: Option<EvalOutcome>,
    blocked: Vec<BlockedKey>,
    unblocked: Vec<String>,
    /// Wait deadlines of blocked gang evaluations.
    deadlines: Vec<(String, u64)>,
    /// Whether the evaluation failed on resources alone on every usable node (no filter, no
    /// gang, no device constraint): then a later evaluation asking for more can't fit either.
    resources_only: bool,
}

impl Leader {
    /// Runs until `effects` closes. Does work only while this server is leader.
    pub async fn run(self: Arc<Self>, mut effects: mpsc::UnboundedReceiver<Effect>) {
        let mut leader_rx = self.raft.leader_watch();
        let mut q = Queues::default();
        let mut workers: tokio::task::JoinSet<(String, EvalReport)> = tokio::task::JoinSet::new();
        let mut was_leader = false;
        let mut health_clock = crate::deploy::HealthClock::default();
        // When an allocation of a deployment reaches its min_healthy_time (besides the tick).
        let mut deploy_wake: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let is_leader = *leader_rx.borrow();
            if is_leader && !was_leader {
                self.rebuild(&mut q);
                q.capacity_changed = true;
                tracing::info!(pending = q.ready.len(), blocked = q.blocked.len(), "became leader; scheduling queues rebuilt");
            }
            if was_leader && !is_leader {
                // Rebuilt from the state when this server is elected again; a follower keeps none.
                q.forget();
            }
            was_leader = is_leader;

            if is_leader {
                while let Ok(e) = effects.try_recv() {
                    q.absorb(e, &self);
                }
                // Strict priority: freed capacity goes to blocked evaluations (in priority, then
                // submit, order) before any ready evaluation of lower priority can take it.
                let hold = q.capacity_changed && q.blocked_outranks(&self.state);
                if hold && workers.is_empty() {
                    q.capacity_changed = false;
                    let floor = q.ready_priority(&self.state);
                    self.unblock(&mut q, floor).await;
                    // Lower-priority blocked evaluations get their turn once the ready ones ran.
                    q.unblock_rest = floor.is_some();
                    continue;
                }
                while !hold && workers.len() < SCHEDULER_WORKERS {
                    let Some((id, job)) = q.next_runnable(&self.state) else { break };
                    q.busy_jobs.insert(job.clone());
                    let me = self.clone();
                    workers.spawn(async move { (job, me.run_eval(&id).await) });
                }
                // Blocked evaluations get capacity in order, so they run alone and in sequence.
                if workers.is_empty() && q.ready.is_empty() && (q.capacity_changed || q.unblock_rest) {
                    q.capacity_changed = false;
                    q.unblock_rest = false;
                    self.unblock(&mut q, None).await;
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
                    // A follower's queues would only grow (nothing runs them): they are rebuilt
                    // from the state when it is elected, so it drops what its applies announce.
                    if *leader_rx.borrow() {
                        q.absorb(e, &self);
                    }
                }
                r = leader_rx.changed() => {
                    if r.is_err() { return; }
                }
                _ = tokio::time::sleep_until(deploy_wake.unwrap_or_else(tokio::time::Instant::now)), if deploy_wake.is_some() && is_leader => {
                    deploy_wake = self.watch_deployments(&mut health_clock).await;
                }
                _ = tick.tick() => {
                    if is_leader {
                        q.expire(now_ms());
                        self.check_heartbeats().await;
                        q.release_due(now_ms());
                        self.drain_nodes().await;
                        deploy_wake = self.watch_deployments(&mut health_clock).await;
                    }
                }
            }
        }
    }

    fn rebuild(&self, q: &mut Queues) {
        q.ready.clear();
        q.queued.clear();
        q.blocked.clear();
        q.deadlines.clear();
        q.delayed.clear();
        let st = self.state.read();
        let mut pending: Vec<&Evaluation> = st.evals.values().filter(|e| e.status == eval_status::PENDING).collect();
        pending.sort_by_key(|e| (Reverse(e.priority), e.create_index));
        let now = now_ms();
        for e in pending {
            q.enqueue(e.id.clone(), e.wait_until_ms, now);
        }
        for e in st.evals.values().filter(|e| e.status == eval_status::BLOCKED) {
            q.blocked.insert((Reverse(e.priority), e.create_index, e.id.clone()));
            if e.wait_deadline_ms > 0 {
                q.deadlines.insert(e.id.clone(), e.wait_deadline_ms);
            }
        }
        let deadline = Instant::now() + self.settings.ttl_in(&st) + self.settings.failover_grace;
        self.heartbeats.reset(st.nodes.values().filter(|n| n.status != node_status::DOWN).map(|n| n.id.clone()), deadline);
    }

    /// Re-runs blocked evaluations, the namespace with the smallest dominant share first and
    /// within a namespace in priority, then submit, order (only those of priority at least
    /// `floor`, when given). Runs that place nothing write nothing, so a long blocked
    /// queue costs scheduler time only, not Raft writes.
    async fn unblock(&self, q: &mut Queues, floor: Option<i32>) {
        let mut order: Vec<(String, BlockedKey)> = {
            let st = self.state.read();
            q.blocked
                .iter()
                .filter(|k| floor.is_none_or(|f| k.0 .0 >= f))
                .map(|k| (st.evals.get(&k.2).map(|e| e.namespace.clone()).unwrap_or_default(), k.clone()))
                .collect()
        };
        // Across namespaces, dominant-resource fair share: the namespace holding the smallest
        // share of the cluster's most-used resource goes first (shares recomputed as its
        // evaluations place); within one namespace, priority then submit order.
        // The ready nodes' capacity is taken once for the pass (the denominators of the shares).
        let mut shares: BTreeMap<String, f64> = BTreeMap::new();
        let namespaces: BTreeSet<&str> = order.iter().map(|(ns, _)| ns.as_str()).collect();
        let capacity = (namespaces.len() > 1).then(|| scheduler::quota::cluster_capacity(&self.state.read()));
        if let Some(capacity) = &capacity {
            let st = self.state.read();
            for ns in namespaces {
                shares.insert(ns.to_string(), scheduler::quota::share_of(&st, ns, capacity));
            }
        }
        // Requests that failed for lack of capacity in this pass: a later evaluation asking for
        // at least as much in every dimension can't fit either.
        let mut exhausted: Vec<[u64; 4]> = Vec::new();
        while let Some(pos) =
            scheduler::quota::next_fair(order.iter().map(|(ns, _)| ns.as_str()), |ns| shares.get(ns).copied().unwrap_or(0.0))
        {
            let (ns, key) = order.remove(pos);
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
            let still_blocked = report.outcome == Some(EvalOutcome::StillBlocked) && report.resources_only;
            q.record(report);
            if let (Some(share), Some(capacity)) = (shares.get_mut(&ns), &capacity) {
                *share = scheduler::quota::share_of(&self.state.read(), &ns, capacity);
            }
            if still_blocked {
                if let Some(ask) = ask {
                    exhausted.push(ask);
                }
            }
        }
    }

    /// The deployment watcher (`deploy::watch`): commits what the running deployments'
    /// allocation health and deadlines call for.
    /// Returns when to run again for an allocation whose `min_healthy_time` runs out before
    /// the next tick.
    async fn watch_deployments(&self, clock: &mut crate::deploy::HealthClock) -> Option<tokio::time::Instant> {
        let now = now_ms();
        let updates = {
            let st = self.state.read();
            if st.deployments.is_empty() {
                return None;
            }
            crate::deploy::watch(&st, now, clock)
        };
        for u in updates {
            let id = u.deployment_id.clone();
            if let Some(s) = &u.status {
                tracing::info!(deployment = %id, status = %s, description = u.description.as_deref().unwrap_or(""), "deployment status");
            }
            if let Err(e) = self.raft.write(Request { now_ms: now_ms(), command: Command::UpdateDeployment(Box::new(u)) }).await {
                tracing::warn!(deployment = %id, error = %e, "could not commit a deployment update");
            }
        }
        // A few ms late, so that the allocation is past its min_healthy_time on the next look.
        clock.next_due_ms.map(|due| tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now) + 5))
    }

    async fn check_heartbeats(&self) {
        let expired = self.heartbeats.expired(Instant::now());
        for node_id in expired {
            let ttl = self.settings.ttl_in(&self.state.read());
            let evals = {
                let st = self.state.read();
                match st.nodes.get(&node_id) {
                    Some(n) if n.status != node_status::DOWN => {}
                    _ => continue,
                }
                node_evals(&st, &node_id)
            };
            tracing::warn!(node_id, ttl_ms = ttl.as_millis() as u64, "node missed its heartbeat TTL; marking down");
            let req = Request {
                now_ms: now_ms(),
                command: Command::UpdateNodeStatus {
                    node_id: node_id.clone(),
                    status: node_status::DOWN.to_string(),
                    description: format!("missed heartbeat TTL of {}s", ttl.as_secs_f64()),
                    evals,
                },
            };
            match self.raft.write(req).await {
                Ok(_) => Metrics::inc(&self.metrics.nodes_marked_down),
                Err(e) => tracing::warn!(node_id, error = %e, "could not mark node down"),
            }
        }
    }

    /// The drainer: for every draining node, asks the scheduler to move the next allocations
    /// (`drain_step`), and ends the drain when nothing is left on the node.
    async fn drain_nodes(&self) {
        let now = now_ms();
        let steps: Vec<(String, DrainStep)> = {
            let st = self.state.read();
            st.nodes
                .values()
                .filter(|n| n.drain_strategy.is_some())
                .map(|n| (n.id.clone(), drain_step(&st, n, now)))
                .filter(|(_, s)| s.done || !s.migrate.is_empty())
                .collect()
        };
        for (node_id, step) in steps {
            let command = if step.done {
                tracing::info!(node_id, "node drain complete; the node stays ineligible");
                Command::UpdateNodeDrain { node_id: node_id.clone(), drain: None, mark_eligible: false, message: "drain complete".into() }
            } else {
                tracing::info!(node_id, allocs = step.migrate.len(), forced = step.forced, "drain: migrating allocations");
                let evals = {
                    let st = self.state.read();
                    drain_evals(&st, &node_id, &step.migrate)
                };
                Command::MarkAllocsMigrate { alloc_ids: step.migrate, evals }
            };
            if let Err(e) = self.raft.write(Request { now_ms: now, command }).await {
                tracing::warn!(node_id, error = %e, "drainer could not commit");
            }
        }
    }

    /// Plan applier, first half: checks placements against the latest state plus every plan
    /// still being committed, and reserves the accepted ones. Returns (accepted, rejected count).
    /// Gangs are accepted or rejected whole; evictions stand only with their preemptor; the
    /// evicted allocations' jobs get evaluations (their replacements). See `plan_apply`.
    fn admit(&self, plan: scheduler::Plan) -> (Checked, Vec<Evaluation>) {
        let mut in_flight = match self.in_flight.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let st = self.state.read();
        let checked = check_plan(&st, plan, &in_flight);
        for a in &checked.accepted {
            in_flight.insert(a.id.clone(), a.clone());
        }
        let evals = crate::plan_apply::victim_evals(&st, &checked.preemptions);
        (checked, evals)
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
        let computed = 'compute: {
            let st = self.state.read();
            let Some(eval) = st.evals.get(eval_id).cloned() else { return report };
            if eval.status != eval_status::PENDING && eval.status != eval_status::BLOCKED {
                return report;
            }
            let job = st.job(&eval.namespace, &eval.job_id).cloned();
            // One evaluation that trips the scheduler fails alone; the worker and server go on.
            let scheduled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                scheduler::schedule_opts(&st, job.as_ref(), &eval, now_ms(), self.options)
            }));
            let plan = match scheduled {
                Ok(plan) => plan,
                Err(panic) => break 'compute Err((eval, panic_message(panic.as_ref()))),
            };
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
            Ok((eval, plan, superseded))
        };
        let (mut eval, mut plan, superseded) = match computed {
            Ok(computed) => computed,
            Err((eval, why)) => return self.fail_eval(eval, why, report).await,
        };
        let (failed, mut queued) = (std::mem::take(&mut plan.failed_tg_allocs), std::mem::take(&mut plan.queued_allocations));
        let (follow_ups, annotations) = (std::mem::take(&mut plan.new_evals), std::mem::take(&mut plan.annotations));
        let (deployment, cancel_deployments) = (plan.deployment.take(), std::mem::take(&mut plan.cancel_deployments));
        let gang_timeout = gang_wait(&self.state, &eval, &queued);
        // Blocked by its namespace's quota, not by capacity: another namespace may still fit.
        let quota_reason = plan.quota_limit_reached.take();
        report.resources_only = quota_reason.is_none() && resources_only(&self.state, &eval, &failed);
        let waits_for = match &quota_reason {
            Some(why) => format!("quota: {why}"),
            None => "capacity".to_string(),
        };
        let (checked, victim_evals) = self.admit(plan);
        let Checked { accepted, stops, preemptions, rejected } = checked;
        Metrics::add(&self.metrics.schedule_micros_total, started.elapsed().as_micros() as u64);
        Metrics::inc(&self.metrics.evals_processed);
        if rejected > 0 {
            Metrics::add(&self.metrics.plan_placements_rejected, rejected as u64);
        }

        let unplaced: u32 = queued.values().sum();
        let was_blocked = eval.status == eval_status::BLOCKED;
        let mut new_evals = superseded;
        let has_follow_ups = !follow_ups.is_empty() || !annotations.is_empty() || deployment.is_some() || !cancel_deployments.is_empty();
        report.unblocked = new_evals.iter().map(|e| e.id.clone()).collect();
        let now = now_ms();
        let outcome;
        if rejected > 0 {
            // The plan went stale between snapshot and apply: commit what fits, retry the rest.
            queued.clear();
            eval.status = eval_status::PENDING.to_string();
            eval.status_description = format!("{rejected} placements conflicted with newer state; retrying");
            outcome = EvalOutcome::Retry;
        } else if unplaced > 0 {
            Metrics::inc(&self.metrics.evals_blocked);
            let timed_out = was_blocked && eval.wait_deadline_ms > 0 && now >= eval.wait_deadline_ms;
            // A blocked evaluation whose cause switched between capacity and quota is written
            // again, so that what it shows stays true; otherwise a re-run that places nothing
            // writes nothing.
            let same_cause = quota_reason.is_some() != eval.quota_limit_reached.is_empty();
            if was_blocked && !timed_out && same_cause && accepted.is_empty() && stops.is_empty() && new_evals.is_empty() && !has_follow_ups
            {
                report.blocked.push((Reverse(eval.priority), eval.create_index, eval.id.clone()));
                if eval.wait_deadline_ms > 0 {
                    report.deadlines.push((eval.id.clone(), eval.wait_deadline_ms));
                }
                report.outcome = Some(EvalOutcome::StillBlocked);
                return report;
            }
            if timed_out {
                // A gang waited its whole timeout: the job is reported unplaceable, with why.
                let why: Vec<String> = explain_failures(&failed).into_iter().map(|l| l.trim().to_string()).collect();
                eval.status = eval_status::FAILED.to_string();
                eval.unplaceable_reason = format!(
                    "unplaceable: {unplaced} allocations could not be placed within the gang timeout ({}s): {}",
                    gang_timeout.map_or(0, |t| t / 1000),
                    why.join("; ")
                );
                eval.status_description = eval.unplaceable_reason.clone();
                eval.queued_allocations = queued;
                eval.failed_tg_allocs = failed;
                outcome = EvalOutcome::Done;
            } else if was_blocked {
                eval.queued_allocations = queued;
                eval.failed_tg_allocs = failed;
                eval.status_description = format!("{unplaced} allocations wait for {waits_for}");
                eval.quota_limit_reached = quota_reason.clone().unwrap_or_default();
                report.blocked.push((Reverse(eval.priority), eval.create_index, eval.id.clone()));
                if eval.wait_deadline_ms > 0 {
                    report.deadlines.push((eval.id.clone(), eval.wait_deadline_ms));
                }
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
                    status_description: format!("{unplaced} allocations wait for {waits_for}"),
                    quota_limit_reached: quota_reason.clone().unwrap_or_default(),
                    job_modify_index: eval.job_modify_index,
                    queued_allocations: queued.clone(),
                    failed_tg_allocs: failed.clone(),
                    previous_eval: eval.id.clone(),
                    wait_deadline_ms: gang_timeout.map_or(0, |t| now.saturating_add(t)),
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
            eval.quota_limit_reached.clear();
            eval.queued_allocations = queued;
            eval.failed_tg_allocs = BTreeMap::new();
            outcome = EvalOutcome::Done;
        }
        report.outcome = Some(outcome);
        let placed = accepted.len() as u64;
        let new_blocked: Vec<(Reverse<i32>, String, u64)> = new_evals
            .iter()
            .filter(|e| e.status == eval_status::BLOCKED)
            .map(|e| (Reverse(e.priority), e.id.clone(), e.wait_deadline_ms))
            .collect();
        new_evals.extend(victim_evals);
        let committed = accepted.clone();
        new_evals.extend(follow_ups);
        let req = Request {
            now_ms: now_ms(),
            command: Command::ApplyPlan(PlanResult {
                eval: Some(eval),
                placements: accepted,
                stops,
                new_evals,
                annotations,
                preemptions,
                deployment,
                cancel_deployments,
            }),
        };
        let result = self.raft.write(req).await;
        self.release(&committed);
        match result {
            Ok(resp) => {
                Metrics::inc(&self.metrics.plans_applied);
                Metrics::add(&self.metrics.placements, placed);
                // A new blocked evaluation's create index is the plan's index: submit order.
                for (p, id, deadline) in new_blocked {
                    if deadline > 0 {
                        report.deadlines.push((id.clone(), deadline));
                    }
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

impl Leader {
    /// Commits `eval` as failed because the scheduler could not process it; `mlp eval status`
    /// shows why.
    async fn fail_eval(&self, mut eval: Evaluation, why: String, mut report: EvalReport) -> EvalReport {
        tracing::error!(eval_id = %eval.id, job_id = %eval.job_id, error = %why, "the scheduler failed on an evaluation; marking it failed");
        Metrics::inc(&self.metrics.evals_processed);
        eval.status = eval_status::FAILED.to_string();
        eval.status_description = format!("the scheduler failed on this evaluation: {why}");
        let req = Request { now_ms: now_ms(), command: Command::ApplyPlan(PlanResult { eval: Some(eval), ..Default::default() }) };
        if let Err(e) = self.raft.write(req).await {
            tracing::warn!(error = %e, "could not commit the failed evaluation; it stays pending");
        }
        report.outcome = Some(EvalOutcome::Done);
        report
    }
}

/// The text of a caught panic (its `&str` or `String` payload).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic without a message".to_string()
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

/// How long a blocked gang waits (ms) when one of the groups left unplaced is a gang: the
/// shortest of those groups' timeouts (default [`DEFAULT_GANG_TIMEOUT_MS`]). None: no gang waits.
fn gang_wait(state: &StateHandle, eval: &Evaluation, queued: &BTreeMap<String, u32>) -> Option<u64> {
    let st = state.read();
    let job = st.job(&eval.namespace, &eval.job_id)?;
    job.groups
        .iter()
        .filter(|g| scheduler::place::gang_size(g) > 0 && queued.get(&g.name).is_some_and(|n| *n > 0))
        .map(|g| if g.gang_timeout_ms > 0 { g.gang_timeout_ms } else { DEFAULT_GANG_TIMEOUT_MS })
        .min()
}

/// How long a gang waits for capacity unless its group says otherwise.
pub const DEFAULT_GANG_TIMEOUT_MS: u64 = 5 * 60 * 1000;

/// Whether every failure is plain resource exhaustion on every usable node (see
/// `EvalReport::resources_only`).
fn resources_only(state: &StateHandle, eval: &Evaluation, failed: &BTreeMap<String, AllocMetric>) -> bool {
    let st = state.read();
    let Some(job) = st.job(&eval.namespace, &eval.job_id) else { return false };
    let device_constraints = job
        .groups
        .iter()
        .flat_map(|g| &g.tasks)
        .filter_map(|t| t.resources.as_ref()?.gpu.as_ref())
        .any(|g| !g.models.is_empty() || g.memory_mib > 0);
    !device_constraints
        && job.groups.iter().all(|g| scheduler::place::gang_size(g) == 0)
        && failed.values().all(|m| m.nodes_filtered == 0 && m.gang_failure.is_empty())
}

/// What the drainer does next for one node.
#[derive(Debug, Default, PartialEq)]
pub struct DrainStep {
    /// Allocations to mark for migration now.
    pub migrate: Vec<String>,
    /// Nothing is left to move: the drain is complete.
    pub done: bool,
    /// The deadline passed: everything left moves at once.
    pub forced: bool,
}

/// The drainer's decision for `node` (pure). Every live allocation (desired `run`, not
/// terminal) on the node must move. Per task group at most `migrate.max_parallel` (default 1)
/// of the group's allocations may be in flight, counted over the whole cluster: marked for
/// migration but not yet replaced, or placed but not yet running. At the drain's deadline
/// everything left is marked at once.
pub fn drain_step(st: &crate::state::ClusterState, node: &mlp_proto::v1::Node, now: u64) -> DrainStep {
    let mut step = DrainStep::default();
    let Some(drain) = &node.drain_strategy else { return step };
    // System and sysbatch allocations are the system scheduler's: it stops them on a draining
    // node, unless the drain ignores them (`--ignore-system`: the drain is done without them).
    let mut remaining: Vec<&Allocation> =
        st.live_allocs_for_node(&node.id).filter(|a| !(drain.ignore_system && scheduler::system::is_per_node_alloc(st, a))).collect();
    if remaining.is_empty() {
        step.done = true;
        return step;
    }
    remaining.retain(|a| !a.desired_migrate && !scheduler::system::is_per_node_alloc(st, a));
    remaining.sort_by(|a, b| {
        (&a.namespace, &a.job_id, &a.task_group, a.index, &a.id).cmp(&(&b.namespace, &b.job_id, &b.task_group, b.index, &b.id))
    });
    if drain.force_deadline_ms > 0 && now >= drain.force_deadline_ms {
        step.forced = true;
        step.migrate = remaining.iter().map(|a| a.id.clone()).collect();
        return step;
    }
    let mut groups: BTreeMap<(String, String, String), Vec<&Allocation>> = BTreeMap::new();
    for a in remaining {
        groups.entry((a.namespace.clone(), a.job_id.clone(), a.task_group.clone())).or_default().push(a);
    }
    for ((ns, job_id, group), allocs) in groups {
        let tg = st.job(&ns, &job_id).and_then(|j| j.groups.iter().find(|g| g.name == group));
        let Some(tg) = tg else {
            // The job or group is gone: nothing to keep running, move (stop) them all.
            step.migrate.extend(allocs.iter().map(|a| a.id.clone()));
            continue;
        };
        let max_parallel = tg.migrate.as_ref().map(|m| m.max_parallel).unwrap_or(1).max(1) as usize;
        let in_group: Vec<&Allocation> = st.allocs_for_job(&ns, &job_id).filter(|a| a.task_group == group).collect();
        let in_flight = in_group
            .iter()
            .filter(|a| scheduler::resources::is_live(a))
            .filter(|a| a.desired_migrate || a.client_status != alloc_client::RUNNING)
            .count();
        // A migrated allocation already stopped whose index no live allocation holds (its
        // replacement could not be placed: the cluster is full) is still in flight; without
        // counting it a drain onto a full cluster would stop the whole group. (Until the
        // deadline, which moves everything.)
        let unreplaced = in_group
            .iter()
            .filter(|a| a.desired_migrate && a.desired_status != alloc_desired::RUN && (a.index as usize) < tg.effective_count() as usize)
            .filter(|a| !in_group.iter().any(|b| b.index == a.index && scheduler::resources::is_live(b)))
            .map(|a| a.index)
            .collect::<std::collections::BTreeSet<u32>>()
            .len();
        let budget = max_parallel.saturating_sub(in_flight + unreplaced);
        step.migrate.extend(allocs.iter().take(budget).map(|a| a.id.clone()));
    }
    step
}

/// One `node-drain` evaluation per job of the allocations being moved.
fn drain_evals(st: &crate::state::ClusterState, node_id: &str, alloc_ids: &[String]) -> Vec<Evaluation> {
    let jobs: BTreeSet<(String, String)> =
        alloc_ids.iter().filter_map(|id| st.allocs.get(id)).map(|a| (a.namespace.clone(), a.job_id.clone())).collect();
    jobs.into_iter()
        .map(|(ns, id)| {
            let (priority, ty, jmi) = st.job(&ns, &id).map(|j| (j.priority, j.r#type.clone(), j.job_modify_index)).unwrap_or_default();
            Evaluation {
                id: uuid::Uuid::new_v4().to_string(),
                namespace: ns,
                job_id: id,
                priority,
                r#type: ty,
                triggered_by: eval_trigger::NODE_DRAIN.to_string(),
                node_id: node_id.to_string(),
                status: eval_status::PENDING.to_string(),
                job_modify_index: jmi,
                ..Default::default()
            }
        })
        .collect()
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
        out.push(format!(
            "task group {group:?}: {} nodes evaluated, {} filtered, {} exhausted",
            m.nodes_evaluated, m.nodes_filtered, m.nodes_exhausted
        ));
        for line in scheduler::explain(m) {
            out.push(format!("  * {line}"));
        }
    }
    out
}

#[cfg(test)]
mod drain_and_ttl_tests {
    use super::*;
    use crate::state::ClusterState;

    use mlp_proto::v1::{DrainStrategy, Job, MigrateStrategy, Node, TaskGroup};

    #[test]
    fn ttl_scales_with_nodes_above_the_minimum() {
        let s = HeartbeatSettings::default();
        assert_eq!(s.ttl_for(0), Duration::from_secs(10));
        assert_eq!(s.ttl_for(500), Duration::from_secs(10), "500 / 50 = 10 s: the minimum");
        assert_eq!(s.ttl_for(1000), Duration::from_secs(20));
        assert_eq!(s.ttl_for(10_000), Duration::from_secs(200));
        let fast = HeartbeatSettings { ttl: Duration::from_secs(2), max_heartbeats_per_second: 10.0, ..Default::default() };
        assert_eq!(fast.ttl_for(5), Duration::from_secs(2));
        assert_eq!(fast.ttl_for(50), Duration::from_secs(5));
    }

    fn alloc(id: &str, node: &str, index: u32, status: &str) -> Allocation {
        Allocation {
            id: id.into(),
            node_id: node.into(),
            job_id: "j".into(),
            namespace: "default".into(),
            task_group: "g".into(),
            index,
            desired_status: alloc_desired::RUN.into(),
            client_status: status.into(),
            ..Default::default()
        }
    }

    /// Node n1 draining with allocations a0..a3 of job j (max_parallel `mp`).
    fn draining(mp: Option<u32>, force_deadline_ms: u64) -> (ClusterState, Node) {
        let mut st = ClusterState::default();
        let node =
            Node { id: "n1".into(), drain_strategy: Some(DrainStrategy { force_deadline_ms, ..Default::default() }), ..Default::default() };
        st.nodes.insert("n1".into(), node.clone());
        let job = Job {
            id: "j".into(),
            namespace: "default".into(),
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(4),
                migrate: mp.map(|m| MigrateStrategy { max_parallel: m }),
                ..Default::default()
            }],
            ..Default::default()
        };
        st.jobs.insert("default/j".into(), job);
        for i in 0..4 {
            let a = alloc(&format!("a{i}"), "n1", i, alloc_client::RUNNING);
            st.allocs.insert(a.id.clone(), a);
        }
        st.rebuild_indexes();
        (st, node)
    }

    #[test]
    fn drain_moves_at_most_max_parallel_per_group() {
        let (mut st, node) = draining(None, 0);
        assert_eq!(drain_step(&st, &node, 0).migrate, ["a0"], "default max_parallel is 1");
        // a0 is marked: nothing more until its replacement runs.
        if let Some(a) = st.allocs.get_mut("a0") {
            a.desired_migrate = true;
        }
        assert!(drain_step(&st, &node, 0).migrate.is_empty());
        // The scheduler stopped a0 and placed b0 elsewhere, still pending: still nothing.
        if let Some(a) = st.allocs.get_mut("a0") {
            a.desired_status = alloc_desired::STOP.into();
        }
        let mut b0 = alloc("b0", "n2", 0, alloc_client::PENDING);
        b0.previous_allocation = "a0".into();
        st.allocs.insert(b0.id.clone(), b0);
        st.rebuild_indexes();
        assert!(drain_step(&st, &node, 0).migrate.is_empty());
        // b0 runs: the next one goes.
        if let Some(a) = st.allocs.get_mut("b0") {
            a.client_status = alloc_client::RUNNING.into();
        }
        assert_eq!(drain_step(&st, &node, 0).migrate, ["a1"]);

        let (st, node) = draining(Some(3), 0);
        assert_eq!(drain_step(&st, &node, 0).migrate, ["a0", "a1", "a2"]);
    }

    #[test]
    fn drain_waits_while_a_replacement_cannot_be_placed() {
        let (mut st, node) = draining(Some(1), 0);
        // a0 was stopped for migration and its replacement found no room: nothing else moves.
        if let Some(a) = st.allocs.get_mut("a0") {
            a.desired_migrate = true;
            a.desired_status = alloc_desired::STOP.into();
        }
        st.rebuild_indexes();
        assert!(drain_step(&st, &node, 0).migrate.is_empty(), "the group is one short; the drain must wait");
        // Until the deadline, when everything left moves.
        let (mut st, node) = draining(Some(1), 5_000);
        if let Some(a) = st.allocs.get_mut("a0") {
            a.desired_migrate = true;
            a.desired_status = alloc_desired::STOP.into();
            a.client_status = alloc_client::COMPLETE.into();
        }
        st.rebuild_indexes();
        assert!(drain_step(&st, &node, 1_000).migrate.is_empty());
        assert_eq!(drain_step(&st, &node, 5_000).migrate, ["a1", "a2", "a3"]);
    }

    #[test]
    fn drain_forces_at_the_deadline_and_completes_when_empty() {
        let (mut st, node) = draining(Some(1), 5_000);
        assert_eq!(drain_step(&st, &node, 4_999).migrate.len(), 1);
        let forced = drain_step(&st, &node, 5_000);
        assert!(forced.forced);
        assert_eq!(forced.migrate.len(), 4);
        for a in st.allocs.values_mut() {
            a.client_status = alloc_client::COMPLETE.into();
        }
        st.rebuild_indexes(); // changed outside `apply`: the live index follows by hand
        let done = drain_step(&st, &node, 6_000);
        assert!(done.done && done.migrate.is_empty());
    }
}
