//! Garbage collection, like Nomad's core scheduler (`core_sched.go`): which evaluations,
//! allocations, jobs and nodes the state can forget (`gc_candidates`, pure), and the leader loop
//! that commits them as `Command::GarbageCollect` entries every `--gc-interval`.
//!
//! The rules (age = now minus a time the state already holds):
//! * an **allocation** whose client status is terminal (complete, failed, lost, preempted), last
//!   modified at least `--eval-gc-threshold` ago, and whose job is gone or stopped, or which the
//!   reconciler no longer counts on (`scheduler::holds_index`: a finished batch allocation keeps
//!   its index so it never runs again; a failed or lost one not yet replaced keeps it until the
//!   reschedule decision is made). A live job's held allocations go only with the job;
//! * an **evaluation** that is complete, failed or canceled (never pending or blocked), last
//!   modified at least `--eval-gc-threshold` ago, that is not the latest evaluation of a job the
//!   state still has (so `job status` shows it), and that no remaining allocation was placed
//!   by (an evaluation leaves together with its allocations or after them, never before);
//! * a **job** that is stopped, or a batch job that is dead, whose evaluations and allocations
//!   are all terminal, and whose newest time (submission, its allocations' and evaluations'
//!   modify times) is at least `--job-gc-threshold` ago: the job, its versions, its evaluations
//!   and its allocations go together;
//! * a **node** that is down, has no allocation left, and last heartbeated at least
//!   `--node-gc-threshold` ago (an agent that comes back registers again);
//! * a tracking **run** (MLflow) deleted at least `--tracking-gc-threshold` ago, with its
//!   params, tags and metric points, and a tracking **experiment** deleted that long ago, with
//!   all its runs (`TrackingCommand::PurgeRuns` / `PurgeExperiments`; MLflow's deletes are
//!   soft, restore brings a run back until it is purged). Here `apply` re-checks the age too,
//!   against the entry's time: a run restored and deleted again since is not purged early.
//!
//! `apply` re-checks every rule except the age against the state at the entry (the state may
//! have changed since the candidates were computed), so a stale candidate is skipped, never
//! wrongly removed. Agents lose nothing: only terminal allocations are removed, and an agent
//! stops whatever a full allocation set no longer lists, exactly as for a desired stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::consts::{alloc_client, eval_status, job_status, job_type, node_status};
use mlp_proto::v1::{Allocation, Evaluation, Job, Node};

use crate::leader::now_ms;
use crate::metrics::Metrics;
use crate::raft::node::{RaftNode, WriteError};
use crate::state::{job_key, ClusterState, Command, GcCounts, Request, StateHandle};

/// Most ids in one `GarbageCollect` entry, so that one Raft entry stays small.
pub const MAX_IDS_PER_ENTRY: usize = 5_000;

/// Most tracking runs or experiments purged by one entry: each run's points are removed from
/// the points tree in the entry's one sled batch.
pub const MAX_PURGES_PER_ENTRY: usize = 100;

/// How old terminal objects must be before they are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcThresholds {
    /// `--eval-gc-threshold`: terminal evaluations and allocations.
    pub eval: Duration,
    /// `--job-gc-threshold`: dead jobs (with everything of theirs).
    pub job: Duration,
    /// `--node-gc-threshold`: down nodes without allocations.
    pub node: Duration,
    /// `--tracking-gc-threshold`: deleted tracking runs and experiments.
    pub tracking: Duration,
}

impl GcThresholds {
    /// Everything eligible, whatever its age (`mlp system gc`, like Nomad's forced GC).
    pub const FORCE: GcThresholds =
        GcThresholds { eval: Duration::ZERO, job: Duration::ZERO, node: Duration::ZERO, tracking: Duration::ZERO };
}

impl Default for GcThresholds {
    /// Nomad's defaults; a day for deleted tracking runs and experiments (MLflow purges only
    /// when `mlflow gc` is run).
    fn default() -> Self {
        GcThresholds {
            eval: Duration::from_secs(3600),
            job: Duration::from_secs(4 * 3600),
            node: Duration::from_secs(24 * 3600),
            tracking: Duration::from_secs(24 * 3600),
        }
    }
}

/// The periodic collection's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcSettings {
    /// `--gc-interval`: how often the leader collects.
    pub interval: Duration,
    pub thresholds: GcThresholds,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings { interval: Duration::from_secs(300), thresholds: GcThresholds::default() }
    }
}

/// What one collection would remove. A collected job's evaluations and allocations are not
/// listed on their own: they go with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcCandidates {
    pub evals: Vec<String>,
    pub allocs: Vec<String>,
    /// `job_key`s.
    pub jobs: Vec<String>,
    pub nodes: Vec<String>,
}

impl GcCandidates {
    pub fn is_empty(&self) -> bool {
        self.evals.is_empty() && self.allocs.is_empty() && self.jobs.is_empty() && self.nodes.is_empty()
    }

    /// The commands that remove these, at most `max_ids` ids each, in an order whose every
    /// entry's re-check holds: allocations first (an evaluation stays while an allocation of it
    /// does), then evaluations and jobs, nodes last (a node goes once its allocations are gone).
    pub fn into_commands(self, max_ids: usize) -> Vec<Command> {
        let max_ids = max_ids.max(1);
        let mut out = Vec::new();
        let mut cur = GcCandidates::default();
        let mut n = 0;
        let kinds: [(u8, Vec<String>); 4] = [(0, self.allocs), (1, self.evals), (2, self.jobs), (3, self.nodes)];
        for (kind, ids) in kinds {
            for id in ids {
                match kind {
                    0 => cur.allocs.push(id),
                    1 => cur.evals.push(id),
                    2 => cur.jobs.push(id),
                    _ => cur.nodes.push(id),
                }
                n += 1;
                if n == max_ids {
                    out.push(std::mem::take(&mut cur).into_command());
                    n = 0;
                }
            }
        }
        if !cur.is_empty() {
            out.push(cur.into_command());
        }
        out
    }

    fn into_command(self) -> Command {
        Command::GarbageCollect { evals: self.evals, allocs: self.allocs, jobs: self.jobs, nodes: self.nodes }
    }
}

fn old_enough(now_ms: u64, time_ms: u64, threshold: Duration) -> bool {
    u128::from(now_ms.saturating_sub(time_ms)) >= threshold.as_millis()
}

fn eval_terminal(e: &Evaluation) -> bool {
    matches!(e.status.as_str(), eval_status::COMPLETE | eval_status::FAILED | eval_status::CANCELED)
}

/// A stopped job, or a batch job that finished (its allocations may still be settling).
fn job_dead(job: &Job) -> bool {
    job.stop || (job_type::is_batch(&job.r#type) && job.status == job_status::DEAD)
}

/// Whether `job` may go with everything of its own (age aside): dead, and every evaluation and
/// allocation of it terminal. Returns its newest time (ms), which its age is measured from.
pub fn job_collectable(st: &ClusterState, job: &Job) -> Option<u64> {
    if !job_dead(job) {
        return None;
    }
    let mut newest = job.submit_time_ms;
    for a in st.allocs_for_job(&job.namespace, &job.id) {
        if !alloc_client::is_terminal(&a.client_status) {
            return None;
        }
        newest = newest.max(a.modify_time_ms);
    }
    for e in st.evals_for_job(&job.namespace, &job.id) {
        if !eval_terminal(e) {
            return None;
        }
        newest = newest.max(e.modify_time_ms);
    }
    Some(newest)
}

/// Whether allocation `a` may go on its own (age aside): terminal, and nothing will ask for it
/// again (its job gone or stopped, or the reconciler no longer counts on it).
pub fn alloc_collectable(st: &ClusterState, a: &Allocation) -> bool {
    if !alloc_client::is_terminal(&a.client_status) {
        return false;
    }
    match st.job(&a.namespace, &a.job_id) {
        None => true,
        Some(job) if job.stop => true,
        Some(job) => !crate::scheduler::holds_index(st, job, a),
    }
}

/// The latest evaluation (highest create index; ties by id) of a job the state still has.
pub fn latest_eval_of_job<'a>(st: &'a ClusterState, namespace: &str, job_id: &str) -> Option<&'a str> {
    st.job(namespace, job_id)?;
    st.evals_for_job(namespace, job_id).max_by(|a, b| (a.create_index, &a.id).cmp(&(b.create_index, &b.id))).map(|e| e.id.as_str())
}

/// Whether evaluation `e` may go (age aside), given whether a remaining allocation was placed
/// by it and its job's latest evaluation (`latest_eval_of_job`).
pub fn eval_collectable(e: &Evaluation, referenced: bool, latest: Option<&str>) -> bool {
    eval_terminal(e) && !referenced && latest != Some(e.id.as_str())
}

/// Whether node `n` may go (age aside): down, with no allocation left.
pub fn node_collectable(st: &ClusterState, n: &Node) -> bool {
    n.status == node_status::DOWN && st.allocs_for_node(&n.id).next().is_none()
}

/// Everything the state can forget at `now_ms` under `t`. Pure: the state in, ids out.
pub fn gc_candidates(st: &ClusterState, now_ms: u64, t: &GcThresholds) -> GcCandidates {
    let mut out = GcCandidates::default();
    let mut jobs_out: BTreeSet<String> = BTreeSet::new();
    for (key, job) in &st.jobs {
        if job_collectable(st, job).is_some_and(|newest| old_enough(now_ms, newest, t.job)) {
            out.jobs.push(key.clone());
            jobs_out.insert(key.clone());
        }
    }
    // Allocations that go (with their job or alone), and the evaluations the rest were placed by.
    let mut allocs_out: BTreeSet<&str> = BTreeSet::new();
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for a in st.allocs.values() {
        if jobs_out.contains(&job_key(&a.namespace, &a.job_id)) {
            allocs_out.insert(&a.id);
        } else if old_enough(now_ms, a.modify_time_ms, t.eval) && alloc_collectable(st, a) {
            allocs_out.insert(&a.id);
            out.allocs.push(a.id.clone());
        } else {
            referenced.insert(&a.eval_id);
        }
    }
    // The latest evaluation of every job, computed once per job.
    let mut latest: BTreeMap<String, Option<&str>> = BTreeMap::new();
    for e in st.evals.values() {
        let key = job_key(&e.namespace, &e.job_id);
        if jobs_out.contains(&key) || !eval_terminal(e) || !old_enough(now_ms, e.modify_time_ms, t.eval) {
            continue;
        }
        let last = *latest.entry(key).or_insert_with(|| latest_eval_of_job(st, &e.namespace, &e.job_id));
        if eval_collectable(e, referenced.contains(e.id.as_str()), last) {
            out.evals.push(e.id.clone());
        }
    }
    for n in st.nodes.values() {
        if n.status == node_status::DOWN
            && old_enough(now_ms, n.last_heartbeat_ms, t.node)
            && st.allocs_for_node(&n.id).all(|a| allocs_out.contains(a.id.as_str()))
        {
            out.nodes.push(n.id.clone());
        }
    }
    out
}

/// Computes the candidates and commits them, chunked. `forward`: through `RaftNode::submit`
/// (an API request, on any server); otherwise `RaftNode::write` (the leader's own loop, which
/// never forwards). Returns what the entries removed.
pub async fn collect(
    raft: &RaftNode,
    state: &StateHandle,
    metrics: &Metrics,
    thresholds: &GcThresholds,
    forward: bool,
) -> Result<(GcCounts, u64), WriteError> {
    let now = now_ms();
    let mut total = GcCounts::default();
    let mut last_index = 0;
    // Expired ACL tokens (issue 15 §2): already refused at check time, forgotten here.
    if state.read().acl.has_expired(now) {
        let req =
            Request { now_ms: now, command: crate::state::Command::Acl(crate::acl::state::AclCommand::DeleteExpired { now_ms: now }) };
        let resp = if forward { raft.submit(req).await? } else { raft.write(req).await? };
        last_index = resp.index;
        tracing::info!(tokens = resp.created.as_deref().unwrap_or("0"), "expired ACL tokens collected");
    }
    last_index = collect_tracking(raft, state, now, thresholds.tracking, forward).await?.unwrap_or(last_index);
    let candidates = gc_candidates(&state.read(), now, thresholds);
    if candidates.is_empty() {
        return Ok((total, last_index));
    }
    for command in candidates.into_commands(MAX_IDS_PER_ENTRY) {
        let req = Request { now_ms: now, command };
        let resp = if forward { raft.submit(req).await? } else { raft.write(req).await? };
        last_index = resp.index;
        if let Some(c) = resp.collected {
            total.add(&c);
        }
    }
    Metrics::inc(&metrics.gc_runs);
    Metrics::add(&metrics.gc_evals_collected, total.evals);
    Metrics::add(&metrics.gc_allocs_collected, total.allocs);
    Metrics::add(&metrics.gc_jobs_collected, total.jobs);
    Metrics::add(&metrics.gc_nodes_collected, total.nodes);
    tracing::info!(evals = total.evals, allocs = total.allocs, jobs = total.jobs, nodes = total.nodes, "garbage collected");
    Ok((total, last_index))
}

/// Purges tracking runs and experiments deleted at least `threshold` before `now`. Returns the
/// index of the last entry committed, if any.
async fn collect_tracking(
    raft: &RaftNode,
    state: &StateHandle,
    now: u64,
    threshold: Duration,
    forward: bool,
) -> Result<Option<u64>, WriteError> {
    let older_than_ms = i64::try_from(threshold.as_millis()).unwrap_or(i64::MAX);
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    // Every namespace's MLflow workspace, each purged through its own commands.
    let candidates: Vec<(String, Vec<String>, Vec<String>)> = state
        .read()
        .all_tracking()
        .map(|(ns, t)| {
            let (runs, experiments) = t.purge_candidates(now_i, older_than_ms);
            (ns.to_string(), runs, experiments)
        })
        .filter(|(_, runs, experiments)| !runs.is_empty() || !experiments.is_empty())
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    use crate::tracking::TrackingCommand as T;
    let (mut last, mut purged, mut experiments_purged) = (None, 0u64, 0usize);
    for (ns, runs, experiments) in candidates {
        experiments_purged += experiments.len();
        let commands = experiments
            .chunks(MAX_PURGES_PER_ENTRY)
            .map(|ids| T::PurgeExperiments { experiment_ids: ids.to_vec(), older_than_ms })
            .chain(runs.chunks(MAX_PURGES_PER_ENTRY).map(|ids| T::PurgeRuns { run_ids: ids.to_vec(), older_than_ms }));
        for cmd in commands {
            let req = Request { now_ms: now, command: Command::tracking_in(&ns, cmd) };
            let resp = if forward { raft.submit(req).await? } else { raft.write(req).await? };
            last = Some(resp.index);
            purged += resp.created.as_deref().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    tracing::info!(runs = purged, experiments = experiments_purged, "deleted tracking runs and experiments purged");
    Ok(last)
}

/// The periodic collection: every `settings.interval`, while this server leads. (`mlp system gc`
/// does not wait for it: the API runs `collect` itself, with `GcThresholds::FORCE`.)
pub async fn run(raft: Arc<RaftNode>, state: Arc<StateHandle>, metrics: Arc<Metrics>, settings: GcSettings) {
    let mut tick = tokio::time::interval(settings.interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; a fresh leader has other work first
    loop {
        tick.tick().await;
        if !raft.is_leader() {
            continue;
        }
        if let Err(e) = collect(&raft, &state, &metrics, &settings.thresholds, false).await {
            tracing::warn!(error = %e, "garbage collection could not commit");
        }
    }
}

#[cfg(test)]
mod tests;
