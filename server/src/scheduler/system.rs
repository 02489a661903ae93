//! System and sysbatch jobs (issue 16 §2): one allocation of each group on every eligible node
//! that passes the group's constraints, reconciled per node instead of per index.
//!
//! * A node that is ready, eligible and feasible without a live allocation of the group gets
//!   one (a `sysbatch` group only once per job version: a node that finished it, or failed it
//!   past its restarts, is done).
//! * An allocation on a down node is lost; on a draining node it is stopped unless the drain
//!   ignores system jobs (`mlp node drain --ignore-system`); on a node that no longer passes the
//!   constraints it is stopped; an allocation of an older spec is replaced on the same node.
//! * An ineligible node that is not draining keeps what runs there (as in Nomad) and gets nothing
//!   new; so does a node that cannot fit the group (that node is reported in the plan's failures
//!   and the evaluation blocks until capacity frees).
//!
//! * `update { max_parallel, stagger }` on a system job: an allocation of an older spec is
//!   replaced on at most `max_parallel` nodes per batch, the next batch `stagger` after the
//!   newest allocation of the version (a delayed follow-up evaluation); without it, everywhere
//!   in one plan.
//!
//! New nodes, nodes coming back, eligibility and drain changes create an evaluation of every
//! system and sysbatch job (`ClusterState::apply`, `per_node_job_evals`).

use std::collections::BTreeSet;

use mlp_proto::consts::{alloc_client, alloc_desired, job_type, node_status};
use mlp_proto::v1::{AllocMetric, Allocation, Evaluation, Job, Node};

use super::reconcile::{spec_changed, Want};
use super::resources::{is_live, Ask};
use super::{feasible, new_alloc, place, Options, Plan, Scorer};
use crate::state::{AllocStop, ClusterState};

fn stop(a: &Allocation, why: &str, lost: bool) -> AllocStop {
    AllocStop { alloc_id: a.id.clone(), description: why.to_string(), client_status: lost.then(|| alloc_client::LOST.to_string()) }
}

/// The plan for a system or sysbatch `job` (not stopped, not a parent).
pub(crate) fn schedule(state: &ClusterState, job: &Job, eval: &Evaluation, now_ms: u64, scorer: &dyn Scorer, opts: Options) -> Plan {
    let mut plan = Plan { eval_id: eval.id.clone(), ..Default::default() };
    let sysbatch = job.r#type == job_type::SYSBATCH;
    let allocs: Vec<&Allocation> = state.allocs_for_job(&job.namespace, &job.id).collect();
    for a in allocs.iter().filter(|a| is_live(a) && !job.groups.iter().any(|g| g.name == a.task_group)) {
        let down = state.nodes.get(&a.node_id).is_none_or(|n| n.status == node_status::DOWN);
        plan.stops.push(stop(a, "task group removed from job", down));
    }
    let preemption = opts.preemption.allowed_for(&job.r#type).then_some(opts.preemption);
    // First every group's stops (so that the placements may use what they free), then the
    // placements.
    let mut groups: Vec<(&mlp_proto::v1::TaskGroup, BTreeSet<&str>, u32)> = Vec::new();
    for tg in &job.groups {
        plan.queued_allocations.insert(tg.name.clone(), 0);
        // `update { max_parallel, stagger }` (system jobs): an older spec is replaced on at most
        // `max_parallel` nodes per batch, a batch every `stagger`; without it, on every node at once.
        let strategy = if sysbatch { None } else { mlp_proto::jobspec::effective_update(job, tg) };
        let mut outdated: Vec<&Allocation> = Vec::new();
        // Per node: is there a live allocation of this group that stays, or (sysbatch) one done?
        let mut covered: BTreeSet<&str> = BTreeSet::new();
        let mut next_index = 0u32;
        for a in allocs.iter().filter(|a| a.task_group == tg.name) {
            next_index = next_index.max(a.index + 1);
            let node = state.nodes.get(&a.node_id);
            if a.desired_status == alloc_desired::RUN && is_live(a) {
                let Some(n) = node.filter(|n| n.status != node_status::DOWN) else {
                    plan.stops.push(stop(a, "node down", true));
                    continue;
                };
                if n.drain_strategy.as_ref().is_some_and(|d| !d.ignore_system) {
                    plan.stops.push(stop(a, "node draining", false));
                    continue;
                }
                if feasible::check(job, tg, n).is_err() {
                    plan.stops.push(stop(a, "node no longer meets the group's constraints", false));
                    continue;
                }
                if spec_changed(state, job, tg, a) {
                    if strategy.is_some() {
                        outdated.push(a);
                    } else {
                        plan.stops.push(stop(a, &format!("replaced by job version {}", job.version), false));
                        continue;
                    }
                }
                covered.insert(a.node_id.as_str());
            } else if sysbatch && a.job_version == job.version && alloc_client::is_terminal(&a.client_status) {
                // Ran on this node: complete, or failed past its restart policy. Lost ones (the
                // node went away) run again if the node comes back.
                if matches!(a.client_status.as_str(), alloc_client::COMPLETE | alloc_client::FAILED) {
                    covered.insert(a.node_id.as_str());
                }
            }
        }
        if let (Some(s), false) = (&strategy, outdated.is_empty()) {
            let stagger = s.stagger_ms.unwrap_or(30_000);
            // The last batch: the newest allocation of this version in the group.
            let last_batch = allocs
                .iter()
                .filter(|a| a.task_group == tg.name && a.job_version == job.version)
                .map(|a| a.create_time_ms)
                .max()
                .unwrap_or(0);
            let due = last_batch.saturating_add(stagger);
            if last_batch == 0 || now_ms >= due {
                outdated.sort_by(|a, b| (&a.node_id, &a.id).cmp(&(&b.node_id, &b.id)));
                let batch = (s.max_parallel.unwrap_or(1) as usize).min(outdated.len());
                for a in outdated.drain(..batch) {
                    plan.stops.push(stop(a, &format!("replaced by job version {} (staggered update)", job.version), false));
                    covered.remove(a.node_id.as_str());
                }
            }
            if !outdated.is_empty() {
                // The next batch, once its stagger has passed (one follow-up at a time).
                let at = if last_batch == 0 || now_ms >= due { now_ms.saturating_add(stagger) } else { due };
                let pending = state
                    .evals_for_job(&job.namespace, &job.id)
                    .any(|e| e.status == mlp_proto::consts::eval_status::PENDING && e.wait_until_ms > now_ms && e.id != eval.id);
                if !pending && !plan.new_evals.iter().any(|e| e.wait_until_ms > 0) {
                    plan.new_evals.push(Evaluation {
                        id: uuid::Uuid::new_v4().to_string(),
                        namespace: job.namespace.clone(),
                        job_id: job.id.clone(),
                        priority: job.priority,
                        r#type: job.r#type.clone(),
                        triggered_by: mlp_proto::consts::eval_trigger::ROLLING_UPDATE.to_string(),
                        status: mlp_proto::consts::eval_status::PENDING.to_string(),
                        status_description: format!("the next batch of a staggered update of version {}", job.version),
                        job_modify_index: job.job_modify_index,
                        wait_until_ms: at,
                        ..Default::default()
                    });
                }
            }
        }
        groups.push((tg, covered, next_index));
    }
    let freed: BTreeSet<String> = plan.stops.iter().filter(|s| s.client_status.is_none()).map(|s| s.alloc_id.clone()).collect();
    let mut pass = place::Pass::freeing_with_quota(state, &job.namespace, freed);
    for (tg, covered, mut next_index) in groups {
        let mut base = AllocMetric::default();
        let mut targets: Vec<&Node> = Vec::new();
        for n in state.nodes.values() {
            if covered.contains(n.id.as_str()) || !feasible::node_usable(n) {
                continue;
            }
            base.nodes_evaluated += 1;
            match feasible::check(job, tg, n) {
                Ok(()) => targets.push(n),
                Err(why) => why.record(&mut base),
            }
        }
        base.nodes_available = base.nodes_evaluated;
        let ctx = place::GroupCtx { job, tg, ask: Ask::for_group(tg), scorer, preemption, prefs: None };
        let mut unplaced = 0u32;
        let mut failure: Option<AllocMetric> = None;
        for n in targets {
            let want = Want::fresh(tg, next_index);
            let a = place::attempt(&ctx, pass.clone(), &[n], &[&want], &base);
            match a.placed.into_iter().next() {
                Some(p) => {
                    pass = a.pass;
                    let mut alloc = new_alloc(job, &want, p.node, p.resources, eval, now_ms);
                    for v in &p.victims {
                        plan.stops.push(AllocStop {
                            alloc_id: v.clone(),
                            description: format!("preempted by allocation {} of job {} (priority {})", alloc.id, job.id, job.priority),
                            client_status: Some(alloc_client::PREEMPTED.to_string()),
                        });
                        plan.preemptions.push(super::Preempted {
                            victim: v.clone(),
                            by_alloc: alloc.id.clone(),
                            by_job: crate::state::job_key(&job.namespace, &job.id),
                        });
                    }
                    alloc.preempted_allocations = p.victims;
                    plan.placements.push(alloc);
                    next_index += 1;
                }
                None => {
                    unplaced += 1;
                    if failure.is_none() {
                        failure = a.failure;
                    }
                }
            }
        }
        if unplaced > 0 {
            let mut metric = failure.unwrap_or(base);
            metric.coalesced_failures = unplaced - 1;
            plan.failed_tg_allocs.insert(tg.name.clone(), metric);
            plan.queued_allocations.insert(tg.name.clone(), unplaced);
        }
    }
    plan
}

/// Whether `a` belongs to a system or sysbatch job, whose allocations the system scheduler
/// (not the drainer) stops on a draining node.
pub fn is_per_node_alloc(state: &ClusterState, a: &Allocation) -> bool {
    state.job(&a.namespace, &a.job_id).is_some_and(|j| job_type::is_per_node(&j.r#type))
}
