//! The plan applier's check, pure: a plan computed on an older snapshot is re-checked against
//! the latest state plus the placements of plans still being committed (`in_flight`).
//!
//! * Placements are checked per node with the scheduler's own arithmetic
//!   (`scheduler::check_node_fit_freeing`); the plan's own stops count as freed, so a preemptor
//!   can take its victims' capacity. A node that would be overcommitted rejects that node's
//!   placements only.
//! * A gang's placements (`Plan::atomic`) stand or fall together: one rejected member rejects
//!   them all.
//! * An eviction stands only with its preemptor: a rejected placement's victims are not stopped
//!   (and no longer count as freed), and an eviction of an allocation that is no longer live is
//!   dropped. Rejections can free less capacity elsewhere, so the check repeats until stable.
//! * Namespace quotas (issue 15 §5): the namespace's live allocations (less what the plan
//!   frees) plus the in-flight placements of its other plans plus this plan's placements, in
//!   order, must stay within its quota; a placement that would exceed it is rejected (with
//!   its gang).

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::consts::alloc_client;
use mlp_proto::v1::{Allocation, Evaluation};

use crate::scheduler::{self, resources, Plan, Preempted};
use crate::state::{AllocStop, ClusterState};

/// What passed the check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checked {
    pub accepted: Vec<Allocation>,
    pub stops: Vec<AllocStop>,
    pub preemptions: Vec<Preempted>,
    /// How many placements were rejected.
    pub rejected: usize,
}

/// Re-checks `plan` against `st` plus `in_flight` (accepted placements of other plans that are
/// not committed yet). See the module rules.
pub fn check_plan(st: &ClusterState, plan: Plan, in_flight: &BTreeMap<String, Allocation>) -> Checked {
    let Plan { placements, stops, atomic, preemptions, .. } = plan;
    let victims: BTreeSet<String> = preemptions.iter().map(|p| p.victim.clone()).collect();
    // Evictions of allocations that ended meanwhile evict nothing.
    let live_victim = |id: &str| st.allocs.get(id).is_some_and(resources::is_live);
    let mut rejected: BTreeSet<String> = BTreeSet::new();
    loop {
        let mut freed: BTreeSet<&str> = stops.iter().map(|s| s.alloc_id.as_str()).filter(|id| !victims.contains(*id)).collect();
        freed.extend(preemptions.iter().filter(|p| !rejected.contains(&p.by_alloc) && live_victim(&p.victim)).map(|p| p.victim.as_str()));
        let mut by_node: BTreeMap<&str, Vec<&Allocation>> = BTreeMap::new();
        for p in placements.iter().filter(|p| !rejected.contains(&p.id)) {
            by_node.entry(p.node_id.as_str()).or_default().push(p);
        }
        let mut newly: BTreeSet<String> = BTreeSet::new();
        for (node_id, allocs) in by_node {
            let fits = match st.nodes.get(node_id) {
                Some(node) => {
                    let refs: Vec<&Allocation> =
                        in_flight.values().filter(|a| a.node_id == node_id).chain(allocs.iter().copied()).collect();
                    scheduler::check_node_fit_freeing(st, node, &refs, &freed)
                }
                None => Err(format!("node {node_id} is gone")),
            };
            if let Err(why) = fits {
                tracing::debug!(node_id, why, "plan applier rejected placements");
                newly.extend(allocs.iter().map(|a| a.id.clone()));
            } else if let Some(node) = st.nodes.get(node_id) {
                // A device that turned unhealthy after the plan was computed takes nothing new.
                for a in &allocs {
                    if let Some(why) = resources::unhealthy_claim(st, node, a) {
                        tracing::debug!(node_id, alloc = %a.id, why, "plan applier rejected a placement");
                        newly.insert(a.id.clone());
                    }
                }
            }
        }
        newly.extend(over_quota(st, &placements, &rejected, &newly, &freed, in_flight));
        for gang in &atomic {
            if gang.iter().any(|id| newly.contains(id) || rejected.contains(id)) {
                newly.extend(gang.iter().cloned());
            }
        }
        newly.retain(|id| !rejected.contains(id));
        if newly.is_empty() {
            break;
        }
        rejected.extend(newly);
    }
    let kept: Vec<Preempted> = preemptions.into_iter().filter(|p| !rejected.contains(&p.by_alloc) && live_victim(&p.victim)).collect();
    let kept_victims: BTreeSet<&str> = kept.iter().map(|p| p.victim.as_str()).collect();
    let stops: Vec<AllocStop> =
        stops.into_iter().filter(|s| !victims.contains(&s.alloc_id) || kept_victims.contains(s.alloc_id.as_str())).collect();
    let mut accepted = Vec::new();
    let mut count = 0;
    for mut p in placements {
        if rejected.contains(&p.id) {
            count += 1;
        } else {
            p.preempted_allocations.retain(|v| kept_victims.contains(v.as_str()));
            accepted.push(p);
        }
    }
    Checked { accepted, stops, preemptions: kept, rejected: count }
}

/// Evaluations for the jobs whose allocations a plan evicts, so that each gets its replacement
/// (placed at once if capacity allows, else blocked until it frees): one per job.
pub fn victim_evals(st: &ClusterState, preemptions: &[Preempted]) -> Vec<Evaluation> {
    let mut jobs: BTreeSet<(String, String)> = BTreeSet::new();
    for p in preemptions {
        if let Some(a) = st.allocs.get(&p.victim) {
            jobs.insert((a.namespace.clone(), a.job_id.clone()));
        }
    }
    jobs.into_iter()
        .filter_map(|(ns, id)| st.job(&ns, &id).map(|j| (ns, id, j.priority, j.r#type.clone())))
        .map(|(namespace, job_id, priority, r#type)| Evaluation {
            id: uuid::Uuid::new_v4().to_string(),
            namespace,
            job_id,
            priority,
            r#type,
            triggered_by: mlp_proto::consts::eval_trigger::PREEMPTION.to_string(),
            status: mlp_proto::consts::eval_status::PENDING.to_string(),
            ..Default::default()
        })
        .collect()
}

/// Whether an allocation was evicted by preemption.
pub fn is_preempted(a: &Allocation) -> bool {
    a.client_status == alloc_client::PREEMPTED
}

/// The placements (not yet rejected) that would take their namespace beyond its quota, counted
/// in plan order on top of the namespace's live allocations (less `freed`) and the in-flight
/// placements of other plans.
fn over_quota(
    st: &ClusterState,
    placements: &[Allocation],
    rejected: &BTreeSet<String>,
    newly: &BTreeSet<String>,
    freed: &BTreeSet<&str>,
    in_flight: &BTreeMap<String, Allocation>,
) -> BTreeSet<String> {
    use crate::scheduler::quota;
    let mut over = BTreeSet::new();
    let namespaces: BTreeSet<&str> = placements.iter().map(|p| p.namespace.as_str()).collect();
    for ns in namespaces {
        let Some(spec) = quota::quota_of(st, ns).map(quota::hard_limit) else { continue };
        let mut skip: BTreeSet<&str> = freed.clone();
        // Placements already in the state (a retried plan) are counted once, as placements.
        skip.extend(placements.iter().map(|p| p.id.as_str()));
        skip.extend(in_flight.keys().map(String::as_str));
        let mut held = quota::Held::of(st, ns, &skip);
        for a in in_flight.values().filter(|a| a.namespace == ns && !placements.iter().any(|p| p.id == a.id)) {
            if let Some(r) = &a.resources {
                held.add(r, st.nodes.get(&a.node_id));
            }
        }
        for p in placements.iter().filter(|p| p.namespace == ns && !rejected.contains(&p.id) && !newly.contains(&p.id)) {
            let Some(r) = &p.resources else { continue };
            let node = st.nodes.get(&p.node_id);
            match quota::admits(ns, &spec, &held, r, node) {
                Ok(()) => held.add(r, node),
                Err(why) => {
                    tracing::debug!(alloc = %p.id, why, "plan applier rejected a placement over its namespace's quota");
                    over.insert(p.id.clone());
                }
            }
        }
    }
    over
}
