//! Deployments (issue 16 §1): the health-gated rollout of a new version of a service job.
//!
//! * The scheduler (`scheduler::reconcile`) creates a deployment when it first schedules a
//!   version whose groups have an `update` strategy, and paces the replacement of the old
//!   version's allocations by it: canaries first (placed beside the old allocations, replacing
//!   none until promoted), then at most `max_parallel` replacements that are not yet healthy.
//!   Its plan carries the new deployment; the allocations it places for the version carry the
//!   deployment's id.
//! * The leader's watcher ([`watch`]) decides the health of those allocations (from task states,
//!   service checks, or by hand), promotes canaries (`auto_promote`), fails a deployment whose
//!   allocation is unhealthy or whose progress deadline passed, reverts a failed one to the
//!   latest stable version (`auto_revert`), and marks a version stable when its deployment
//!   succeeded. Each decision is one replicated [`DeploymentUpdate`], with an evaluation that
//!   lets the scheduler take the next step.
//!
//! Applying an update ([`apply_update`]) is deterministic: its ids and times come from the
//! proposer (`Request::now_ms`).

use std::collections::{BTreeMap, HashMap};

use mlp_proto::consts::{alloc_client, alloc_desired, deployment_status, eval_status, eval_trigger, health_check, job_type, task_state};
use mlp_proto::v1::{AllocDeploymentStatus, Allocation, Deployment, Evaluation, Job};
use serde::{Deserialize, Serialize};

use crate::state::{job_key, same_spec, ClusterState, CommandResponse, Effect};

/// Finished deployments kept per job (the newest); a job's are all removed with it.
pub const MAX_FINISHED_PER_JOB: usize = 10;

/// One change to a deployment (`Command::UpdateDeployment`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeploymentUpdate {
    pub deployment_id: String,
    /// New status (`running` resumes, `paused`, `failed`, `successful`, `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Groups whose canaries are promoted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promote: Vec<String>,
    /// Allocations found healthy / unhealthy, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub healthy: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<(String, String)>,
    /// An evaluation of the job, so that the scheduler takes the rollout's next step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Evaluation>,
    /// The deployment's version becomes stable (the deployment succeeded).
    #[serde(default)]
    pub mark_stable: bool,
    /// A failed deployment's revert: this spec (a stable version's) is registered as a new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<Revert>,
    /// Only apply while the deployment has this status (a user's decision raced the watcher's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Revert {
    pub job: Job,
    pub eval: Evaluation,
}

/// The deployment of `namespace/job_id`'s `version`, if the scheduler created one.
pub fn for_version<'a>(st: &'a ClusterState, namespace: &str, job_id: &str, version: u64) -> Option<&'a Deployment> {
    for_job(st, namespace, job_id).filter(|d| d.job_version == version).max_by_key(|d| d.create_index)
}

/// Every deployment of a job.
pub fn for_job<'a>(st: &'a ClusterState, namespace: &str, job_id: &str) -> impl Iterator<Item = &'a Deployment> + 'a {
    let (ns, id) = (namespace.to_string(), job_id.to_string());
    st.deployments.values().filter(move |d| d.namespace == ns && d.job_id == id)
}

/// The job's most recent deployment.
pub fn latest<'a>(st: &'a ClusterState, namespace: &str, job_id: &str) -> Option<&'a Deployment> {
    for_job(st, namespace, job_id).max_by_key(|d| (d.create_index, d.create_time_ms))
}

/// Whether `a` is a canary of deployment `id`.
pub fn is_canary(a: &Allocation, id: &str) -> bool {
    !id.is_empty() && a.deployment_id == id && a.deployment_status.as_ref().is_some_and(|s| s.canary)
}

/// Whether `a` was found healthy by its deployment.
pub fn is_healthy(a: &Allocation) -> bool {
    a.deployment_status.as_ref().and_then(|s| s.healthy) == Some(true)
}

/// Finds a deployment by full id or unique prefix.
pub fn find<'a>(st: &'a ClusterState, id_or_prefix: &str) -> Result<&'a Deployment, crate::state::LookupError> {
    use crate::state::LookupError;
    if let Some(d) = st.deployments.get(id_or_prefix) {
        return Ok(d);
    }
    let matches: Vec<&Deployment> = if id_or_prefix.is_empty() {
        Vec::new()
    } else {
        st.deployments.range(id_or_prefix.to_string()..).take_while(|(k, _)| k.starts_with(id_or_prefix)).map(|(_, d)| d).collect()
    };
    match matches.as_slice() {
        [d] => Ok(d),
        [] => Err(LookupError::NotFound { kind: "deployment", prefix: id_or_prefix.to_string() }),
        many => Err(LookupError::Ambiguous { kind: "deployment", prefix: id_or_prefix.to_string(), count: many.len() }),
    }
}

/// An evaluation of `job` that lets the scheduler take the rollout's next step.
pub fn eval_for(job: &Job, deployment_id: &str, why: &str) -> Evaluation {
    let mut e = crate::api::Api::new_eval(job, eval_trigger::DEPLOYMENT_WATCHER);
    e.status_description = why.to_string();
    e.job_modify_index = job.job_modify_index;
    e.deployment_id = deployment_id.to_string();
    e
}

/// What `ApplyPlan` does for deployments: inserts the plan's new deployment, cancels the ones
/// it supersedes, and counts the placements (and canaries) of each.
pub(crate) fn apply_plan(st: &mut ClusterState, index: u64, now: u64, plan: &crate::state::PlanResult) {
    for id in &plan.cancel_deployments {
        if let Some(d) = st.deployments.get_mut(id) {
            if deployment_status::is_active(&d.status) {
                d.status = deployment_status::CANCELLED.to_string();
                d.status_description = "cancelled: a newer version of the job was registered".to_string();
                d.modify_index = index;
                d.modify_time_ms = now;
                st.touched.deployments.insert(id.clone());
            }
        }
    }
    if let Some(d) = &plan.deployment {
        let mut d = d.clone();
        if let Some(prev) = st.deployments.get(&d.id) {
            d.create_index = prev.create_index;
            d.create_time_ms = prev.create_time_ms;
        } else {
            d.create_index = index;
            d.create_time_ms = now;
        }
        d.modify_index = index;
        d.modify_time_ms = now;
        let (ns, job_id) = (d.namespace.clone(), d.job_id.clone());
        st.touched.deployments.insert(d.id.clone());
        st.deployments.insert(d.id.clone(), d);
        // Bounded history: the job's finished deployments beyond the newest ones go.
        let mut finished: Vec<(u64, String)> = for_job(st, &ns, &job_id)
            .filter(|d| !deployment_status::is_active(&d.status))
            .map(|d| (d.create_index, d.id.clone()))
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(MAX_FINISHED_PER_JOB);
        for (_, id) in finished.into_iter().take(excess) {
            st.forget_deployment(&id);
        }
    }
    for a in &plan.placements {
        if a.deployment_id.is_empty() {
            continue;
        }
        let Some(d) = st.deployments.get_mut(&a.deployment_id) else { continue };
        if let Some(g) = d.groups.get_mut(&a.task_group) {
            g.placed_allocs += 1;
            if a.deployment_status.as_ref().is_some_and(|s| s.canary) {
                g.placed_canaries.push(a.id.clone());
            }
            d.modify_index = index;
            st.touched.deployments.insert(a.deployment_id.clone());
        }
    }
}

/// Applies a `DeploymentUpdate`; an error (unknown deployment, a terminal one changed, a raced
/// user decision) changes nothing.
pub(crate) fn apply_update(
    st: &mut ClusterState,
    index: u64,
    now: u64,
    u: &DeploymentUpdate,
    effects: &mut Vec<Effect>,
    resp: &mut CommandResponse,
) {
    let Some(d) = st.deployments.get(&u.deployment_id).cloned() else {
        resp.error = Some(format!("deployment {:?} not found", u.deployment_id));
        return;
    };
    if let Some(expect) = &u.expect_status {
        if &d.status != expect {
            resp.error = Some(format!("deployment {} is {}, not {expect}", short(&d.id), d.status));
            return;
        }
    }
    if !deployment_status::is_active(&d.status) {
        resp.error = Some(format!("deployment {} is {} and can no longer change", short(&d.id), d.status));
        return;
    }
    for g in &u.promote {
        if !d.groups.contains_key(g) {
            resp.error = Some(format!("deployment {} has no group {g:?}", short(&d.id)));
            return;
        }
    }
    let mut d = d;
    // Allocation health.
    let mut health: BTreeMap<&str, (bool, &str)> = BTreeMap::new();
    for (id, why) in &u.healthy {
        health.insert(id.as_str(), (true, why.as_str()));
    }
    for (id, why) in &u.unhealthy {
        health.insert(id.as_str(), (false, why.as_str()));
    }
    for (id, (healthy, why)) in health {
        let Some(a) = st.allocs.get_mut(id) else { continue };
        if a.deployment_id != d.id {
            continue;
        }
        let status = a.deployment_status.get_or_insert_with(AllocDeploymentStatus::default);
        if status.healthy.is_some() {
            continue; // decided once
        }
        status.healthy = Some(healthy);
        status.timestamp_ms = now;
        status.description = why.to_string();
        a.modify_index = index;
        st.touched.allocs.insert(a.id.clone());
        if let Some(g) = d.groups.get_mut(&a.task_group) {
            if healthy {
                g.healthy_allocs += 1;
                let progress = g.strategy.as_ref().and_then(|s| s.progress_deadline_ms).unwrap_or(0);
                if progress > 0 {
                    g.require_progress_by_ms = now.saturating_add(progress);
                }
            } else {
                g.unhealthy_allocs += 1;
            }
        }
    }
    for g in &u.promote {
        if let Some(g) = d.groups.get_mut(g) {
            g.promoted = true;
            let progress = g.strategy.as_ref().and_then(|s| s.progress_deadline_ms).unwrap_or(0);
            if progress > 0 {
                g.require_progress_by_ms = now.saturating_add(progress);
            }
        }
    }
    if let Some(s) = &u.status {
        if s == deployment_status::RUNNING && d.status == deployment_status::PAUSED {
            // Resumed: the progress deadlines start again.
            for g in d.groups.values_mut() {
                let progress = g.strategy.as_ref().and_then(|s| s.progress_deadline_ms).unwrap_or(0);
                if progress > 0 {
                    g.require_progress_by_ms = now.saturating_add(progress);
                }
            }
        }
        d.status = s.clone();
    }
    if let Some(desc) = &u.description {
        d.status_description = desc.clone();
    }
    let key = job_key(&d.namespace, &d.job_id);
    if u.mark_stable {
        if let Some(vs) = st.job_versions.get_mut(&key) {
            for v in vs.iter_mut().filter(|v| v.version == d.job_version) {
                v.stable = true;
            }
        }
        if let Some(j) = st.jobs.get_mut(&key).filter(|j| j.version == d.job_version) {
            j.stable = true;
            st.touched.jobs.insert(key.clone());
        }
    }
    d.modify_index = index;
    d.modify_time_ms = now;
    let id = d.id.clone();
    st.touched.deployments.insert(id.clone());
    st.deployments.insert(id.clone(), d);
    if let Some(e) = &u.eval {
        st.upsert_eval(index, now, e.clone(), effects);
    }
    if let Some(r) = &u.revert {
        st.register_job_from(index, now, &r.job, &r.eval, effects, resp);
        if let (Some(v), Some(d)) = (resp.job_version, st.deployments.get_mut(&id)) {
            d.reverted_to_version = v;
        }
    }
}

/// The first 8 characters of an id.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The leader's memory of when each deployment allocation's service checks started passing
/// (a new leader starts these clocks again).
#[derive(Debug, Default)]
pub struct HealthClock {
    passing_since: HashMap<String, u64>,
    /// After a `watch`: the earliest time an allocation's `min_healthy_time` runs out (the
    /// leader wakes the watcher then, not only on its tick).
    pub next_due_ms: Option<u64>,
}

/// The watcher: for every running deployment, the updates its allocations' health and its
/// deadlines call for. Pure but for `clock`.
pub fn watch(st: &ClusterState, now: u64, clock: &mut HealthClock) -> Vec<DeploymentUpdate> {
    clock.next_due_ms = None;
    let mut out = Vec::new();
    let mut seen_allocs = Vec::new();
    for d in st.deployments.values().filter(|d| d.status == deployment_status::RUNNING) {
        let job = st.job(&d.namespace, &d.job_id);
        let Some(job) = job.filter(|j| !j.stop && j.version == d.job_version) else {
            let why = match job {
                None => "cancelled: the job was purged".to_string(),
                Some(j) if j.stop => "cancelled: the job was stopped".to_string(),
                Some(j) => format!("cancelled: the job was updated to version {}", j.version),
            };
            out.push(DeploymentUpdate {
                deployment_id: d.id.clone(),
                status: Some(deployment_status::CANCELLED.to_string()),
                description: Some(why),
                ..Default::default()
            });
            continue;
        };
        let mut u = DeploymentUpdate { deployment_id: d.id.clone(), ..Default::default() };
        let allocs: Vec<&Allocation> = st.allocs_for_job(&d.namespace, &d.job_id).filter(|a| a.deployment_id == d.id).collect();
        for a in &allocs {
            seen_allocs.push(a.id.clone());
            if a.deployment_status.as_ref().is_some_and(|s| s.healthy.is_some()) {
                continue;
            }
            let Some(tg) = job.groups.iter().find(|g| g.name == a.task_group) else { continue };
            let Some(strategy) = d.groups.get(&a.task_group).and_then(|g| g.strategy.as_ref()) else { continue };
            match alloc_health(st, a, tg, strategy, now, clock) {
                Some((true, why)) => u.healthy.push((a.id.clone(), why)),
                Some((false, why)) => u.unhealthy.push((a.id.clone(), why)),
                None => {}
            }
        }
        // The deployment's state once these are applied.
        let healthy_now = |a: &Allocation| is_healthy(a) || u.healthy.iter().any(|(id, _)| id == &a.id);
        let marked_unhealthy = allocs.iter().find_map(|a| {
            let s = a.deployment_status.as_ref().filter(|s| s.healthy == Some(false))?;
            Some((a.id.clone(), s.description.clone()))
        });
        if let Some((id, why)) = u.unhealthy.first().cloned().or(marked_unhealthy) {
            let name = allocs.iter().find(|a| a.id == id).map(|a| a.name.clone()).unwrap_or_default();
            fail(st, d, job, format!("failed: allocation {name} ({}) is unhealthy: {why}", short(&id)), &mut u);
            out.push(u);
            continue;
        }
        let mut complete = true;
        let mut late = None;
        for (name, g) in &d.groups {
            let strategy = g.strategy.clone().unwrap_or_default();
            let live_new: Vec<&&Allocation> = allocs.iter().filter(|a| a.task_group == *name && is_live(a)).collect();
            let canary_phase = g.desired_canaries > 0 && !g.promoted;
            if canary_phase {
                let canaries: Vec<&&Allocation> = live_new.iter().copied().filter(|a| is_canary(a, &d.id)).collect();
                let all_healthy = canaries.len() as u32 >= g.desired_canaries && canaries.iter().all(|a| healthy_now(a));
                if all_healthy && strategy.auto_promote == Some(true) {
                    u.promote.push(name.clone());
                } else {
                    complete = false;
                    // Healthy canaries wait for a person's promotion: no deadline runs then.
                    if !all_healthy && g.require_progress_by_ms > 0 && now > g.require_progress_by_ms {
                        late = Some(name.clone());
                    }
                    continue;
                }
            }
            // Allocations of an older version with the same spec for the group (a revert, a
            // count change) were healthy in their own deployment and stay: they count.
            let Some(tg) = job.groups.iter().find(|g| g.name == *name) else { continue };
            let group_live: Vec<&Allocation> =
                st.allocs_for_job(&d.namespace, &d.job_id).filter(|a| a.task_group == *name && is_live(a)).collect();
            let outdated = group_live.iter().filter(|a| crate::scheduler::spec_changed(st, job, tg, a)).count();
            let kept = group_live
                .iter()
                .filter(|a| a.deployment_id != d.id && a.client_status == alloc_client::RUNNING)
                .filter(|a| !crate::scheduler::spec_changed(st, job, tg, a))
                .count();
            let healthy = (live_new.iter().filter(|a| healthy_now(a)).count() + kept) as u32;
            if healthy < g.desired_total || outdated > 0 {
                complete = false;
                if g.require_progress_by_ms > 0 && now > g.require_progress_by_ms {
                    late = Some(name.clone());
                }
            }
        }
        if let Some(group) = late {
            let limit = d.groups.get(&group).and_then(|g| g.strategy.as_ref()).and_then(|s| s.progress_deadline_ms).unwrap_or(0);
            fail(
                st,
                d,
                job,
                format!("failed: group {group:?} made no progress within its progress_deadline ({})", crate::scheduler::fmt_ms(limit)),
                &mut u,
            );
            out.push(u);
            continue;
        }
        if complete {
            u.status = Some(deployment_status::SUCCESSFUL.to_string());
            u.description = Some("successful: every allocation of the version is healthy".to_string());
            u.mark_stable = true;
        } else if !u.healthy.is_empty() || !u.promote.is_empty() {
            u.eval = Some(eval_for(job, &d.id, "deployment progress"));
        }
        if u.status.is_some() || !u.healthy.is_empty() || !u.promote.is_empty() {
            out.push(u);
        }
    }
    clock.passing_since.retain(|id, _| seen_allocs.contains(id));
    out
}

/// Marks the update as the deployment's failure, with the revert `auto_revert` asks for.
pub fn fail(st: &ClusterState, d: &Deployment, job: &Job, why: String, u: &mut DeploymentUpdate) {
    u.status = Some(deployment_status::FAILED.to_string());
    u.expect_status = Some(deployment_status::RUNNING.to_string());
    let auto_revert = d.groups.values().any(|g| g.strategy.as_ref().and_then(|s| s.auto_revert) == Some(true));
    let mut why = why;
    if auto_revert {
        match revert_target(st, job) {
            Some(target) => {
                why.push_str(&format!("; reverting to stable version {}", target.version));
                u.revert = Some(revert_to(job, target));
            }
            None => why.push_str("; no stable version to revert to"),
        }
    }
    u.description = Some(why);
}

/// The latest stable version of `job` older than its current one and with another spec.
pub fn revert_target<'a>(st: &'a ClusterState, job: &Job) -> Option<&'a Job> {
    st.job_versions
        .get(&job_key(&job.namespace, &job.id))?
        .iter()
        .rev()
        .find(|v| v.stable && v.version < job.version && !v.stop && !same_spec(v, job))
}

/// The registration that puts `target`'s spec back as a new version of `job`.
pub fn revert_to(job: &Job, target: &Job) -> Revert {
    let mut spec = target.clone();
    spec.revert_of = Some(target.version);
    spec.stable = false;
    let eval = Evaluation {
        id: uuid::Uuid::new_v4().to_string(),
        namespace: job.namespace.clone(),
        job_id: job.id.clone(),
        priority: target.priority,
        r#type: target.r#type.clone(),
        triggered_by: eval_trigger::JOB_REGISTER.to_string(),
        status: eval_status::PENDING.to_string(),
        status_description: format!("revert to version {}", target.version),
        ..Default::default()
    };
    Revert { job: spec, eval }
}

fn is_live(a: &Allocation) -> bool {
    crate::scheduler::resources::is_live(a)
}

/// Whether a deployment's allocation is healthy (Some(true)), unhealthy (Some(false)) or not
/// decided yet, with why.
fn alloc_health(
    st: &ClusterState,
    a: &Allocation,
    tg: &mlp_proto::v1::TaskGroup,
    strategy: &mlp_proto::v1::UpdateStrategy,
    now: u64,
    clock: &mut HealthClock,
) -> Option<(bool, String)> {
    if a.client_status == alloc_client::FAILED || a.client_status == alloc_client::LOST {
        return Some((false, format!("allocation {}", a.client_status)));
    }
    if let Some((name, _)) = a.task_states.iter().find(|(_, s)| s.failed) {
        return Some((false, format!("task {name:?} failed")));
    }
    if a.desired_status != alloc_desired::RUN || alloc_client::is_terminal(&a.client_status) {
        return None; // stopped on purpose: neither
    }
    let mode = strategy.health_check.as_deref().unwrap_or(health_check::CHECKS);
    if mode == health_check::MANUAL {
        return None;
    }
    let healthy_deadline = strategy.healthy_deadline_ms.unwrap_or(300_000);
    if now.saturating_sub(a.create_time_ms) > healthy_deadline {
        return Some((false, format!("not healthy within its healthy_deadline ({})", crate::scheduler::fmt_ms(healthy_deadline))));
    }
    let running = a.client_status == alloc_client::RUNNING
        && !tg.tasks.is_empty()
        && tg.tasks.iter().all(|t| a.task_states.get(&t.name).is_some_and(|s| s.state == task_state::RUNNING));
    if !running {
        clock.passing_since.remove(&a.id);
        return None;
    }
    let mut since = tg.tasks.iter().filter_map(|t| a.task_states.get(&t.name)).map(|s| s.started_at_ms).max().unwrap_or(now);
    let checked = tg.services.iter().chain(tg.tasks.iter().flat_map(|t| t.services.iter())).any(|s| !s.checks.is_empty());
    let what = if mode == health_check::CHECKS && checked {
        let regs = st.services.get(&a.id).map(|v| v.as_slice()).unwrap_or_default();
        let passing = !regs.is_empty() && regs.iter().all(|r| r.health == mlp_proto::consts::service_health::PASSING);
        if !passing {
            clock.passing_since.remove(&a.id);
            return None;
        }
        since = since.max(*clock.passing_since.entry(a.id.clone()).or_insert(now));
        "its tasks ran and its checks passed"
    } else {
        "its tasks ran"
    };
    let min = strategy.min_healthy_time_ms.unwrap_or(10_000);
    if now.saturating_sub(since) < min {
        let due = since.saturating_add(min);
        clock.next_due_ms = Some(clock.next_due_ms.map_or(due, |d| d.min(due)));
        return None;
    }
    Some((true, format!("{what} for {}", crate::scheduler::fmt_ms(min))))
}

/// Whether deployments apply to this job type (service jobs; system jobs pace by `stagger`).
pub fn applies_to(job: &Job) -> bool {
    job.r#type == job_type::SERVICE
}
