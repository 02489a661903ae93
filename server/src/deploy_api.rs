//! The API of deployments, job revert and job scale (issue 16 §1), shared by gRPC and HTTP.

use mlp_proto::consts::{deployment_status, eval_trigger};
use mlp_proto::v1::{
    Deployment, DeploymentAllocHealthRequest, DeploymentFailRequest, DeploymentPauseRequest, DeploymentPromoteRequest,
    DeploymentUpdateResponse, GetDeploymentResponse, Job, ListDeploymentsRequest, ListDeploymentsResponse, RegisterJobResponse,
    RestartJobRequest, RevertJobRequest, ScaleJobRequest,
};

use crate::api::{default_namespace, require_id, Api, ApiError};
use crate::deploy::{self, DeploymentUpdate};
use crate::leader::now_ms;
use crate::state::{job_key, Command, Request};

/// The group meta key `mlp job restart` sets (to the time of the restart, in ms).
pub const RESTART_META: &str = "mlp.restart";

impl Api {
    /// The running (not stopped) job a request names, and the names of its groups; refused
    /// when a named group is not one of them.
    fn live_job(&self, ns: &str, job_id: &str, groups: &[String]) -> Result<Job, ApiError> {
        let job = self.current_job(ns, job_id)?;
        if job.stop {
            return Err(ApiError::InvalidArgument(format!("job {job_id:?} is stopped; run it again first")));
        }
        let names: Vec<&str> = job.groups.iter().map(|g| g.name.as_str()).collect();
        if let Some(g) = groups.iter().find(|g| !names.contains(&g.as_str())) {
            return Err(ApiError::NotFound(format!("job {job_id:?} has no group {g:?}; its groups: {}", names.join(", "))));
        }
        Ok(job)
    }

    /// Validates and registers a changed version of a job the API made (scale, restart).
    async fn register_changed(&self, job: Job, trigger: &str, now: u64) -> Result<RegisterJobResponse, ApiError> {
        mlp_proto::jobspec::validate_job(&job).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let eval = Self::new_eval(&job, trigger);
        let eval_id = eval.id.clone();
        let resp = self.raft.submit(Request { now_ms: now, command: Command::RegisterJob { job, eval } }).await?;
        Ok(RegisterJobResponse { eval_id, job_version: resp.job_version.unwrap_or(0), index: resp.index })
    }

    /// Registers an older version's spec as the job's next version (`mlp job revert`). Its
    /// deployment places no canaries (nomad#10882).
    pub async fn revert_job(&self, req: RevertJobRequest) -> Result<RegisterJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = default_namespace(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let spec = {
            let st = self.state.read();
            let current = st
                .job(&ns, &req.job_id)
                .ok_or_else(|| ApiError::NotFound(format!("job {:?} not found in namespace {ns:?}", req.job_id)))?;
            if let Some(prior) = req.enforce_prior_version {
                if prior != current.version {
                    return Err(ApiError::InvalidArgument(format!(
                        "the job is at version {}, not {prior} (enforce_prior_version)",
                        current.version
                    )));
                }
            }
            if req.version == current.version {
                return Err(ApiError::InvalidArgument(format!("the job is already at version {}", req.version)));
            }
            let versions = st.job_versions.get(&job_key(&ns, &req.job_id)).map(|v| v.as_slice()).unwrap_or_default();
            let target = versions.iter().find(|v| v.version == req.version).ok_or_else(|| {
                let known: Vec<String> = versions.iter().map(|v| v.version.to_string()).collect();
                ApiError::NotFound(format!("job {:?} has no version {}; kept versions: {}", req.job_id, req.version, known.join(", ")))
            })?;
            if target.stop {
                return Err(ApiError::InvalidArgument(format!("version {} is a stopped version; run the job again instead", req.version)));
            }
            deploy::revert_to(current, target)
        };
        let eval_id = spec.eval.id.clone();
        let resp = self.raft.submit(Request { now_ms: now_ms(), command: Command::RegisterJob { job: spec.job, eval: spec.eval } }).await?;
        Ok(RegisterJobResponse { eval_id, job_version: resp.job_version.unwrap_or(0), index: resp.index })
    }

    /// Sets one group's count (`mlp job scale`): a new version that differs only in the count,
    /// which replaces nothing.
    pub async fn scale_job(&self, req: ScaleJobRequest) -> Result<RegisterJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        require_id("group", &req.group)?;
        let ns = default_namespace(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let mut job = self.live_job(&ns, &req.job_id, std::slice::from_ref(&req.group))?;
        for g in job.groups.iter_mut().filter(|g| g.name == req.group) {
            g.count = Some(req.count);
        }
        self.register_changed(job, eval_trigger::JOB_SCALE, now_ms()).await
    }

    /// A rolling restart (`mlp job restart`): a new version whose groups carry a new
    /// `mlp.restart` meta value, replaced as the groups' `update` strategy says (all at once
    /// for a group without one).
    pub async fn restart_job(&self, req: RestartJobRequest) -> Result<RegisterJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = default_namespace(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let now = now_ms();
        let mut job = self.live_job(&ns, &req.job_id, &req.groups)?;
        for g in job.groups.iter_mut().filter(|g| req.groups.is_empty() || req.groups.contains(&g.name)) {
            g.meta.insert(RESTART_META.to_string(), now.to_string());
        }
        self.register_changed(job, eval_trigger::JOB_REGISTER, now).await
    }

    pub async fn list_deployments(&self, req: ListDeploymentsRequest) -> Result<ListDeploymentsResponse, ApiError> {
        self.read_barrier(false).await?;
        let st = self.state.read();
        let mut deployments: Vec<Deployment> = st
            .deployments
            .values()
            .filter(|d| req.namespace.is_empty() || d.namespace == req.namespace)
            .filter(|d| req.job_id.is_empty() || d.job_id == req.job_id)
            .cloned()
            .collect();
        deployments.sort_by_key(|d| std::cmp::Reverse(d.create_index));
        Ok(ListDeploymentsResponse { deployments, index: st.index })
    }

    pub async fn get_deployment(&self, id: &str) -> Result<GetDeploymentResponse, ApiError> {
        require_id("deployment_id", id)?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        let d = deploy::find(&st, id).map_err(|e| ApiError::NotFound(e.to_string()))?.clone();
        let mut allocations: Vec<_> = st.allocs_for_job(&d.namespace, &d.job_id).filter(|a| a.deployment_id == d.id).cloned().collect();
        allocations.iter_mut().for_each(mlp_proto::redact::alloc);
        allocations.sort_by_key(|a| (a.task_group.clone(), a.index, a.create_index));
        Ok(GetDeploymentResponse { deployment: Some(d), allocations, index: st.index })
    }

    /// The deployment a request names, with its job; refused unless it is still active.
    fn active_deployment(&self, id: &str) -> Result<(Deployment, Job), ApiError> {
        require_id("deployment_id", id)?;
        let st = self.state.read();
        let d = deploy::find(&st, id).map_err(|e| ApiError::NotFound(e.to_string()))?.clone();
        if !deployment_status::is_active(&d.status) {
            return Err(ApiError::InvalidArgument(format!(
                "deployment {} is {}; only a running or paused one can change",
                deploy::short(&d.id),
                d.status
            )));
        }
        let job = st
            .job(&d.namespace, &d.job_id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("job {:?} of deployment {} not found", d.job_id, deploy::short(&d.id))))?;
        Ok((d, job))
    }

    async fn submit_update(&self, u: DeploymentUpdate) -> Result<DeploymentUpdateResponse, ApiError> {
        let eval_id = u.eval.as_ref().map(|e| e.id.clone()).unwrap_or_default();
        let deployment_id = u.deployment_id.clone();
        let resp = self.raft.submit(Request { now_ms: now_ms(), command: Command::UpdateDeployment(Box::new(u)) }).await?;
        let reverted = self.state.read().deployments.get(&deployment_id).map(|d| d.reverted_to_version).unwrap_or(0);
        Ok(DeploymentUpdateResponse { eval_id, index: resp.index, reverted_to_version: reverted })
    }

    /// Promotes the canaries of the named groups (all groups with canaries when none named).
    pub async fn promote_deployment(&self, req: DeploymentPromoteRequest) -> Result<DeploymentUpdateResponse, ApiError> {
        self.read_barrier(false).await?;
        let (d, job) = self.active_deployment(&req.deployment_id)?;
        let waiting: Vec<String> = d.groups.iter().filter(|(_, g)| g.desired_canaries > 0 && !g.promoted).map(|(n, _)| n.clone()).collect();
        let groups = if req.groups.is_empty() { waiting.clone() } else { req.groups.clone() };
        if groups.is_empty() {
            return Err(ApiError::InvalidArgument(format!("deployment {} has no canaries waiting for promotion", deploy::short(&d.id))));
        }
        for g in &groups {
            if !waiting.contains(g) {
                return Err(ApiError::InvalidArgument(format!(
                    "group {g:?} of deployment {} has no canaries waiting for promotion",
                    deploy::short(&d.id)
                )));
            }
        }
        // Canaries that are not healthy yet cannot be promoted (Nomad's rule).
        {
            let st = self.state.read();
            for g in &groups {
                let unhealthy = st
                    .allocs_for_job(&d.namespace, &d.job_id)
                    .filter(|a| a.task_group == *g && deploy::is_canary(a, &d.id) && crate::scheduler::resources::is_live(a))
                    .filter(|a| !deploy::is_healthy(a))
                    .count();
                if unhealthy > 0 {
                    return Err(ApiError::InvalidArgument(format!("group {g:?}: {unhealthy} canaries are not healthy yet")));
                }
            }
        }
        let u = DeploymentUpdate {
            deployment_id: d.id.clone(),
            promote: groups,
            eval: Some(deploy::eval_for(&job, &d.id, "deployment promoted")),
            ..Default::default()
        };
        self.submit_update(u).await
    }

    /// Pauses (`pause`) or resumes a running deployment.
    pub async fn pause_deployment(&self, req: DeploymentPauseRequest) -> Result<DeploymentUpdateResponse, ApiError> {
        self.read_barrier(false).await?;
        let (d, job) = self.active_deployment(&req.deployment_id)?;
        let (from, to, why) = if req.pause {
            (deployment_status::RUNNING, deployment_status::PAUSED, "paused by the user")
        } else {
            (deployment_status::PAUSED, deployment_status::RUNNING, "resumed by the user")
        };
        if d.status != from {
            return Err(ApiError::InvalidArgument(format!("deployment {} is {}, not {from}", deploy::short(&d.id), d.status)));
        }
        let u = DeploymentUpdate {
            deployment_id: d.id.clone(),
            status: Some(to.to_string()),
            description: Some(why.to_string()),
            expect_status: Some(from.to_string()),
            eval: (!req.pause).then(|| deploy::eval_for(&job, &d.id, "deployment resumed")),
            ..Default::default()
        };
        self.submit_update(u).await
    }

    /// Fails a deployment by hand; with `auto_revert`, the job goes back to its latest stable version.
    pub async fn fail_deployment(&self, req: DeploymentFailRequest) -> Result<DeploymentUpdateResponse, ApiError> {
        self.read_barrier(false).await?;
        let (d, job) = self.active_deployment(&req.deployment_id)?;
        let mut u = DeploymentUpdate { deployment_id: d.id.clone(), ..Default::default() };
        {
            let st = self.state.read();
            deploy::fail(&st, &d, &job, "failed by the user".to_string(), &mut u);
        }
        u.expect_status = Some(d.status.clone());
        self.submit_update(u).await
    }

    /// Marks allocations of a deployment healthy or unhealthy by hand (`health_check = "manual"`).
    pub async fn set_alloc_health(&self, req: DeploymentAllocHealthRequest) -> Result<DeploymentUpdateResponse, ApiError> {
        self.read_barrier(false).await?;
        if req.healthy.is_empty() && req.unhealthy.is_empty() {
            return Err(ApiError::InvalidArgument("name at least one allocation as healthy or unhealthy".into()));
        }
        let (d, job) = self.active_deployment(&req.deployment_id)?;
        let resolve = |ids: &[String]| -> Result<Vec<(String, String)>, ApiError> {
            let st = self.state.read();
            ids.iter()
                .map(|id| {
                    let a = st.find_alloc(id).map_err(|e| ApiError::NotFound(e.to_string()))?;
                    if a.deployment_id != d.id {
                        return Err(ApiError::InvalidArgument(format!(
                            "allocation {} was not placed by deployment {}",
                            deploy::short(&a.id),
                            deploy::short(&d.id)
                        )));
                    }
                    Ok((a.id.clone(), "set by the user".to_string()))
                })
                .collect()
        };
        let (healthy, unhealthy) = (resolve(&req.healthy)?, resolve(&req.unhealthy)?);
        let u = DeploymentUpdate {
            deployment_id: d.id.clone(),
            eval: (!healthy.is_empty()).then(|| deploy::eval_for(&job, &d.id, "allocation health set by the user")),
            healthy,
            unhealthy,
            ..Default::default()
        };
        self.submit_update(u).await
    }
}
