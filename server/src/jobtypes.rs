//! Parameterized and periodic jobs (issue 16 §2) on the servers: the children they register
//! and the API calls that make them (`Dispatch`, `PeriodicForce`, `Children`). The leader's
//! periodic launcher is `leader::periodic`.
//!
//! A parent (a job with `parameterized` or `periodic`) never places allocations itself
//! (`scheduler::reconcile`); its children are ordinary jobs with `parent_id` set, ids under
//! the parent's (`NAME/dispatch-<unix s>-<8 hex>`, `NAME/periodic-<unix s>`, a forced launch
//! `NAME/periodic-<unix s>-<8 hex>`), and neither block.

use std::collections::BTreeMap;

use mlp_proto::consts::{eval_status, eval_trigger};
use mlp_proto::jobspec::jobtypes;
use mlp_proto::v1::*;

use crate::api::{require_id, Api, ApiError};
use crate::leader::now_ms;
use crate::state::{Command, Request};

/// A child of `parent`: its spec, without the parent's blocks, with `meta` laid over the
/// parent's meta (and over groups' and tasks' values of the same keys) and the dispatch payload. Server-set fields are left for `apply`.
pub fn child_job(parent: &Job, child_id: &str, meta: &BTreeMap<String, String>, payload: Vec<u8>) -> Job {
    let mut child = parent.clone();
    child.id = child_id.to_string();
    child.name = child_id.to_string();
    child.parent_id = parent.id.clone();
    child.parameterized = None;
    child.periodic = None;
    child.payload = payload;
    // The dispatch's meta wins over the job's, and over a group's or task's value of the same
    // key (which would otherwise win in the task's MLP_META_* environment).
    for (k, v) in meta {
        child.meta.insert(k.clone(), v.clone());
        for g in &mut child.groups {
            if let Some(slot) = g.meta.get_mut(k) {
                slot.clone_from(v);
            }
            for t in &mut g.tasks {
                if let Some(slot) = t.meta.get_mut(k) {
                    slot.clone_from(v);
                }
            }
        }
    }
    child.version = 0;
    child.status = String::new();
    child.stop = false;
    child.create_index = 0;
    child.modify_index = 0;
    child.job_modify_index = 0;
    child.submit_time_ms = 0;
    child
}

/// `NAME/dispatch-<unix seconds>-<first 8 hex of the evaluation id>`.
pub fn dispatch_id(parent: &str, now_ms: u64, eval_id: &str) -> String {
    let short: String = eval_id.chars().filter(|c| c.is_ascii_hexdigit()).take(8).collect();
    format!("{parent}/dispatch-{}-{short}", now_ms / 1000)
}

/// `NAME/periodic-<unix seconds of the slot>`.
pub fn periodic_id(parent: &str, launch_ms: u64) -> String {
    format!("{parent}/periodic-{}", launch_ms / 1000)
}

/// The evaluation that schedules a child.
pub fn child_eval(child: &Job, id: String) -> Evaluation {
    Evaluation {
        id,
        namespace: child.namespace.clone(),
        job_id: child.id.clone(),
        priority: child.priority,
        r#type: child.r#type.clone(),
        triggered_by: eval_trigger::JOB_REGISTER.to_string(),
        status: eval_status::PENDING.to_string(),
        ..Default::default()
    }
}

/// The command that launches `parent`'s slot `launch_ms` (`forced`: a launch asked for now).
/// A forced launch's child is `NAME/periodic-<unix s>-<8 hex of its evaluation id>`, so that it
/// never takes a slot's id.
pub fn launch_command(parent: &Job, launch_ms: u64, forced: bool) -> Command {
    let eval_id = uuid::Uuid::new_v4().to_string();
    let mut id = periodic_id(&parent.id, launch_ms);
    if forced {
        id = format!("{id}-{}", eval_id.chars().filter(|c| c.is_ascii_hexdigit()).take(8).collect::<String>());
    }
    let child = child_job(parent, &id, &BTreeMap::new(), Vec::new());
    let eval = child_eval(&child, eval_id);
    Command::PeriodicLaunch { namespace: parent.namespace.clone(), job_id: parent.id.clone(), launch_ms, forced, child, eval }
}

fn namespace_of(ns: &str) -> &str {
    if ns.is_empty() {
        "default"
    } else {
        ns
    }
}

/// A job's line in a list (`mlp job status`, a parent's children).
pub(crate) fn summary(st: &crate::state::ClusterState, j: &Job) -> JobSummary {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for a in st.allocs_for_job(&j.namespace, &j.id) {
        *counts.entry(a.client_status.clone()).or_default() += 1;
    }
    JobSummary {
        id: j.id.clone(),
        name: j.name.clone(),
        r#type: j.r#type.clone(),
        status: j.status.clone(),
        priority: j.priority,
        version: j.version,
        namespace: j.namespace.clone(),
        submit_time_ms: j.submit_time_ms,
        alloc_counts: counts,
    }
}

impl Api {
    /// Dispatches a parameterized job: checks the meta and payload against its block, then
    /// commits the child (`Command::DispatchJob`, which re-checks the parent).
    pub async fn dispatch_job(&self, req: DispatchJobRequest) -> Result<DispatchJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = namespace_of(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let parent = self.current_job(&ns, &req.job_id)?;
        let Some(p) = parent.parameterized.as_ref() else {
            return Err(ApiError::InvalidArgument(format!(
                "job {:?} is not parameterized (it has no `parameterized` block); run it with `mlp job run`",
                req.job_id
            )));
        };
        if parent.stop {
            return Err(ApiError::InvalidArgument(format!("job {:?} is stopped; register it again to dispatch it", req.job_id)));
        }
        jobtypes::check_dispatch(&req.job_id, p, &req.meta, &req.payload).map_err(|e| ApiError::InvalidArgument(e.0))?;
        let eval_id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            uuid::Uuid::parse_str(&req.request_id)
                .map_err(|_| ApiError::InvalidArgument(format!("request_id must be a UUID, found {:?}", req.request_id)))?
                .hyphenated()
                .to_string()
        };
        let now = now_ms();
        let child = child_job(&parent, &dispatch_id(&parent.id, now, &eval_id), &req.meta, req.payload);
        let eval = child_eval(&child, eval_id.clone());
        let resp = self.raft.submit(Request { now_ms: now, command: Command::DispatchJob { child, eval } }).await?;
        let dispatched_job_id = resp.created.ok_or_else(|| ApiError::Internal("the dispatch committed no child".into()))?;
        Ok(DispatchJobResponse { dispatched_job_id, eval_id, index: resp.index })
    }

    /// Launches a periodic job's child now, whatever its schedule says.
    pub async fn periodic_force(&self, req: PeriodicForceRequest) -> Result<PeriodicForceResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = namespace_of(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let parent = self.current_job(&ns, &req.job_id)?;
        if parent.periodic.is_none() {
            return Err(ApiError::InvalidArgument(format!("job {:?} is not periodic (it has no `periodic` block)", req.job_id)));
        }
        let now = now_ms();
        let cmd = launch_command(&parent, now, true);
        let eval_id = match &cmd {
            Command::PeriodicLaunch { eval, .. } => eval.id.clone(),
            _ => String::new(),
        };
        let resp = self.raft.submit(Request { now_ms: now, command: cmd }).await?;
        let child_job_id = resp.created.ok_or_else(|| ApiError::Internal("the launch committed no child".into()))?;
        Ok(PeriodicForceResponse { child_job_id, eval_id, index: resp.index })
    }

    /// A parent's children, newest first, with its last and next periodic launch.
    pub async fn job_children(&self, req: JobChildrenRequest) -> Result<JobChildrenResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = namespace_of(&req.namespace);
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        let parent =
            st.job(ns, &req.job_id).ok_or_else(|| ApiError::NotFound(format!("job {:?} not found in namespace {ns:?}", req.job_id)))?;
        let mut children: Vec<JobSummary> = st.children_of(ns, &req.job_id).map(|j| summary(&st, j)).collect();
        children.sort_by(|a, b| (b.submit_time_ms, &b.id).cmp(&(a.submit_time_ms, &a.id)));
        let key = crate::state::job_key(ns, &req.job_id);
        let last_launch_ms = st.periodic_launches.get(&key).copied().unwrap_or(0);
        let next_launch_ms = match &parent.periodic {
            Some(p) if !parent.stop => jobtypes::next_launch_after(p, now_ms().max(last_launch_ms)).unwrap_or(0),
            _ => 0,
        };
        Ok(JobChildrenResponse { children, next_launch_ms, last_launch_ms, index: st.index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ClusterState;

    fn parent(periodic: bool) -> Job {
        Job {
            id: "train".into(),
            name: "train".into(),
            namespace: "default".into(),
            r#type: "batch".into(),
            priority: 50,
            meta: [("owner".to_string(), "ml".to_string()), ("lr".to_string(), "0.1".to_string())].into(),
            parameterized: (!periodic).then(|| ParameterizedConfig { payload: "optional".into(), ..Default::default() }),
            periodic: periodic.then(|| PeriodicConfig { crons: vec!["* * * * *".into()], ..Default::default() }),
            groups: vec![TaskGroup { name: "g".into(), count: Some(1), ..Default::default() }],
            ..Default::default()
        }
    }

    fn apply(st: &mut ClusterState, index: u64, now_ms: u64, command: Command) -> crate::state::CommandResponse {
        st.apply(index, &Request { now_ms, command }, &mut Vec::new())
    }

    #[test]
    fn a_dispatch_registers_a_child_once_and_the_parent_places_nothing() {
        let mut st = ClusterState::default();
        let p = parent(false);
        let r = apply(&mut st, 1, 1000, Command::RegisterJob { job: p.clone(), eval: child_eval(&p, "e0".into()) });
        assert_eq!(r.error, None);
        assert_eq!(st.job("default", "train").map(|j| j.status.as_str()), Some("running"));
        let meta = [("lr".to_string(), "0.5".to_string())].into();
        let child = child_job(&p, &dispatch_id("train", 5_000, "abcdef12-3456"), &meta, b"data".to_vec());
        assert_eq!(child.id, "train/dispatch-5-abcdef12");
        let cmd = Command::DispatchJob { child: child.clone(), eval: child_eval(&child, "e1".into()) };
        let r = apply(&mut st, 2, 5_000, cmd.clone());
        assert_eq!((r.error.as_deref(), r.created.as_deref()), (None, Some("train/dispatch-5-abcdef12")));
        let c = st.job("default", "train/dispatch-5-abcdef12").cloned().unwrap_or_default();
        assert_eq!((c.parent_id.as_str(), c.meta["lr"].as_str(), c.meta["owner"].as_str()), ("train", "0.5", "ml"));
        assert!(c.parameterized.is_none() && c.payload == b"data");
        // A retry of the same request (same evaluation id) answers the same child.
        let r = apply(&mut st, 3, 6_000, cmd);
        assert_eq!(r.created.as_deref(), Some("train/dispatch-5-abcdef12"));
        assert_eq!(st.children_of("default", "train").count(), 1);
        // The parent's own evaluation places nothing.
        let plan = crate::scheduler::schedule(&st, st.job("default", "train"), &child_eval(&p, "e0".into()), 7_000);
        assert!(plan.placements.is_empty() && plan.failed_tg_allocs.is_empty());
        // A job that is not parameterized cannot be dispatched, even by a hand-made entry.
        let mut other = child.clone();
        other.id = "x/dispatch-1-1".into();
        other.parent_id = "x".into();
        let r = apply(&mut st, 4, 7_000, Command::DispatchJob { child: other, eval: child_eval(&child, "e9".into()) });
        assert!(r.error.unwrap_or_default().contains("not found"));
    }

    #[test]
    fn a_periodic_slot_is_launched_once_whoever_proposes_it() {
        let mut st = ClusterState::default();
        let p = parent(true);
        apply(&mut st, 1, 1000, Command::RegisterJob { job: p.clone(), eval: child_eval(&p, "e0".into()) });
        // The launcher's index holds the parent, not its children.
        let periodic_jobs = |st: &ClusterState| st.periodic_jobs.iter().cloned().collect::<Vec<_>>();
        assert_eq!(periodic_jobs(&st), ["default/train"]);
        // Two leaders (or one retrying) propose the same slot: one child.
        let r = apply(&mut st, 2, 60_500, launch_command(&p, 60_000, false));
        assert_eq!(r.created.as_deref(), Some("train/periodic-60"));
        let r = apply(&mut st, 3, 60_700, launch_command(&p, 60_000, false));
        assert_eq!((r.error, r.created), (None, None));
        assert_eq!(st.periodic_launches.get("default/train"), Some(&60_000));
        // An older slot proposed late is a duplicate too.
        let r = apply(&mut st, 4, 61_000, launch_command(&p, 30_000, false));
        assert_eq!(r.created, None);
        assert_eq!(st.children_of("default", "train").count(), 1);
        // prohibit_overlap: the first child still runs, so the next slot is recorded, not run.
        let mut q = p.clone();
        q.periodic = Some(PeriodicConfig { crons: vec!["* * * * *".into()], prohibit_overlap: true, ..Default::default() });
        apply(&mut st, 5, 62_000, Command::RegisterJob { job: q.clone(), eval: child_eval(&q, "e5".into()) });
        let r = apply(&mut st, 6, 120_100, launch_command(&q, 120_000, false));
        assert_eq!(r.created, None);
        assert_eq!(st.periodic_launches.get("default/train"), Some(&120_000));
        // A forced launch runs anyway.
        let r = apply(&mut st, 7, 121_000, launch_command(&q, 121_000, true));
        assert!(r.created.unwrap_or_default().starts_with("train/periodic-121-"));
        // ... and leaves the schedule alone; the snapshot keeps the launch record.
        let json = serde_json::to_string(&st).unwrap_or_default();
        let mut back: ClusterState = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back.periodic_launches.get("default/train"), Some(&120_000));
        back.rebuild_indexes();
        assert_eq!(periodic_jobs(&back), ["default/train"]);
        // Registered again without its `periodic` block, then purged: out of the index.
        let mut plain = p.clone();
        plain.periodic = None;
        apply(&mut st, 8, 122_000, Command::RegisterJob { job: plain.clone(), eval: child_eval(&plain, "e8".into()) });
        assert!(periodic_jobs(&st).is_empty());
        apply(&mut st, 9, 123_000, Command::RegisterJob { job: q.clone(), eval: child_eval(&q, "e9".into()) });
        assert_eq!(periodic_jobs(&st), ["default/train"]);
        let purge =
            Command::StopJob { namespace: "default".into(), job_id: "train".into(), purge: true, eval: child_eval(&q, "e10".into()) };
        apply(&mut st, 10, 124_000, purge);
        assert!(periodic_jobs(&st).is_empty());
    }
}
