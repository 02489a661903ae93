//! Reconciliation: compares a job's existing allocations with what the job wants and decides
//! which to stop and which allocation indexes to place. Knows nothing about nodes' capacity.
//!
//! Per task group, each allocation is one of:
//! * live (desired `run`, client not terminal): kept, unless its node is down or gone (marked
//!   `lost`, replaced), its job version's group spec differs from the current one (stopped,
//!   replaced), or the count went down (highest indexes stopped);
//! * done (desired `run`, client `complete` or `failed`): keeps its index and is not re-placed
//!   in this first cut (batch: finished; service: the restart policy already gave up). A done
//!   allocation from an older version whose spec differs does not hold its index, so an updated
//!   job runs again;
//! * anything else (`lost`, or stopped by the scheduler): its index is free and gets a
//!   replacement if the count wants it.

use std::collections::BTreeSet;

use mlp_proto::consts::{alloc_client, alloc_desired, node_status};
use mlp_proto::v1::{Allocation, Job, TaskGroup};

use super::resources::is_live;
use crate::state::{AllocStop, ClusterState};

/// One allocation to place.
#[derive(Debug, Clone, PartialEq)]
pub struct Want<'a> {
    pub group: &'a TaskGroup,
    pub index: u32,
}

/// What reconciliation decided.
#[derive(Debug, Default)]
pub struct Reconciled<'a> {
    pub stops: Vec<AllocStop>,
    /// Grouped by task group, in the job's group order, lowest index first.
    pub place: Vec<Want<'a>>,
}

/// Reconciles the allocations of job `namespace/job_id` with `job` (None when purged).
pub fn reconcile<'a>(state: &ClusterState, job: Option<&'a Job>, namespace: &str, job_id: &str) -> Reconciled<'a> {
    let allocs: Vec<&Allocation> = state.allocs_for_job(namespace, job_id).collect();
    let mut out = Reconciled::default();
    let node_down = |a: &Allocation| on_down_node(state, a);

    let job = match job {
        Some(j) if !j.stop => j,
        _ => {
            let why = if job.is_some() { "job stopped" } else { "job purged" };
            for a in allocs.iter().filter(|a| is_live(a)) {
                out.stops.push(stop_or_lost(a, node_down(a), why));
            }
            return out;
        }
    };

    for a in allocs.iter().filter(|a| is_live(a) && !job.groups.iter().any(|g| g.name == a.task_group)) {
        out.stops.push(stop_or_lost(a, node_down(a), "task group removed from job"));
    }

    for tg in &job.groups {
        let mut live: Vec<&Allocation> = Vec::new();
        let mut done: Vec<&Allocation> = Vec::new();
        for a in allocs.iter().filter(|a| a.task_group == tg.name && a.desired_status == alloc_desired::RUN) {
            let changed = spec_changed(state, job, tg, a);
            if is_live(a) {
                if node_down(a) {
                    out.stops.push(lost(a));
                } else if changed {
                    out.stops.push(stop(a, &format!("replaced by job version {}", job.version)));
                } else {
                    live.push(a);
                }
            } else if a.client_status != alloc_client::LOST && !changed {
                done.push(a);
            }
        }

        // Count reduced: stop the highest indexes (ties: highest id, for determinism).
        live.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
        let want = tg.count as usize;
        while live.len() > want {
            if let Some(a) = live.pop() {
                out.stops.push(stop(a, "count reduced"));
            }
        }

        // Done allocations count toward the group only within the current count and where no
        // live allocation already holds the index.
        let mut taken: BTreeSet<u32> = live.iter().map(|a| a.index).collect();
        let mut held = live.len();
        for a in &done {
            if (a.index as usize) < want && taken.insert(a.index) {
                held += 1;
            }
        }

        let mut index = 0u32;
        for _ in held..want {
            while taken.contains(&index) {
                index += 1;
            }
            out.place.push(Want { group: tg, index });
            taken.insert(index);
        }
    }
    out
}

/// Whether `a` was made from a job version whose spec for `tg` differs from the current one.
/// The count is ignored (scaling is not an update); an unknown old version counts as changed.
fn spec_changed(state: &ClusterState, job: &Job, tg: &TaskGroup, a: &Allocation) -> bool {
    if a.job_version == job.version {
        return false;
    }
    let old = state
        .job_version(&job.namespace, &job.id, a.job_version)
        .and_then(|j| j.groups.iter().find(|g| g.name == tg.name));
    match old {
        None => true,
        Some(old) => {
            let (mut old, mut new) = (old.clone(), tg.clone());
            old.count = 0;
            new.count = 0;
            old != new
        }
    }
}

/// Whether `a`'s node is down or gone: then the allocation will never be heard from again.
fn on_down_node(state: &ClusterState, a: &Allocation) -> bool {
    state.nodes.get(&a.node_id).is_none_or(|n| n.status == node_status::DOWN)
}

fn stop(a: &Allocation, description: &str) -> AllocStop {
    AllocStop { alloc_id: a.id.clone(), description: description.to_string(), client_status: None }
}

/// The node will never report this allocation again: mark it lost.
fn lost(a: &Allocation) -> AllocStop {
    AllocStop { alloc_id: a.id.clone(), description: "node down".to_string(), client_status: Some(alloc_client::LOST.to_string()) }
}

fn stop_or_lost(a: &Allocation, node_down: bool, description: &str) -> AllocStop {
    if node_down {
        lost(a)
    } else {
        stop(a, description)
    }
}
