//! The gRPC services (the API of record): thin adapters from tonic to `Api`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mlp_proto::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::acl::{self, policy::Capability, Authz};
use crate::api::{Api, Block};
use crate::events::EventError;
use crate::metrics::Metrics;

type GrpcResult<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One struct serves every client-facing service.
#[derive(Clone)]
pub struct GrpcApi {
    pub api: Arc<Api>,
}

impl GrpcApi {
    fn count(&self) {
        Metrics::inc(&self.api.metrics.grpc_requests);
    }
}

#[tonic::async_trait]
impl job_service_server::JobService for GrpcApi {
    async fn register(&self, req: Request<RegisterJobRequest>) -> GrpcResult<RegisterJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        if let Some(j) = &req.job {
            self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &j.namespace, "job register", &j.id)?;
        }
        Ok(Response::new(self.api.register_job_once(req.job, &req.request_id).await?))
    }
    async fn plan(&self, req: Request<PlanJobRequest>) -> GrpcResult<PlanJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        if let Some(j) = &req.job {
            self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &j.namespace, "job plan", &j.id)?;
        }
        Ok(Response::new(self.api.plan_job(req.job).await?))
    }
    async fn list(&self, req: Request<ListJobsRequest>) -> GrpcResult<ListJobsResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        if !req.namespace.is_empty() {
            self.api.acl.require_ns(authz.as_ref(), Capability::ListJobs, &req.namespace, "job list", "")?;
        }
        let mut r = self.api.list_jobs(req).await?;
        // No namespace asked: every namespace's jobs, as far as the token may list them.
        if let Some(a) = &authz {
            r.jobs.retain(|j| a.allows_ns(Capability::ListJobs, if j.namespace.is_empty() { "default" } else { &j.namespace }));
        }
        Ok(Response::new(r))
    }
    async fn get(&self, req: Request<GetJobRequest>) -> GrpcResult<GetJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.namespace, "job get", &req.job_id)?;
        let mut r = self.api.get_job(req).await?;
        if let Some(j) = r.job.as_mut() {
            if !self.api.acl.shows_env(authz.as_ref(), &j.namespace) {
                acl::redact_env(j);
                r.allocations.iter_mut().filter_map(|a| a.job.as_mut()).for_each(acl::redact_env);
            }
        }
        Ok(Response::new(r))
    }
    async fn versions(&self, req: Request<GetJobRequest>) -> GrpcResult<JobVersionsResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.namespace, "job versions", &req.job_id)?;
        let ns = req.namespace.clone();
        let mut r = self.api.job_versions(req).await?;
        if !self.api.acl.shows_env(authz.as_ref(), &ns) {
            r.versions.iter_mut().for_each(acl::redact_env);
        }
        Ok(Response::new(r))
    }
    async fn stop(&self, req: Request<StopJobRequest>) -> GrpcResult<StopJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job stop", &req.job_id)?;
        Ok(Response::new(self.api.stop_job(req).await?))
    }
    // ---- job types (issue 16 §2) ----
    async fn dispatch(&self, req: Request<DispatchJobRequest>) -> GrpcResult<DispatchJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job dispatch", &req.job_id)?;
        Ok(Response::new(self.api.dispatch_job(req).await?))
    }
    async fn periodic_force(&self, req: Request<PeriodicForceRequest>) -> GrpcResult<PeriodicForceResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job periodic force", &req.job_id)?;
        Ok(Response::new(self.api.periodic_force(req).await?))
    }
    async fn children(&self, req: Request<JobChildrenRequest>) -> GrpcResult<JobChildrenResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.namespace, "job children", &req.job_id)?;
        Ok(Response::new(self.api.job_children(req).await?))
    }
    async fn revert(&self, req: Request<RevertJobRequest>) -> GrpcResult<RegisterJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job revert", &req.job_id)?;
        Ok(Response::new(self.api.revert_job(req).await?))
    }
    async fn scale(&self, req: Request<ScaleJobRequest>) -> GrpcResult<RegisterJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job scale", &req.job_id)?;
        Ok(Response::new(self.api.scale_job(req).await?))
    }
    async fn restart(&self, req: Request<RestartJobRequest>) -> GrpcResult<RegisterJobResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::SubmitJob, &req.namespace, "job restart", &req.job_id)?;
        Ok(Response::new(self.api.restart_job(req).await?))
    }
}

impl GrpcApi {
    /// The namespace of a deployment a request names, checked against the token.
    fn deployment_ns(&self, authz: Option<&Authz>, cap: Capability, id: &str, op: &str) -> Result<(), acl::guard::Denied> {
        let ns = {
            let st = self.api.state.read();
            crate::deploy::find(&st, id).map(|d| d.namespace.clone()).unwrap_or_else(|_| "default".to_string())
        };
        self.api.acl.require_ns(authz, cap, &ns, op, id)
    }
}

#[tonic::async_trait]
impl deployment_service_server::DeploymentService for GrpcApi {
    async fn list(&self, req: Request<ListDeploymentsRequest>) -> GrpcResult<ListDeploymentsResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        if !req.namespace.is_empty() {
            self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.namespace, "deployment list", "")?;
        }
        let mut r = self.api.list_deployments(req).await?;
        if let Some(a) = &authz {
            r.deployments.retain(|d| a.allows_ns(Capability::ReadJob, &d.namespace));
        }
        Ok(Response::new(r))
    }
    async fn get(&self, req: Request<GetDeploymentRequest>) -> GrpcResult<GetDeploymentResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.deployment_ns(authz.as_ref(), Capability::ReadJob, &req.deployment_id, "deployment status")?;
        Ok(Response::new(self.api.get_deployment(&req.deployment_id).await?))
    }
    async fn promote(&self, req: Request<DeploymentPromoteRequest>) -> GrpcResult<DeploymentUpdateResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.deployment_ns(authz.as_ref(), Capability::SubmitJob, &req.deployment_id, "deployment promote")?;
        Ok(Response::new(self.api.promote_deployment(req).await?))
    }
    async fn pause(&self, req: Request<DeploymentPauseRequest>) -> GrpcResult<DeploymentUpdateResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.deployment_ns(authz.as_ref(), Capability::SubmitJob, &req.deployment_id, "deployment pause")?;
        Ok(Response::new(self.api.pause_deployment(req).await?))
    }
    async fn fail(&self, req: Request<DeploymentFailRequest>) -> GrpcResult<DeploymentUpdateResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.deployment_ns(authz.as_ref(), Capability::SubmitJob, &req.deployment_id, "deployment fail")?;
        Ok(Response::new(self.api.fail_deployment(req).await?))
    }
    async fn set_alloc_health(&self, req: Request<DeploymentAllocHealthRequest>) -> GrpcResult<DeploymentUpdateResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.deployment_ns(authz.as_ref(), Capability::SubmitJob, &req.deployment_id, "deployment alloc-health")?;
        Ok(Response::new(self.api.set_alloc_health(req).await?))
    }
}

/// The token the ACL guard resolved for this request (none: ACLs off).
fn authz_of<T>(req: &Request<T>) -> Option<Authz> {
    req.extensions().get::<Authz>().cloned()
}

/// An allocation as a token may see it: refused without `cap` in its namespace, its job's env
/// redacted without `read-job-env`.
fn alloc_for(api: &Api, authz: Option<&Authz>, cap: Capability, mut a: Allocation, op: &str) -> Result<Allocation, acl::guard::Denied> {
    api.acl.require_ns(authz, cap, &a.namespace, op, &a.id)?;
    if !api.acl.shows_env(authz, &a.namespace) {
        if let Some(j) = a.job.as_mut() {
            acl::redact_env(j);
        }
    }
    Ok(a)
}

#[tonic::async_trait]
impl alloc_service_server::AllocService for GrpcApi {
    async fn list(&self, req: Request<ListAllocsRequest>) -> GrpcResult<ListAllocsResponse> {
        self.count();
        let authz = authz_of(&req);
        let mut r = self.api.list_allocs(req.into_inner()).await?;
        if let Some(a) = &authz {
            // Only the allocations of namespaces the token may read.
            r.allocations.retain(|x| a.allows_ns(Capability::ReadJob, if x.namespace.is_empty() { "default" } else { &x.namespace }));
            for x in &mut r.allocations {
                if !self.api.acl.shows_env(Some(a), &x.namespace) {
                    if let Some(j) = x.job.as_mut() {
                        acl::redact_env(j);
                    }
                }
            }
        }
        Ok(Response::new(r))
    }
    async fn get(&self, req: Request<GetAllocRequest>) -> GrpcResult<GetAllocResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        let (a, index) = self.api.get_alloc(&req.alloc_id, Block { min_index: req.min_index, wait_ms: req.wait_ms }).await?;
        let a = alloc_for(&self.api, authz.as_ref(), Capability::ReadJob, a, "alloc get")?;
        Ok(Response::new(GetAllocResponse { allocation: Some(a), index }))
    }

    type LogsStream = BoxStream<LogChunk>;

    /// Proxies to the agent that runs the allocation.
    async fn logs(&self, req: Request<LogsRequest>) -> GrpcResult<Self::LogsStream> {
        self.count();
        let authz = authz_of(&req);
        let mut req = req.into_inner();
        let (alloc, _) = self.api.get_alloc(&req.alloc_id, Block::default()).await?;
        let alloc = alloc_for(&self.api, authz.as_ref(), Capability::ReadLogs, alloc, "alloc logs")?;
        let addr = {
            let st = self.api.state.read();
            st.nodes.get(&alloc.node_id).map(|n| n.rpc_addr.clone()).unwrap_or_default()
        };
        if addr.is_empty() {
            return Err(Status::unavailable(format!("node {} of allocation {} has no agent address", alloc.node_id, alloc.id)));
        }
        req.alloc_id = alloc.id;
        let mut client = self.agent_at(&addr).await?;
        let mut upstream = client.logs(req).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                match upstream.message().await {
                    Ok(Some(chunk)) => {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = BoxStream<ExecResponse>;

    /// `mlp alloc exec`: checks the allocation here (it exists and runs), then proxies the
    /// session both ways to the agent that runs it (`ClientService.Exec`). When the client goes
    /// away the upstream call is dropped, which ends the session on the agent.
    async fn exec(&self, req: Request<tonic::Streaming<ExecRequest>>) -> GrpcResult<Self::ExecStream> {
        self.count();
        let authz = authz_of(&req);
        let mut inbound = req.into_inner();
        let mut first =
            inbound.message().await?.ok_or_else(|| Status::invalid_argument("exec: the stream ended before its first message"))?;
        let start = first.start.as_mut().ok_or_else(|| Status::invalid_argument("exec: the first message must carry `start`"))?;
        if start.command.is_empty() {
            return Err(Status::invalid_argument("exec: start.command is empty: name a command to run"));
        }
        let (alloc, _) = self.api.get_alloc(&start.alloc_id, Block::default()).await?;
        let alloc = alloc_for(&self.api, authz.as_ref(), Capability::AllocExec, alloc, "alloc exec")?;
        // A task of an unisolated driver runs as the agent's user on the host: exec into it
        // also needs alloc-node-exec.
        let unisolated = {
            let st = self.api.state.read();
            let job = alloc.job.as_ref().or_else(|| st.jobs.get(&crate::state::job_key(&alloc.namespace, &alloc.job_id)));
            job.and_then(|j| j.groups.iter().find(|g| g.name == alloc.task_group))
                .map(|g| {
                    g.tasks
                        .iter()
                        .filter(|t| start.task.is_empty() || t.name == start.task)
                        .any(|t| t.driver == mlp_proto::consts::driver::RAW_EXEC)
                })
                .unwrap_or(false)
        };
        if unisolated {
            self.api.acl.require_ns(authz.as_ref(), Capability::AllocNodeExec, &alloc.namespace, "alloc exec", &alloc.id)?;
        }
        if let Some(a) = &authz {
            self.api.acl.record(
                "grpc",
                "alloc exec",
                &format!("{} {}", alloc.id, start.command.join(" ")),
                Some(a),
                "allowed",
                "alloc-exec",
            );
        }
        if alloc.client_status != mlp_proto::consts::alloc_client::RUNNING {
            return Err(Status::failed_precondition(format!(
                "allocation {} is {}, not running",
                alloc.id,
                if alloc.client_status.is_empty() { "not started" } else { alloc.client_status.as_str() }
            )));
        }
        start.alloc_id = alloc.id.clone();
        let mut client = self.agent_client(&alloc).await?;
        let (up_tx, up_rx) = tokio::sync::mpsc::channel::<ExecRequest>(16);
        let _ = up_tx.send(first).await;
        tokio::spawn(async move {
            // Forwards the client's stdin and resizes; ends (closing the upstream request
            // stream) when the client is done sending or gone.
            while let Ok(Some(m)) = inbound.message().await {
                if up_tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        let mut upstream = client.exec(ReceiverStream::new(up_rx)).await?.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    m = upstream.message() => m,
                    _ = tx.closed() => return,
                };
                let done = !matches!(item, Ok(Some(_)));
                let sent = match item {
                    Ok(Some(m)) => tx.send(Ok(m)).await,
                    Ok(None) => return,
                    Err(status) => tx.send(Err(status)).await,
                };
                if sent.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl GrpcApi {
    /// A `ClientService` client to the agent of the node that runs `alloc`.
    async fn agent_client(
        &self,
        alloc: &Allocation,
    ) -> Result<client_service_client::ClientServiceClient<tonic::transport::Channel>, Status> {
        let addr = {
            let st = self.api.state.read();
            st.nodes.get(&alloc.node_id).map(|n| n.rpc_addr.clone()).unwrap_or_default()
        };
        if addr.is_empty() {
            return Err(Status::unavailable(format!("node {} of allocation {} has no agent address", alloc.node_id, alloc.id)));
        }
        self.agent_at(&addr).await
    }

    /// A `ClientService` client to the agent at `addr`: over mutual TLS with this server's
    /// certificate when TLS is on (the agent's certificate must hold the agent role).
    async fn agent_at(&self, addr: &str) -> Result<client_service_client::ClientServiceClient<tonic::transport::Channel>, Status> {
        let tls = self.api.raft.peers.tls();
        let endpoint = tonic::transport::Endpoint::from_shared(mlp_tls::net::uri_for(addr, tls.is_some()))
            .map_err(|e| Status::internal(format!("bad agent address {addr:?}: {e}")))?;
        let channel = mlp_tls::net::channel(endpoint, tls, mlp_tls::Role::Agent)
            .await
            .map_err(|e| Status::unavailable(format!("agent at {addr} unreachable: {e}")))?;
        Ok(client_service_client::ClientServiceClient::new(channel))
    }
}

#[tonic::async_trait]
impl node_service_server::NodeService for GrpcApi {
    async fn list(&self, req: Request<ListNodesRequest>) -> GrpcResult<ListNodesResponse> {
        self.count();
        let req = req.into_inner();
        Ok(Response::new(self.api.list_nodes(Block { min_index: req.min_index, wait_ms: req.wait_ms }).await?))
    }
    async fn get(&self, req: Request<GetNodeRequest>) -> GrpcResult<GetNodeResponse> {
        self.count();
        let req = req.into_inner();
        Ok(Response::new(self.api.get_node(&req.node_id, Block { min_index: req.min_index, wait_ms: req.wait_ms }).await?))
    }
    async fn update_drain(&self, req: Request<NodeDrainRequest>) -> GrpcResult<NodeDrainResponse> {
        self.count();
        Ok(Response::new(self.api.update_drain(req.into_inner()).await?))
    }
    async fn update_eligibility(&self, req: Request<NodeEligibilityRequest>) -> GrpcResult<NodeEligibilityResponse> {
        self.count();
        Ok(Response::new(self.api.update_eligibility(req.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl eval_service_server::EvalService for GrpcApi {
    async fn list(&self, req: Request<ListEvalsRequest>) -> GrpcResult<ListEvalsResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        let mut r = self.api.list_evals(&req.job_id, Block { min_index: req.min_index, wait_ms: req.wait_ms }).await?;
        if let Some(a) = &authz {
            r.evaluations.retain(|e| a.allows_ns(Capability::ReadJob, if e.namespace.is_empty() { "default" } else { &e.namespace }));
        }
        Ok(Response::new(r))
    }
    async fn get(&self, req: Request<GetEvalRequest>) -> GrpcResult<GetEvalResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        let (e, index) = self.api.get_eval(&req.eval_id, Block { min_index: req.min_index, wait_ms: req.wait_ms }).await?;
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &e.namespace, "eval get", &e.id)?;
        Ok(Response::new(GetEvalResponse { evaluation: Some(e), index }))
    }
}

#[tonic::async_trait]
impl event_service_server::EventService for GrpcApi {
    type EventsStream = BoxStream<EventBatch>;

    /// Batches of matching events as entries are applied, with an empty batch (index 0) as a
    /// heartbeat every `EVENT_HEARTBEAT`. Ends with an error status when the subscriber falls
    /// behind, the state is replaced, or the server stops.
    async fn events(&self, req: Request<EventsRequest>) -> GrpcResult<Self::EventsStream> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        let ns = if req.namespace.is_empty() { "*" } else { req.namespace.as_str() };
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, ns, "event stream", "")?;
        let sub = self.api.subscribe_events(&req).map_err(event_status)?;
        #[allow(clippy::result_large_err)] // tonic's stream item type
        let rx = Api::pump_events(self.api.clone(), sub, move |item| {
            let mut item = stream_item(item);
            if let (Ok(batch), Some(a)) = (item.as_mut(), authz.as_ref()) {
                acl::redact_batch(batch, a);
            }
            item
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One message of the `Events` stream (tonic's item type, `Status` and all).
#[allow(clippy::result_large_err)]
fn stream_item(item: Result<EventBatch, EventError>) -> Result<EventBatch, Status> {
    item.map_err(event_status)
}

/// The gRPC status for an event stream error.
pub fn event_status(e: EventError) -> Status {
    let msg = e.to_string();
    match e {
        EventError::Gone { .. } => Status::out_of_range(msg),
        EventError::Lagged { .. } => Status::resource_exhausted(msg),
        EventError::Reset { .. } => Status::aborted(msg),
        EventError::Closed => Status::unavailable(msg),
        EventError::Invalid(_) => Status::invalid_argument(msg),
    }
}

#[tonic::async_trait]
impl status_service_server::StatusService for GrpcApi {
    async fn leader(&self, _req: Request<LeaderRequest>) -> GrpcResult<LeaderResponse> {
        self.count();
        Ok(Response::new(self.api.leader()))
    }
}

#[tonic::async_trait]
impl system_service_server::SystemService for GrpcApi {
    async fn garbage_collect(&self, _req: Request<SystemGcRequest>) -> GrpcResult<SystemGcResponse> {
        self.count();
        Ok(Response::new(self.api.system_gc().await?))
    }
}

/// The node secret an agent RPC carries (`x-mlp-node-secret`), if any.
fn node_secret<T>(req: &Request<T>) -> Option<String> {
    req.metadata().get(mlp_tls::secret::METADATA_KEY).and_then(|v| v.to_str().ok()).map(str::to_string)
}

impl GrpcApi {
    /// Every agent RPC but `Register` acts for one node: only the agent holding the node's
    /// secret may make it (issue 15 §3). With TLS, the authorization layer has already checked
    /// that the caller holds an agent certificate.
    #[allow(clippy::result_large_err)] // the RPC's own status
    fn authenticate<T>(&self, req: &Request<T>, node_id: &str) -> Result<(), Status> {
        self.api.authenticate_node(node_id, node_secret(req).as_deref()).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl agent_service_server::AgentService for GrpcApi {
    async fn register(&self, req: Request<RegisterNodeRequest>) -> GrpcResult<RegisterNodeResponse> {
        let secret = node_secret(&req);
        Ok(Response::new(self.api.register_node_as(req.into_inner().node, secret.as_deref()).await?))
    }
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> GrpcResult<HeartbeatResponse> {
        self.authenticate(&req, &req.get_ref().node_id)?;
        let req = req.into_inner();
        Ok(Response::new(self.api.heartbeat_with(&req.node_id, req.gpu_stats).await?))
    }

    type WatchAllocationsStream = BoxStream<NodeAllocations>;

    /// Sends the node's full allocation set now, then after every change that touches it the
    /// allocations that changed (the full set again when some may have gone, or a notification
    /// was missed).
    async fn watch_allocations(&self, req: Request<WatchAllocationsRequest>) -> GrpcResult<Self::WatchAllocationsStream> {
        // Only the node's own agent receives its allocations (job specs, env included).
        self.authenticate(&req, &req.get_ref().node_id)?;
        let node_id = req.into_inner().node_id;
        let mut changes = self.api.state.node_changes();
        let api = self.api.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // The full set first, then only what changed since the previous message (a missed
            // notification, `Lagged`, falls back to the full set).
            let first = api.node_allocations(&node_id);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let msg = match changes.recv().await {
                    // The node's set may have lost allocations (garbage collection, a restore):
                    // only the full set tells the agent to let go of them.
                    Ok(c) if c.resend.contains(&node_id) => api.node_allocations(&node_id),
                    Ok(c) => match c.changed.get(&node_id) {
                        Some(ids) => api.node_allocations_changed(&node_id, ids),
                        None => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => api.node_allocations(&node_id),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if msg.partial && msg.allocations.is_empty() {
                    continue;
                }
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn update_allocs(&self, req: Request<UpdateAllocsRequest>) -> GrpcResult<UpdateAllocsResponse> {
        self.authenticate(&req, &req.get_ref().node_id)?;
        Ok(Response::new(self.api.update_allocs(req.into_inner()).await?))
    }

    async fn update_services(&self, req: Request<UpdateServicesRequest>) -> GrpcResult<UpdateServicesResponse> {
        self.authenticate(&req, &req.get_ref().node_id)?;
        Ok(Response::new(self.api.update_services(req.into_inner()).await?))
    }

    type WatchServicesStream = BoxStream<ServiceInstances>;

    /// Every passing service instance of the cluster now and after every change (the agents'
    /// DNS responders answer from it).
    async fn watch_services(&self, req: Request<WatchServicesRequest>) -> GrpcResult<Self::WatchServicesStream> {
        self.authenticate(&req, &req.get_ref().node_id)?;
        let mut rx = Api::watch_services(self.api.clone());
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let item = match item {
                    Ok(m) => Ok(m),
                    Err(e) => Err(Status::from(e)),
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type WatchOverlayStream = BoxStream<OverlayPeers>;

    /// The node's overlay peers: the whole set first, then again whenever it changes (node
    /// registrations, status changes and removals are rare, so a whole set is cheap).
    async fn watch_overlay(&self, req: Request<WatchOverlayRequest>) -> GrpcResult<Self::WatchOverlayStream> {
        self.authenticate(&req, &req.get_ref().node_id)?;
        let node_id = req.into_inner().node_id;
        let mut changes = self.api.state.node_changes();
        let api = self.api.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = api.overlay_peers(&node_id);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                match changes.recv().await {
                    Ok(c) if !c.nodes && c.resend.is_empty() => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                let next = api.overlay_peers(&node_id);
                if next.peers == last.peers {
                    continue;
                }
                last = next;
                if tx.send(Ok(last.clone())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl service_service_server::ServiceService for GrpcApi {
    async fn list(&self, req: Request<ListServicesRequest>) -> GrpcResult<ListServicesResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        let ns = if req.namespace.is_empty() { "*" } else { req.namespace.as_str() };
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, ns, "service list", "")?;
        Ok(Response::new(self.api.list_services(req).await?))
    }
    async fn get(&self, req: Request<GetServiceRequest>) -> GrpcResult<GetServiceResponse> {
        self.count();
        let authz = authz_of(&req);
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.namespace, "service get", &req.name)?;
        Ok(Response::new(self.api.get_service(req).await?))
    }
}
