//! The scheduler: a pure library. A snapshot of the cluster state and an evaluation in, a plan out.
//! No I/O, clock, locks or async; the output depends only on the inputs, except for the fresh
//! allocation ids.
//!
//! Module map:
//! * `reconcile` — existing allocations vs. the job: what to stop, which indexes to place;
//! * `feasible` — node readiness, drivers and constraints (with `regex` for `regexp`);
//! * `resources` — resource arithmetic shared with the plan applier (`check_node_fit`);
//! * `gpu` — GPU devices, shares and the placement policies (FGD and mlp's default), shared
//!   with the trace simulator (`crate::sim`);
//! * `rank` — the swappable `Scorer` (the GPU policy's cost, then bin-packing, by default);
//! * `explain` — human lines for placement failures.

mod explain;
pub mod feasible;
pub mod gpu;
pub mod rank;
mod reconcile;
mod regex;
pub mod resources;

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::consts::{alloc_client, alloc_desired};
use mlp_proto::v1::{AllocMetric, AllocatedResources, Allocation, Evaluation, Job, Node};

pub use explain::explain;
pub use rank::{BinPack, Fragmentation, RankInput, Scorer};

use crate::state::{AllocStop, ClusterState};
use reconcile::Want;
use resources::{Ask, Usage};

/// What one scheduling pass wants to change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub eval_id: String,
    /// New allocations, with ids, node ids and resources filled in.
    pub placements: Vec<Allocation>,
    /// Allocations to stop (or mark lost).
    pub stops: Vec<AllocStop>,
    /// Per task group: why placements failed.
    pub failed_tg_allocs: BTreeMap<String, AllocMetric>,
    /// Per task group: how many allocations could not be placed.
    pub queued_allocations: BTreeMap<String, u32>,
}

/// Computes the plan for `eval` against `state`. `job` is the job to schedule (None when it was purged).
/// The default scorer plans GPUs against the workload already running on the cluster.
pub fn schedule(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64) -> Plan {
    let scorer = Fragmentation { policy: gpu::Policy::default(), workload: resources::live_workload(state) };
    schedule_with(state, job, eval, now_ms, &scorer)
}

/// `schedule` with a chosen scorer.
///
/// Capacity freed by this plan's own stops is not reused by its placements: the plan applier
/// re-checks placements against the state before the stops apply (`check_node_fit`), and a
/// blocked evaluation retries once the capacity is really free.
pub fn schedule_with(state: &ClusterState, job: Option<&Job>, eval: &Evaluation, now_ms: u64, scorer: &dyn Scorer) -> Plan {
    let (namespace, job_id) = match job {
        Some(j) => (j.namespace.as_str(), j.id.as_str()),
        None => (eval.namespace.as_str(), eval.job_id.as_str()),
    };
    let rec = reconcile::reconcile(state, job, namespace, job_id);
    let mut plan = Plan { eval_id: eval.id.clone(), stops: rec.stops, ..Default::default() };
    let Some(job) = job.filter(|j| !j.stop) else { return plan };

    let candidates: Vec<&Node> = state.nodes.values().filter(|n| feasible::node_usable(n)).collect();
    let mut usage: BTreeMap<&str, Usage> = BTreeMap::new();
    let no_workload = gpu::Workload::default();
    for tg in &job.groups {
        plan.queued_allocations.insert(tg.name.clone(), 0);
        let wants: Vec<&Want<'_>> = rec.place.iter().filter(|w| w.group.name == tg.name).collect();
        if wants.is_empty() {
            continue;
        }
        let ask = Ask::for_group(tg);
        let mut base = AllocMetric {
            nodes_evaluated: candidates.len() as u32,
            nodes_available: candidates.len() as u32,
            ..Default::default()
        };
        let feasible: Vec<&Node> = candidates
            .iter()
            .copied()
            .filter(|n| match feasible::check(job, tg, n) {
                Ok(()) => true,
                Err(why) => {
                    why.record(&mut base);
                    false
                }
            })
            .collect();

        for (i, want) in wants.iter().enumerate() {
            let mut metric = base.clone();
            let mut best: Option<(f64, &Node, AllocatedResources, Usage)> = None;
            for node in &feasible {
                let before = usage
                    .entry(node.id.as_str())
                    .or_insert_with(|| Usage::live_on(state, &node.id, &BTreeSet::new()));
                match resources::try_fit_with(node, before, &ask, scorer.gpu_policy(), scorer.workload().unwrap_or(&no_workload)) {
                    Err(dim) => {
                        metric.nodes_exhausted += 1;
                        *metric.dimension_exhausted.entry(dim.as_str().to_string()).or_default() += 1;
                    }
                    Ok(resources::Fit { resources: res, after, gpu_cost }) => {
                        let input = RankInput { job, group: tg, node, before, after: &after, resources: &res, gpu_cost };
                        let score = scorer.score(&input);
                        if best.as_ref().is_none_or(|(s, n, ..)| rank::better((score, &node.id), (*s, &n.id))) {
                            best = Some((score, node, res, after));
                        }
                    }
                }
            }
            let Some((_, node, res, after)) = best else {
                // Later placements of this group ask for the same and would fail the same way.
                let unplaced = (wants.len() - i) as u32;
                metric.coalesced_failures = unplaced - 1;
                plan.failed_tg_allocs.insert(tg.name.clone(), metric);
                plan.queued_allocations.insert(tg.name.clone(), unplaced);
                break;
            };
            usage.insert(node.id.as_str(), after);
            plan.placements.push(new_alloc(job, want, node, res, eval, now_ms));
        }
    }
    plan
}

fn new_alloc(job: &Job, want: &Want<'_>, node: &Node, resources: AllocatedResources, eval: &Evaluation, now_ms: u64) -> Allocation {
    Allocation {
        id: uuid::Uuid::new_v4().to_string(),
        eval_id: eval.id.clone(),
        name: format!("{}.{}[{}]", job.id, want.group.name, want.index),
        node_id: node.id.clone(),
        node_name: node.name.clone(),
        job_id: job.id.clone(),
        namespace: job.namespace.clone(),
        job_version: job.version,
        task_group: want.group.name.clone(),
        index: want.index,
        resources: Some(resources),
        desired_status: alloc_desired::RUN.to_string(),
        client_status: alloc_client::PENDING.to_string(),
        create_time_ms: now_ms,
        modify_time_ms: now_ms,
        ..Default::default()
    }
}

/// Whether `node` can hold its current live allocations plus `extra`. Err names the exhausted dimension.
pub fn check_node_fit(state: &ClusterState, node: &Node, extra: &[&Allocation]) -> Result<(), String> {
    let name = if node.name.is_empty() { &node.id } else { &node.name };
    if !feasible::node_usable(node) {
        let why = if node.eligible { format!("status {}", node.status) } else { "ineligible".to_string() };
        return Err(format!("node {name} is not available ({why})"));
    }
    // An extra allocation already in the state (a retried plan) must not count twice.
    let skip: BTreeSet<&str> = extra.iter().map(|a| a.id.as_str()).collect();
    let mut usage = Usage::live_on(state, &node.id, &skip);
    for a in extra {
        if let Some(r) = &a.resources {
            usage.add(r);
        }
    }
    match resources::exhausted(node, &usage) {
        Some(dim) => Err(format!("{dim} exhausted on node {name}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
