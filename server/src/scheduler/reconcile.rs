//! Reconciliation: compares a job's existing allocations with what the job wants and decides
//! which to stop and which allocation indexes to place. Knows nothing about nodes' capacity.
//!
//! Per task group, each allocation is one of:
//! * live (desired `run`, client not terminal): kept, unless its node is down or gone (marked
//!   `lost`, replaced), its job version's group spec differs from the current one (stopped,
//!   replaced), or the count went down (highest indexes stopped);
//! * migrating (live, `desired_migrate` set by a node drain): stopped and replaced at the same
//!   index on another node (stop old → place new in one plan, like Nomad); not a reschedule;
//! * done (desired `run`, client `complete`): keeps its index. A done allocation from an older
//!   version whose spec differs does not hold its index, so an updated job runs again;
//! * failed or lost and not yet replaced (`next_allocation` empty): replaced per the group's
//!   `reschedule` policy (`decide`): now (the replacement records `previous_allocation` and a
//!   reschedule event), later (a follow-up evaluation with `wait_until_ms`; the allocation holds
//!   its index meanwhile), or never (attempts used up; the allocation holds its index and says
//!   why in `reschedule_description`);
//! * anything else (stopped by the scheduler, or already replaced): its index is free and gets
//!   a replacement if the count wants it.

use std::collections::{BTreeMap, BTreeSet};

use mlp_proto::consts::{alloc_client, alloc_desired, deployment_status, eval_status, eval_trigger, job_type, node_status};
use mlp_proto::v1::{
    Allocation, Deployment, DeploymentGroup, Evaluation, Job, RescheduleEvent, ReschedulePolicy, RescheduleTracker, TaskGroup,
};

use super::resources::is_live;
use crate::state::{AllocAnnotation, AllocStop, ClusterState};

/// One allocation to place.
#[derive(Debug, Clone, PartialEq)]
pub struct Want<'a> {
    pub group: &'a TaskGroup,
    pub index: u32,
    /// The failed, lost or migrated allocation this one replaces ("" for a fresh one).
    pub previous_allocation: String,
    /// The replacement's reschedule history (the previous one's plus this reschedule).
    pub reschedule_tracker: Option<RescheduleTracker>,
    /// The deployment that places it ("" = none), and whether as a canary.
    pub deployment_id: String,
    pub canary: bool,
}

impl<'a> Want<'a> {
    pub fn fresh(group: &'a TaskGroup, index: u32) -> Want<'a> {
        Want { group, index, previous_allocation: String::new(), reschedule_tracker: None, deployment_id: String::new(), canary: false }
    }
}

/// What reconciliation decided.
#[derive(Debug, Default)]
pub struct Reconciled<'a> {
    pub stops: Vec<AllocStop>,
    /// Grouped by task group, in the job's group order, lowest index first.
    pub place: Vec<Want<'a>>,
    /// Delayed evaluations that will replace failed or lost allocations when their delay ends.
    pub follow_ups: Vec<Evaluation>,
    /// Notes on allocations not (yet) replaced.
    pub annotations: Vec<AllocAnnotation>,
    /// The deployment created for the job's version (issue 16 §1), when this pass starts one.
    pub deployment: Option<Deployment>,
    /// Active deployments of older versions (or of a stopped job), to cancel.
    pub cancel_deployments: Vec<String>,
}

/// The group's reschedule policy, or the job type's default.
pub fn policy_for(job: &Job, tg: &TaskGroup) -> ReschedulePolicy {
    tg.reschedule.clone().unwrap_or_else(|| mlp_proto::jobspec::default_reschedule(job_type::is_batch(&job.r#type)))
}

/// When a failed or lost allocation is replaced.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Now, after waiting `delay_ms`.
    Now { delay_ms: u64 },
    /// At `at_ms` (a follow-up evaluation).
    Later { at_ms: u64, delay_ms: u64 },
    /// Never: the attempts in the interval are used up.
    Exhausted(String),
}

/// The delay before the next replacement, given the previous reschedules (Nomad's delay
/// functions): constant; exponential doubles the last delay; fibonacci adds the last two;
/// capped at `max_delay_ms` when set.
pub fn next_delay(policy: &ReschedulePolicy, events: &[RescheduleEvent]) -> u64 {
    let base = policy.delay_ms;
    let d = match policy.delay_function.as_str() {
        "exponential" => match events.last() {
            None => base,
            Some(last) => last.delay_ms.saturating_mul(2).max(base),
        },
        "fibonacci" => match events {
            [.., a, b] => a.delay_ms.saturating_add(b.delay_ms).max(base),
            _ => base,
        },
        _ => base,
    };
    if policy.max_delay_ms > 0 {
        d.min(policy.max_delay_ms)
    } else {
        d
    }
}

/// Whether and when an allocation that ended (failed or lost) at `ended_ms` is replaced.
pub fn decide(policy: &ReschedulePolicy, events: &[RescheduleEvent], ended_ms: u64, now_ms: u64) -> Decision {
    if !policy.unlimited {
        let recent =
            events.iter().filter(|e| policy.interval_ms == 0 || e.reschedule_time_ms.saturating_add(policy.interval_ms) > now_ms).count()
                as u64;
        if recent >= u64::from(policy.attempts) {
            return Decision::Exhausted(format!(
                "not rescheduled: {} of {} reschedule attempts within {} used",
                recent,
                policy.attempts,
                fmt_ms(policy.interval_ms)
            ));
        }
    }
    let delay_ms = next_delay(policy, events);
    let at_ms = ended_ms.saturating_add(delay_ms);
    if at_ms <= now_ms {
        Decision::Now { delay_ms }
    } else {
        Decision::Later { at_ms, delay_ms }
    }
}

/// Reconciles the allocations of job `namespace/job_id` with `job` (None when purged); `now_ms`
/// decides which failed or lost allocations are due for a replacement.
pub fn reconcile_at<'a>(state: &ClusterState, job: Option<&'a Job>, namespace: &str, job_id: &str, now_ms: u64) -> Reconciled<'a> {
    let allocs: Vec<&Allocation> = state.allocs_for_job(namespace, job_id).collect();
    let mut out = Reconciled::default();
    let node_down = |a: &Allocation| on_down_node(state, a);

    let job = match job {
        Some(j) if !j.stop && !mlp_proto::jobspec::jobtypes::is_parent(j) => j,
        _ => {
            // A parameterized or periodic parent never places allocations: its children do.
            let why = match job {
                Some(j) if !j.stop => "a parameterized or periodic job runs only as its children",
                Some(_) => "job stopped",
                None => "job purged",
            };
            for a in allocs.iter().filter(|a| is_live(a)) {
                out.stops.push(stop_or_lost(a, node_down(a), why));
            }
            out.cancel_deployments = crate::deploy::for_job(state, namespace, job_id)
                .filter(|d| deployment_status::is_active(&d.status))
                .map(|d| d.id.clone())
                .collect();
            return out;
        }
    };

    for a in allocs.iter().filter(|a| is_live(a) && !job.groups.iter().any(|g| g.name == a.task_group)) {
        out.stops.push(stop_or_lost(a, node_down(a), "task group removed from job"));
    }

    // Deployments (issue 16 §1): the version's own, or a new one if its groups roll.
    out.cancel_deployments = crate::deploy::for_job(state, namespace, job_id)
        .filter(|d| deployment_status::is_active(&d.status) && d.job_version != job.version)
        .map(|d| d.id.clone())
        .collect();
    let existing = crate::deploy::for_version(state, namespace, job_id, job.version);
    let new_id = uuid::Uuid::new_v4().to_string();
    let mut new_groups: BTreeMap<String, DeploymentGroup> = BTreeMap::new();
    let mut new_used = false;

    for tg in &job.groups {
        let policy = policy_for(job, tg);
        let strategy = if crate::deploy::applies_to(job) { mlp_proto::jobspec::effective_update(job, tg) } else { None };
        let mut outdated: Vec<&Allocation> = Vec::new();
        let mut live: Vec<&Allocation> = Vec::new();
        let mut done: Vec<&Allocation> = Vec::new();
        let mut migrating: Vec<&Allocation> = Vec::new();
        // Failed or lost, not replaced yet, with when each ended.
        let mut ended: Vec<(&Allocation, u64)> = Vec::new();
        for a in allocs.iter().filter(|a| a.task_group == tg.name) {
            let changed = spec_changed(state, job, tg, a);
            let replaced = !a.next_allocation.is_empty();
            if a.desired_status != alloc_desired::RUN {
                // Lost earlier (marked by a previous plan) and never replaced: a candidate.
                if a.client_status == alloc_client::LOST && !changed && !replaced {
                    ended.push((a, a.modify_time_ms));
                }
                continue;
            }
            if is_live(a) {
                if node_down(a) {
                    out.stops.push(lost(a));
                    if !changed && !replaced {
                        ended.push((a, now_ms));
                    }
                } else if changed && strategy.is_some() && !a.desired_migrate {
                    outdated.push(a);
                } else if changed {
                    out.stops.push(stop(a, &format!("replaced by job version {}", job.version)));
                } else if a.desired_migrate {
                    out.stops.push(stop(a, "migrating: its node is draining"));
                    migrating.push(a);
                } else {
                    live.push(a);
                }
            } else if a.client_status == alloc_client::FAILED && !changed && !replaced {
                ended.push((a, a.modify_time_ms));
            } else if a.client_status != alloc_client::LOST && !changed && !replaced {
                done.push(a);
            }
        }

        // A rolling group: the deployment paces the replacement of the outdated allocations.
        let mut roll: Option<(String, bool)> = None; // (deployment id, place canaries)
        let mut canary_indexes: Vec<u32> = Vec::new();
        let mut rolled = false; // replaced an outdated allocation in this pass
        if let Some(s) = &strategy {
            let (dep_id, status, group) = match existing {
                Some(d) => (d.id.clone(), d.status.clone(), d.groups.get(&tg.name).cloned()),
                None => {
                    let canaries = if outdated.is_empty() || job.revert_of.is_some() { 0 } else { s.canary.unwrap_or(0) };
                    let progress = s.progress_deadline_ms.unwrap_or(0);
                    let g = DeploymentGroup {
                        strategy: Some(s.clone()),
                        desired_canaries: canaries,
                        desired_total: tg.effective_count(),
                        require_progress_by_ms: if progress > 0 { now_ms.saturating_add(progress) } else { 0 },
                        ..Default::default()
                    };
                    new_groups.insert(tg.name.clone(), g.clone());
                    (new_id.clone(), deployment_status::RUNNING.to_string(), Some(g))
                }
            };
            let group = group.unwrap_or_default();
            let active = deployment_status::is_active(&status);
            let canary_phase = active && group.desired_canaries > 0 && !group.promoted;
            let is_canary = |a: &Allocation| crate::deploy::is_canary(a, &dep_id);
            let canaries: Vec<&Allocation> = live.iter().copied().filter(|a| is_canary(a)).collect();
            live.retain(|a| !is_canary(a));
            outdated.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
            // Canaries replace their old twins only once promoted: a failed or cancelled
            // deployment's unpromoted canaries stay beside the old allocations, replacing none.
            let unpromoted = group.desired_canaries > 0 && !group.promoted;
            if canary_phase {
                // Canaries run beside the old allocations, on their indexes, replacing none yet
                // (and a paused deployment places no more of them).
                let shadowed: BTreeSet<u32> = canaries.iter().map(|a| a.index).collect();
                let need =
                    if status == deployment_status::RUNNING { (group.desired_canaries as usize).saturating_sub(canaries.len()) } else { 0 };
                canary_indexes = outdated.iter().map(|a| a.index).filter(|i| !shadowed.contains(i)).take(need).collect();
                live.append(&mut outdated);
            } else if unpromoted {
                live.append(&mut outdated);
            } else {
                // A promoted canary replaces the old allocation at its index.
                let shadowed: BTreeSet<u32> = canaries.iter().map(|a| a.index).collect();
                for a in outdated.iter().filter(|a| shadowed.contains(&a.index)) {
                    out.stops.push(stop(a, &format!("replaced by a canary of job version {}", job.version)));
                }
                outdated.retain(|a| !shadowed.contains(&a.index));
                live.extend(canaries);
                let unhealthy = live.iter().filter(|a| a.deployment_id == dep_id && !crate::deploy::is_healthy(a)).count();
                let budget = if status == deployment_status::RUNNING {
                    (s.max_parallel.unwrap_or(1) as usize).saturating_sub(unhealthy)
                } else if status == deployment_status::SUCCESSFUL {
                    usize::MAX
                } else {
                    0 // paused, failed or cancelled: no more replacements
                };
                let want = tg.effective_count() as usize;
                let mut replaced = 0;
                for a in outdated.drain(..) {
                    if (a.index as usize) < want && replaced < budget {
                        replaced += 1;
                        rolled = true;
                        out.stops.push(stop(a, &format!("replaced by job version {} (rolling update)", job.version)));
                    } else {
                        live.push(a);
                    }
                }
            }
            if active {
                roll = Some((dep_id, canary_phase));
            }
        }

        // Count reduced: stop the highest indexes (ties: highest id, for determinism).
        live.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
        let want = tg.effective_count() as usize;
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

        // Drained allocations move to another node at the same index; not a reschedule.
        migrating.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
        for a in migrating {
            if (a.index as usize) < want && taken.insert(a.index) {
                held += 1;
                out.place.push(Want {
                    previous_allocation: a.id.clone(),
                    reschedule_tracker: a.reschedule_tracker.clone(),
                    ..Want::fresh(tg, a.index)
                });
            }
        }

        // Failed and lost allocations, per the reschedule policy; the newest attempt of an
        // index decides.
        ended.sort_by(|(a, _), (b, _)| {
            (a.index, std::cmp::Reverse(a.create_index), &a.id).cmp(&(b.index, std::cmp::Reverse(b.create_index), &b.id))
        });
        for (a, ended_ms) in ended {
            if (a.index as usize) >= want || taken.contains(&a.index) {
                continue;
            }
            taken.insert(a.index);
            held += 1;
            let events: &[RescheduleEvent] = a.reschedule_tracker.as_ref().map(|t| t.events.as_slice()).unwrap_or(&[]);
            match decide(&policy, events, ended_ms, now_ms) {
                Decision::Now { delay_ms } => {
                    let mut tracker = a.reschedule_tracker.clone().unwrap_or_default();
                    tracker.events.push(RescheduleEvent {
                        reschedule_time_ms: now_ms,
                        prev_alloc_id: a.id.clone(),
                        prev_node_id: a.node_id.clone(),
                        delay_ms,
                    });
                    // Keep the history bounded; only the recent ones matter for the policy.
                    if tracker.events.len() > MAX_RESCHEDULE_EVENTS {
                        let excess = tracker.events.len() - MAX_RESCHEDULE_EVENTS;
                        tracker.events.drain(..excess);
                    }
                    out.place.push(Want {
                        previous_allocation: a.id.clone(),
                        reschedule_tracker: Some(tracker),
                        ..Want::fresh(tg, a.index)
                    });
                }
                Decision::Later { at_ms, delay_ms } => {
                    let description = format!("rescheduling after a delay of {} (attempt {})", fmt_ms(delay_ms), events.len() + 1);
                    if a.follow_up_eval_id.is_empty() {
                        let eval = Evaluation {
                            id: uuid::Uuid::new_v4().to_string(),
                            namespace: job.namespace.clone(),
                            job_id: job.id.clone(),
                            priority: job.priority,
                            r#type: job.r#type.clone(),
                            triggered_by: eval_trigger::ALLOC_FAILURE.to_string(),
                            status: eval_status::PENDING.to_string(),
                            status_description: format!("delayed reschedule of allocation {}", a.id),
                            job_modify_index: job.job_modify_index,
                            wait_until_ms: at_ms,
                            ..Default::default()
                        };
                        out.annotations.push(AllocAnnotation {
                            alloc_id: a.id.clone(),
                            follow_up_eval_id: Some(eval.id.clone()),
                            reschedule_description: Some(description),
                        });
                        out.follow_ups.push(eval);
                    }
                }
                Decision::Exhausted(why) => {
                    if a.reschedule_description != why {
                        out.annotations.push(AllocAnnotation {
                            alloc_id: a.id.clone(),
                            follow_up_eval_id: None,
                            reschedule_description: Some(why),
                        });
                    }
                }
            }
        }

        let mut index = 0u32;
        for _ in held..want {
            while taken.contains(&index) {
                index += 1;
            }
            out.place.push(Want::fresh(tg, index));
            taken.insert(index);
        }
        if let Some((dep_id, _)) = &roll {
            if existing.is_none() && (rolled || !canary_indexes.is_empty() || out.place.iter().any(|w| w.group.name == tg.name)) {
                new_used = true;
            }
            for w in out.place.iter_mut().filter(|w| w.group.name == tg.name) {
                w.deployment_id = dep_id.clone();
            }
            for i in canary_indexes {
                out.place.push(Want { deployment_id: dep_id.clone(), canary: true, ..Want::fresh(tg, i) });
            }
        }
    }
    // A new deployment is recorded only when some group rolls (something to place or replace).
    if existing.is_none() && new_used {
        out.deployment = Some(Deployment {
            id: new_id,
            namespace: job.namespace.clone(),
            job_id: job.id.clone(),
            job_version: job.version,
            job_modify_index: job.job_modify_index,
            status: deployment_status::RUNNING.to_string(),
            status_description: "running".to_string(),
            groups: new_groups,
            is_revert: job.revert_of.is_some(),
            ..Default::default()
        });
    } else if existing.is_none() {
        // Nothing rolls: the placements (if any) are not the deployment's.
        for w in out.place.iter_mut() {
            w.deployment_id.clear();
            w.canary = false;
        }
    }
    out
}

/// `90s`, `2m30s`, `1h`: a duration for humans.
pub fn fmt_ms(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

/// How many reschedule events an allocation carries at most.
pub const MAX_RESCHEDULE_EVENTS: usize = 32;

/// Whether reconciliation of `job` (not stopped) still counts on allocation `a`: it holds its
/// index (a finished batch allocation, which must not run again) or is a failed or lost one
/// whose replacement `decide` has yet to make (now, later or never). Garbage collection keeps
/// these, or the next evaluation of the job would place the index afresh. Mirrors the
/// classification in `reconcile_at`; keep the two together.
pub fn holds_index(state: &ClusterState, job: &Job, a: &Allocation) -> bool {
    let Some(tg) = job.groups.iter().find(|g| g.name == a.task_group) else { return false };
    if !a.next_allocation.is_empty() || spec_changed(state, job, tg, a) {
        return false;
    }
    if a.desired_status != alloc_desired::RUN {
        // Lost and never replaced: a reschedule candidate. Anything else stopped frees its index.
        return a.client_status == alloc_client::LOST;
    }
    // Live, done (complete), or failed and not yet replaced.
    a.client_status != alloc_client::LOST
}

/// Whether `a` was made from a job version whose spec for `tg` differs from the current one.
/// The count is ignored (scaling is not an update); an unknown old version counts as changed.
pub fn spec_changed(state: &ClusterState, job: &Job, tg: &TaskGroup, a: &Allocation) -> bool {
    if a.job_version == job.version {
        return false;
    }
    let Some(old_job) = state.job_version(&job.namespace, &job.id, a.job_version) else { return true };
    // Job-level preferences apply to every group, so changing them replaces allocations too (as in
    // Nomad, which compares job-level affinities and spreads along with the group's).
    if old_job.affinities != job.affinities || old_job.spreads != job.spreads {
        return true;
    }
    match old_job.groups.iter().find(|g| g.name == tg.name) {
        None => true,
        Some(old) => {
            // The count, the update strategy and the shutdown delay change in place.
            let (mut old, mut new) = (old.clone(), tg.clone());
            for g in [&mut old, &mut new] {
                g.count = Some(0);
                g.update = None;
                g.shutdown_delay_ms = 0;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, PlanResult, Request};
    use mlp_proto::v1::{AllocClientUpdate, Evaluation, Node, NodeResources, Task};

    fn policy(function: &str, attempts: u32, unlimited: bool) -> ReschedulePolicy {
        ReschedulePolicy {
            attempts,
            interval_ms: 3_600_000,
            delay_ms: 5_000,
            delay_function: function.into(),
            max_delay_ms: 60_000,
            unlimited,
        }
    }

    fn ev(at: u64, delay_ms: u64) -> RescheduleEvent {
        RescheduleEvent { reschedule_time_ms: at, delay_ms, ..Default::default() }
    }

    #[test]
    fn delay_functions_grow_and_cap() {
        let c = policy("constant", 0, true);
        assert_eq!(next_delay(&c, &[]), 5_000);
        assert_eq!(next_delay(&c, &[ev(0, 5_000), ev(0, 5_000)]), 5_000);
        let e = policy("exponential", 0, true);
        assert_eq!(next_delay(&e, &[]), 5_000);
        assert_eq!(next_delay(&e, &[ev(0, 5_000)]), 10_000);
        assert_eq!(next_delay(&e, &[ev(0, 5_000), ev(0, 10_000)]), 20_000);
        assert_eq!(next_delay(&e, &[ev(0, 40_000)]), 60_000, "capped at max_delay");
        let f = policy("fibonacci", 0, true);
        assert_eq!(next_delay(&f, &[]), 5_000);
        assert_eq!(next_delay(&f, &[ev(0, 5_000)]), 5_000);
        assert_eq!(next_delay(&f, &[ev(0, 5_000), ev(0, 5_000)]), 10_000);
        assert_eq!(next_delay(&f, &[ev(0, 5_000), ev(0, 10_000)]), 15_000);
        assert_eq!(next_delay(&f, &[ev(0, 30_000), ev(0, 40_000)]), 60_000);
    }

    #[test]
    fn decide_counts_attempts_within_the_interval() {
        let p = policy("constant", 2, false);
        let now = 10_000_000;
        assert_eq!(decide(&p, &[], now - 10_000, now), Decision::Now { delay_ms: 5_000 });
        assert_eq!(decide(&p, &[], now - 1_000, now), Decision::Later { at_ms: now + 4_000, delay_ms: 5_000 });
        let two_recent = [ev(now - 100_000, 5_000), ev(now - 50_000, 5_000)];
        assert!(matches!(decide(&p, &two_recent, now - 10_000, now), Decision::Exhausted(why) if why.contains("2 of 2")));
        // Events older than the interval no longer count.
        let one_old = [ev(now - 4_000_000, 5_000), ev(now - 50_000, 5_000)];
        assert_eq!(decide(&p, &one_old, now - 10_000, now), Decision::Now { delay_ms: 5_000 });
        let unlimited = policy("constant", 0, true);
        assert_eq!(decide(&unlimited, &two_recent, now - 10_000, now), Decision::Now { delay_ms: 5_000 });
    }

    #[test]
    fn fmt_ms_reads_well() {
        assert_eq!(fmt_ms(0), "0s");
        assert_eq!(fmt_ms(90_000), "1m30s");
        assert_eq!(fmt_ms(3_600_000), "1h");
        assert_eq!(fmt_ms(1_500), "1500ms");
    }

    struct C {
        st: ClusterState,
        index: u64,
    }

    impl C {
        fn apply(&mut self, now_ms: u64, command: Command) {
            self.index += 1;
            let r = self.st.apply(self.index, &Request { now_ms, command }, &mut Vec::new());
            assert_eq!(r.error, None);
        }
    }

    /// A cluster with node n1 and job j (count 1, `policy`) whose one allocation failed at t=1000.
    fn failed_once(policy: ReschedulePolicy) -> (C, Job, String) {
        let mut c = C { st: ClusterState::default(), index: 0 };
        let node = Node {
            id: "n1".into(),
            name: "n1".into(),
            resources: Some(NodeResources { cpu_total_mhz: 1000, memory_mib: 1000, ..Default::default() }),
            ..Default::default()
        };
        c.apply(1, Command::UpsertNode { node, overlay: None, secret_hash: None });
        let job = Job {
            id: "j".into(),
            name: "j".into(),
            namespace: "default".into(),
            r#type: job_type::BATCH.into(),
            priority: 50,
            groups: vec![TaskGroup {
                name: "g".into(),
                count: Some(1),
                reschedule: Some(policy),
                tasks: vec![Task { name: "t".into(), driver: "raw_exec".into(), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        };
        c.apply(1, Command::RegisterJob { job: job.clone(), eval: Evaluation { id: "e0".into(), ..Default::default() } });
        let a = Allocation {
            id: "a0".into(),
            node_id: "n1".into(),
            job_id: "j".into(),
            namespace: "default".into(),
            task_group: "g".into(),
            desired_status: alloc_desired::RUN.into(),
            ..Default::default()
        };
        c.apply(1, Command::ApplyPlan(PlanResult { placements: vec![a], ..Default::default() }));
        let update = AllocClientUpdate { alloc_id: "a0".into(), client_status: alloc_client::FAILED.into(), ..Default::default() };
        c.apply(1000, Command::UpdateAllocsFromClient { node_id: "n1".into(), updates: vec![update] });
        let job = c.st.job("default", "j").cloned().unwrap_or(job);
        (c, job, "a0".into())
    }

    #[test]
    fn failed_alloc_gets_a_follow_up_then_a_replacement_then_gives_up() {
        let (mut c, job, first) = failed_once(policy("constant", 1, false));
        // The failure created an alloc-failure evaluation on every replica alike.
        assert!(c.st.evals.values().any(|e| e.triggered_by == eval_trigger::ALLOC_FAILURE && e.status == eval_status::PENDING));
        // Before the delay: no placement, one follow-up evaluation at failure + 5 s.
        let r = reconcile_at(&c.st, Some(&job), "default", "j", 2_000);
        assert!(r.place.is_empty());
        assert_eq!(r.follow_ups.len(), 1);
        assert_eq!(r.follow_ups[0].wait_until_ms, 6_000);
        let note = r.annotations[0].clone();
        c.apply(2_000, Command::ApplyPlan(PlanResult { new_evals: r.follow_ups.clone(), annotations: vec![note], ..Default::default() }));
        // Asked again before the delay: no second follow-up.
        let r = reconcile_at(&c.st, Some(&job), "default", "j", 3_000);
        assert!(r.place.is_empty() && r.follow_ups.is_empty());
        // After the delay: the replacement, at the same index, remembering its predecessor.
        let r = reconcile_at(&c.st, Some(&job), "default", "j", 6_000);
        assert_eq!(r.place.len(), 1);
        assert_eq!(r.place[0].index, 0);
        assert_eq!(r.place[0].previous_allocation, first);
        let tracker = r.place[0].reschedule_tracker.clone().unwrap_or_default();
        assert_eq!(tracker.events.len(), 1);
        let replacement = Allocation {
            id: "a1".into(),
            node_id: "n1".into(),
            job_id: "j".into(),
            namespace: "default".into(),
            task_group: "g".into(),
            desired_status: alloc_desired::RUN.into(),
            previous_allocation: first.clone(),
            reschedule_tracker: Some(tracker),
            ..Default::default()
        };
        c.apply(6_000, Command::ApplyPlan(PlanResult { placements: vec![replacement], ..Default::default() }));
        assert_eq!(c.st.allocs[&first].next_allocation, "a1");
        // The replacement fails too: the one attempt is used, so it is not replaced, and says why.
        let update = AllocClientUpdate { alloc_id: "a1".into(), client_status: alloc_client::FAILED.into(), ..Default::default() };
        c.apply(7_000, Command::UpdateAllocsFromClient { node_id: "n1".into(), updates: vec![update] });
        let r = reconcile_at(&c.st, Some(&job), "default", "j", 100_000);
        assert!(r.place.is_empty() && r.follow_ups.is_empty(), "{:?}", r.place);
        let why = r.annotations[0].reschedule_description.clone().unwrap_or_default();
        assert!(why.contains("1 of 1 reschedule attempts"), "{why}");
    }

    #[test]
    fn migrating_alloc_is_stopped_and_replaced_at_its_index() {
        let (mut c, job, _) = failed_once(policy("constant", 0, true));
        let a = Allocation {
            id: "m1".into(),
            node_id: "n1".into(),
            job_id: "j".into(),
            namespace: "default".into(),
            task_group: "g".into(),
            index: 0,
            desired_status: alloc_desired::RUN.into(),
            ..Default::default()
        };
        // a0 failed and is replaced by m1 (as if placed), which then runs and is asked to migrate.
        let mut a = a;
        a.previous_allocation = "a0".into();
        c.apply(2_000, Command::ApplyPlan(PlanResult { placements: vec![a], ..Default::default() }));
        c.apply(2_000, Command::MarkAllocsMigrate { alloc_ids: vec!["m1".into()], evals: vec![] });
        let r = reconcile_at(&c.st, Some(&job), "default", "j", 3_000);
        assert_eq!(r.stops.len(), 1);
        assert_eq!(r.stops[0].alloc_id, "m1");
        assert_eq!(r.place.len(), 1);
        assert_eq!((r.place[0].index, r.place[0].previous_allocation.as_str()), (0, "m1"));
    }
}
