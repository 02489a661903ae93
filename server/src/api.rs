//! The API's logic, shared by the gRPC services (the API of record) and the HTTP JSON mirror:
//! validation, reads (linearizable unless `stale`), and writes through Raft.

use std::collections::BTreeSet;
use std::sync::Arc;

use mlp_proto::consts::{alloc_client, eval_status, eval_trigger, node_status};
use mlp_proto::jobspec;
use mlp_proto::v1::*;

use crate::events;
use crate::leader::{now_ms, HeartbeatSettings, Heartbeats};
use crate::metrics::{Metrics, RaftFigures};
use crate::raft::node::{RaftNode, WriteError};
use crate::scheduler;
use crate::state::{job_key, Command, LookupError, Request, StateHandle};

/// An API failure, mapped to a gRPC status or an HTTP status by the transports.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("not the leader; leader is {}", .0.as_deref().unwrap_or("unknown"))]
    NotLeader(Option<String>),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The caller may not do this: refused by ACLs (issue 15 §2) or a node secret missing or
    /// wrong (§3). gRPC `PermissionDenied`, HTTP 403.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<crate::acl::guard::Denied> for ApiError {
    fn from(d: crate::acl::guard::Denied) -> Self {
        ApiError::PermissionDenied(d.to_string())
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotLeader { leader_addr } => ApiError::NotLeader(leader_addr),
            WriteError::Rejected(msg) => ApiError::InvalidArgument(msg),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            LookupError::Ambiguous { .. } => ApiError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            ApiError::NotFound(m) => tonic::Status::not_found(m.clone()),
            ApiError::NotLeader(_) => tonic::Status::unavailable(e.to_string()),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            ApiError::Internal(m) => tonic::Status::internal(m.clone()),
            ApiError::PermissionDenied(m) => tonic::Status::permission_denied(m.clone()),
        }
    }
}

/// A blocking query's wait (Nomad's `index` and `wait`): with `min_index` > 0, a read waits
/// until an entry after it changed what the read covers, or `wait_ms` passes (0: the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Block {
    pub min_index: u64,
    pub wait_ms: u64,
}

/// How long a blocking query waits when it names no wait (Nomad's default).
pub const DEFAULT_BLOCK_WAIT_MS: u64 = 5 * 60 * 1000;
/// The longest wait a blocking query may ask for.
pub const MAX_BLOCK_WAIT_MS: u64 = 10 * 60 * 1000;

/// Everything the handlers need.
pub struct Api {
    pub raft: Arc<RaftNode>,
    pub state: Arc<StateHandle>,
    pub metrics: Arc<Metrics>,
    pub heartbeats: Arc<Heartbeats>,
    pub heartbeat: HeartbeatSettings,
    /// Where node subnets are leased from; `None`: the overlay is off (issue 13 §2).
    pub overlay: Option<crate::state::OverlayPool>,
    /// This server's MLflow tracking URI, told to registering agents for their tasks
    /// (issue 17 §3); see [`tracking_uri`].
    pub tracking_uri: String,
    /// ACL checks, env redaction and the audit log (issue 15 §2); off by default.
    pub acl: Arc<crate::acl::Guard>,
}

/// The MLflow tracking URI tasks reach this server at: `scheme://` (`https` when the HTTP API
/// is served over TLS) and its HTTP address, with the host of its advertised gRPC address when
/// the HTTP listener is bound to every address (`0.0.0.0`, `::`), which a task cannot dial.
pub fn tracking_uri(scheme: &str, http_addr: std::net::SocketAddr, advertise: &str) -> String {
    if !http_addr.ip().is_unspecified() {
        return format!("{scheme}://{http_addr}");
    }
    let host = advertise.rsplit_once(':').map_or(advertise, |(h, _)| h);
    let unspecified = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    let host = if host.is_empty() || unspecified { "127.0.0.1" } else { host };
    format!("{scheme}://{host}:{}", http_addr.port())
}

/// GPU measurements a heartbeat may carry: at most one per device a node may register, ids
/// like device ids.
fn check_gpu_stats(stats: &[mlp_proto::v1::GpuStats]) -> Result<(), ApiError> {
    if stats.len() > mlp_proto::gpu::MAX_GPU_DEVICES {
        return Err(ApiError::InvalidArgument(format!("gpu_stats: {} entries; at most {}", stats.len(), mlp_proto::gpu::MAX_GPU_DEVICES)));
    }
    for (i, g) in stats.iter().enumerate() {
        if g.id.is_empty() || g.id.len() > 256 || g.id.chars().any(char::is_control) {
            return Err(ApiError::InvalidArgument(format!("gpu_stats[{i}].id: must be 1 to 256 bytes without control characters")));
        }
        if g.utilization_percent > 100 {
            return Err(ApiError::InvalidArgument(format!("gpu_stats[{i}].utilization_percent: {} is above 100", g.utilization_percent)));
        }
    }
    Ok(())
}

pub(crate) fn default_namespace(ns: &str) -> &str {
    if ns.is_empty() {
        "default"
    } else {
        ns
    }
}

/// Plans computed at once by `plan_job`; more wait for a slot (within their deadline).
const PLAN_CONCURRENCY: usize = 2;
static PLAN_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PLAN_CONCURRENCY);
/// How long `plan_job` may take, waiting for a slot included.
pub const PLAN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The longest drain deadline accepted.
pub const MAX_DRAIN_DEADLINE_MS: u64 = 30 * 24 * 3_600_000;

/// Entries in a node's `attributes` or `meta`.
pub const MAX_NODE_MAP_ENTRIES: usize = 1_000;
/// Names, keys, addresses, drivers of a node.
pub const MAX_NODE_KEY_BYTES: usize = 256;
/// A node attribute's or meta entry's value.
pub const MAX_NODE_VALUE_BYTES: usize = 4096;
/// Drivers one node may report.
pub const MAX_NODE_DRIVERS: usize = 32;

/// Bounds on what an agent registers: every field ends up in the replicated state and in every
/// scheduling pass.
fn check_node_shape(node: &Node) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::InvalidArgument(m));
    for (field, value) in
        [("name", &node.name), ("datacenter", &node.datacenter), ("node_pool", &node.node_pool), ("rpc_addr", &node.rpc_addr)]
    {
        if value.len() > MAX_NODE_KEY_BYTES || value.chars().any(char::is_control) {
            return bad(format!("node.{field}: at most {MAX_NODE_KEY_BYTES} bytes without control characters (limit: node field length)"));
        }
    }
    for (field, map) in [("attributes", &node.attributes), ("meta", &node.meta)] {
        if map.len() > MAX_NODE_MAP_ENTRIES {
            return bad(format!("node.{field}: at most {MAX_NODE_MAP_ENTRIES} entries, found {} (limit: node {field})", map.len()));
        }
        if let Some((k, _)) = map.iter().find(|(k, v)| k.is_empty() || k.len() > MAX_NODE_KEY_BYTES || v.len() > MAX_NODE_VALUE_BYTES) {
            let k: String = k.chars().take(64).collect();
            return bad(format!(
                "node.{field}.{k}: keys are 1-{MAX_NODE_KEY_BYTES} bytes and values at most {MAX_NODE_VALUE_BYTES} (limit: node {field} size)"
            ));
        }
    }
    if node.drivers.len() > MAX_NODE_DRIVERS || node.drivers.iter().any(|d| d.len() > MAX_NODE_KEY_BYTES) {
        return bad(format!(
            "node.drivers: at most {MAX_NODE_DRIVERS} drivers of at most {MAX_NODE_KEY_BYTES} bytes (limit: node drivers)"
        ));
    }
    Ok(())
}

/// An id that must be present and sane before it is used as a key.
pub(crate) fn require_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{what} is required")));
    }
    if id.len() > 256 || id.chars().any(|c| c.is_control()) {
        return Err(ApiError::InvalidArgument(format!("{what} {id:?} is not a valid id")));
    }
    Ok(())
}

impl Api {
    pub(crate) async fn read_barrier(&self, stale: bool) -> Result<(), ApiError> {
        if stale {
            return Ok(());
        }
        self.raft.linearizable_read().await.map_err(ApiError::from)
    }

    pub fn raft_figures(&self) -> RaftFigures {
        let m = self.raft.metrics();
        RaftFigures { is_leader: self.raft.is_leader(), term: m.term, commit_index: m.commit_index, applied_index: m.applied_index }
    }

    /// The job `namespace/job_id` as the state has it now, or NotFound.
    pub(crate) fn current_job(&self, namespace: &str, job_id: &str) -> Result<Job, ApiError> {
        self.state
            .read()
            .job(namespace, job_id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("job {job_id:?} not found in namespace {namespace:?}")))
    }

    pub(crate) fn new_eval(job: &Job, trigger: &str) -> Evaluation {
        Evaluation {
            id: uuid::Uuid::new_v4().to_string(),
            namespace: job.namespace.clone(),
            job_id: job.id.clone(),
            priority: job.priority,
            r#type: job.r#type.clone(),
            triggered_by: trigger.to_string(),
            status: eval_status::PENDING.to_string(),
            ..Default::default()
        }
    }

    /// Validates a submitted job and fills what the servers own.
    pub(crate) fn prepare_job(job: Option<Job>) -> Result<Job, ApiError> {
        let mut job = job.ok_or_else(|| ApiError::InvalidArgument("job is required".into()))?;
        jobspec::apply_defaults(&mut job);
        if job.id.is_empty() {
            job.id = job.name.clone();
        }
        if job.name.is_empty() {
            job.name = job.id.clone();
        }
        jobspec::validate_job(&job).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if !job.parent_id.is_empty() || !job.payload.is_empty() {
            return Err(ApiError::InvalidArgument(
                "job.parent_id and job.payload are set by the servers on dispatched and periodic children; dispatch with `mlp job dispatch`".into(),
            ));
        }
        if job.id != job.name {
            return Err(ApiError::InvalidArgument(format!("job.id {:?} must equal job.name {:?}", job.id, job.name)));
        }
        job.version = 0;
        job.status = String::new();
        job.stop = false;
        job.create_index = 0;
        job.modify_index = 0;
        job.job_modify_index = 0;
        job.submit_time_ms = 0;
        job.stable = false;
        job.revert_of = None;
        Ok(job)
    }

    pub async fn register_job(&self, job: Option<Job>) -> Result<RegisterJobResponse, ApiError> {
        self.register_job_once(job, "").await
    }

    /// [`Self::register_job`] with the client's `request_id` (a UUID, or empty for none): it
    /// becomes the evaluation's id, and the state machine applies a registration whose
    /// evaluation already exists as a no-op, so a client's retry of the same request is applied
    /// at most once (like the servers' own forwarding retries, which resend the same entry).
    pub async fn register_job_once(&self, job: Option<Job>, request_id: &str) -> Result<RegisterJobResponse, ApiError> {
        let job = Self::prepare_job(job)?;
        let mut eval = Self::new_eval(&job, eval_trigger::JOB_REGISTER);
        if !request_id.is_empty() {
            let id = uuid::Uuid::parse_str(request_id)
                .map_err(|_| ApiError::InvalidArgument(format!("request_id must be a UUID, found {request_id:?}")))?;
            eval.id = id.hyphenated().to_string();
        }
        let eval_id = eval.id.clone();
        let resp = self.raft.submit(Request { now_ms: now_ms(), command: Command::RegisterJobInNamespace { job, eval } }).await?;
        Metrics::inc(&self.metrics.job_registrations);
        Ok(RegisterJobResponse { eval_id, job_version: resp.job_version.unwrap_or(0), index: resp.index })
    }

    /// What registering `job` would do, computed by the real scheduler on the current state.
    ///
    /// The scheduler runs on a blocking thread, at most [`PLAN_CONCURRENCY`] at a time, and the
    /// caller gets an error after [`PLAN_DEADLINE`] (the job limits bound the work, so the thread
    /// ends soon after); a panic in the scheduler fails this request, not the server.
    pub async fn plan_job(&self, job: Option<Job>) -> Result<PlanJobResponse, ApiError> {
        let job = Self::prepare_job(job)?;
        self.read_barrier(false).await?;
        let work = async {
            let _slot = PLAN_SLOTS.acquire().await.map_err(|e| ApiError::Internal(e.to_string()))?;
            let state = self.state.clone();
            tokio::task::spawn_blocking(move || Self::plan_on(&state, job)).await.map_err(|e| {
                let why = if e.is_panic() { crate::leader::panic_message(e.into_panic().as_ref()) } else { e.to_string() };
                tracing::error!(error = %why, "the scheduler failed while planning a job");
                ApiError::Internal(format!("the scheduler failed on this job: {why}"))
            })?
        };
        tokio::time::timeout(PLAN_DEADLINE, work)
            .await
            .map_err(|_| ApiError::Unavailable(format!("planning took longer than {}s; try again later", PLAN_DEADLINE.as_secs())))?
    }

    fn plan_on(state: &StateHandle, mut job: Job) -> Result<PlanJobResponse, ApiError> {
        let st = state.read();
        let existing = st.job(&job.namespace, &job.id).cloned();
        let diff_type = match &existing {
            None => "added",
            Some(prev) if !prev.stop && crate::state::same_spec(prev, &job) => "none",
            Some(_) => "edited",
        };
        if let Some(prev) = &existing {
            job.version = if diff_type == "none" { prev.version } else { prev.version + 1 };
        }
        let eval = Self::new_eval(&job, eval_trigger::JOB_REGISTER);
        let plan = scheduler::schedule(&st, Some(&job), &eval, now_ms());
        let placements = plan
            .placements
            .iter()
            .map(|a| PlannedPlacement {
                task_group: a.task_group.clone(),
                alloc_name: a.name.clone(),
                node_id: a.node_id.clone(),
                node_name: st.nodes.get(&a.node_id).map(|n| n.name.clone()).unwrap_or_default(),
                preference: plan.preferences.get(&a.id).copied(),
            })
            .collect();
        Ok(PlanJobResponse {
            placements,
            stops: plan.stops.iter().map(|s| s.alloc_id.clone()).collect(),
            failed_tg_allocs: plan.failed_tg_allocs,
            job_exists: existing.is_some(),
            current_version: existing.map(|j| j.version).unwrap_or(0),
            diff_type: diff_type.to_string(),
        })
    }

    /// A blocking query's wait: returns once an entry after `b.min_index` produced an event
    /// matching `topics` (topic, key; key "" for all) in `namespace` ("" for all), or the wait
    /// ran out. Returns at once without a `min_index`, or when the events since it are no longer
    /// buffered (something may have changed: the caller reads and answers).
    pub(crate) async fn block(&self, b: Block, topics: &[(&str, &str)], namespace: &str) -> Result<(), ApiError> {
        if b.min_index == 0 {
            return Ok(());
        }
        if b.wait_ms > MAX_BLOCK_WAIT_MS {
            return Err(ApiError::InvalidArgument(format!("wait is {} ms, at most {MAX_BLOCK_WAIT_MS} (10 minutes)", b.wait_ms)));
        }
        let wait = std::time::Duration::from_millis(if b.wait_ms == 0 { DEFAULT_BLOCK_WAIT_MS } else { b.wait_ms });
        let topics: Vec<EventTopic> = topics.iter().map(|(t, k)| EventTopic { topic: t.to_string(), key: k.to_string() }).collect();
        let filter = events::Filter::new(&topics, namespace).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let Ok(mut sub) = self.state.events().subscribe(b.min_index, filter) else { return Ok(()) };
        Metrics::inc(&self.metrics.blocking_queries);
        // A match, a timeout, a reset or being cut off all end the wait the same way: read now.
        let _ = tokio::time::timeout(wait, sub.next()).await;
        Ok(())
    }

    /// Feeds a subscription to a client: its batches, an empty batch as a heartbeat every
    /// `events::HEARTBEAT`, and the error that ends it, each made a message by `encode`, into a
    /// small channel whose other end is the client's stream. Ends after an error, when the client
    /// is gone, or when it has taken nothing for `events::SEND_TIMEOUT` (cut off, like one that
    /// falls behind: the state machine never waits for it either way).
    pub fn pump_events<T: Send + 'static>(
        api: Arc<Api>,
        mut sub: events::Subscription,
        encode: impl Fn(Result<EventBatch, events::EventError>) -> T + Send + 'static,
    ) -> tokio::sync::mpsc::Receiver<T> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(events::HEARTBEAT);
            heartbeat.tick().await;
            loop {
                let item = tokio::select! {
                    b = sub.next() => b,
                    _ = heartbeat.tick() => Ok(EventBatch::default()),
                    _ = tx.closed() => return,
                };
                let end = item.is_err();
                if matches!(item, Err(events::EventError::Lagged { .. })) {
                    Metrics::inc(&api.metrics.event_subscribers_cut);
                }
                match tokio::time::timeout(events::SEND_TIMEOUT, tx.send(encode(item))).await {
                    Ok(Ok(())) if !end => {}
                    Ok(_) => return,
                    Err(_) => {
                        Metrics::inc(&api.metrics.event_subscribers_cut);
                        return;
                    }
                }
            }
        });
        rx
    }

    /// Opens an event stream subscription (validated: topics, namespace, index).
    pub fn subscribe_events(&self, req: &EventsRequest) -> Result<events::Subscription, events::EventError> {
        if req.namespace.len() > 256 {
            return Err(events::EventError::Invalid(format!("namespace is {} bytes, at most 256", req.namespace.len())));
        }
        let filter = events::Filter::from_request(req)?;
        let sub = self.state.events().subscribe(req.index, filter)?;
        Metrics::inc(&self.metrics.event_subscriptions);
        Ok(sub)
    }

    pub async fn list_jobs(&self, req: ListJobsRequest) -> Result<ListJobsResponse, ApiError> {
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        self.block(b, &[(events::TOPIC_JOB, ""), (events::TOPIC_ALLOCATION, "")], &req.namespace).await?;
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        let jobs = st
            .jobs
            .values()
            .filter(|j| req.namespace.is_empty() || j.namespace == req.namespace)
            .map(|j| crate::jobtypes::summary(&st, j))
            .collect();
        Ok(ListJobsResponse { jobs, index: st.index })
    }

    pub async fn get_job(&self, req: GetJobRequest) -> Result<GetJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        let id = req.job_id.as_str();
        let topics = [(events::TOPIC_JOB, id), (events::TOPIC_ALLOCATION, id), (events::TOPIC_EVALUATION, id)];
        self.block(b, &topics, default_namespace(&req.namespace)).await?;
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        let ns = default_namespace(&req.namespace);
        let mut job = st
            .job(ns, &req.job_id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("job {:?} not found in namespace {ns:?}", req.job_id)))?;
        mlp_proto::redact::job(&mut job);
        let mut allocations: Vec<Allocation> = st.allocs_for_job(ns, &req.job_id).cloned().collect();
        allocations.iter_mut().for_each(mlp_proto::redact::alloc);
        allocations.sort_by_key(|a| (a.create_index, a.index));
        let mut evaluations: Vec<Evaluation> = st.evals_for_job(ns, &req.job_id).cloned().collect();
        evaluations.sort_by_key(|e| e.create_index);
        let latest_deployment = crate::deploy::latest(&st, ns, &req.job_id).cloned();
        Ok(GetJobResponse { job: Some(job), allocations, evaluations, index: st.index, latest_deployment })
    }

    pub async fn job_versions(&self, req: GetJobRequest) -> Result<JobVersionsResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        self.block(b, &[(events::TOPIC_JOB, req.job_id.as_str())], default_namespace(&req.namespace)).await?;
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        let ns = default_namespace(&req.namespace);
        let versions = st
            .job_versions
            .get(&job_key(ns, &req.job_id))
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("job {:?} not found in namespace {ns:?}", req.job_id)))?;
        let mut versions: Vec<Job> = versions.into_iter().rev().collect();
        versions.iter_mut().for_each(mlp_proto::redact::job);
        Ok(JobVersionsResponse { versions })
    }

    pub async fn stop_job(&self, req: StopJobRequest) -> Result<StopJobResponse, ApiError> {
        require_id("job_id", &req.job_id)?;
        let ns = default_namespace(&req.namespace).to_string();
        self.read_barrier(false).await?;
        let job = {
            let st = self.state.read();
            st.job(&ns, &req.job_id)
                .cloned()
                .ok_or_else(|| ApiError::NotFound(format!("job {:?} not found in namespace {ns:?}", req.job_id)))?
        };
        let eval = Self::new_eval(&job, eval_trigger::JOB_DEREGISTER);
        let eval_id = eval.id.clone();
        let resp = self
            .raft
            .submit(Request { now_ms: now_ms(), command: Command::StopJob { namespace: ns, job_id: req.job_id, purge: req.purge, eval } })
            .await?;
        Metrics::inc(&self.metrics.job_stops);
        Ok(StopJobResponse { eval_id, index: resp.index })
    }

    pub async fn list_allocs(&self, req: ListAllocsRequest) -> Result<ListAllocsResponse, ApiError> {
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        let (key, ns) = if !req.job_id.is_empty() {
            (req.job_id.as_str(), default_namespace(&req.namespace))
        } else {
            (req.node_id.as_str(), req.namespace.as_str())
        };
        self.block(b, &[(events::TOPIC_ALLOCATION, key)], ns).await?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        let mut allocations: Vec<Allocation> = if !req.job_id.is_empty() {
            st.allocs_for_job(default_namespace(&req.namespace), &req.job_id).cloned().collect()
        } else if !req.node_id.is_empty() {
            st.allocs_for_node(&req.node_id).cloned().collect()
        } else {
            st.allocs.values().cloned().collect()
        };
        allocations.sort_by_key(|a| a.create_index);
        allocations.iter_mut().for_each(mlp_proto::redact::alloc);
        Ok(ListAllocsResponse { allocations, index: st.index })
    }

    /// An allocation and the state's index, read together (a blocking query's next `min_index`
    /// must not be newer than what it read).
    pub async fn get_alloc(&self, id: &str, b: Block) -> Result<(Allocation, u64), ApiError> {
        require_id("alloc_id", id)?;
        if b.min_index > 0 {
            let full = self.state.read().find_alloc(id).map(|a| a.id.clone()).unwrap_or_default();
            self.block(b, &[(events::TOPIC_ALLOCATION, full.as_str())], "").await?;
        }
        self.read_barrier(false).await?;
        let st = self.state.read();
        let mut a = st.find_alloc(id)?.clone();
        mlp_proto::redact::alloc(&mut a);
        if a.node_name.is_empty() {
            a.node_name = st.nodes.get(&a.node_id).map(|n| n.name.clone()).unwrap_or_default();
        }
        Ok((a, st.index))
    }

    pub async fn list_nodes(&self, b: Block) -> Result<ListNodesResponse, ApiError> {
        self.block(b, &[(events::TOPIC_NODE, "")], "").await?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        Ok(ListNodesResponse { nodes: st.nodes.values().cloned().collect(), index: st.index })
    }

    pub async fn get_node(&self, id: &str, b: Block) -> Result<GetNodeResponse, ApiError> {
        require_id("node_id", id)?;
        if b.min_index > 0 {
            let full = self.state.read().find_node(id).map(|n| n.id.clone()).unwrap_or_default();
            self.block(b, &[(events::TOPIC_NODE, full.as_str()), (events::TOPIC_ALLOCATION, full.as_str())], "").await?;
        }
        self.read_barrier(false).await?;
        let st = self.state.read();
        let node = st.find_node(id)?.clone();
        let allocations = st.allocs_for_node(&node.id).cloned().collect();
        let gpu_stats = self.heartbeats.gpu_stats(&node.id);
        Ok(GetNodeResponse { node: Some(node), allocations, index: st.index, gpu_stats })
    }

    /// Starts or cancels a node drain. Starting makes the node ineligible at once; the leader's
    /// drainer then moves its allocations (see `leader::drain_step`).
    pub async fn update_drain(&self, req: NodeDrainRequest) -> Result<NodeDrainResponse, ApiError> {
        require_id("node_id", &req.node_id)?;
        if req.deadline_ms > MAX_DRAIN_DEADLINE_MS {
            return Err(ApiError::InvalidArgument(format!(
                "deadline_ms must be at most {MAX_DRAIN_DEADLINE_MS} (30 days), found {}",
                req.deadline_ms
            )));
        }
        self.read_barrier(false).await?;
        let (node_id, draining) = {
            let st = self.state.read();
            let n = st.find_node(&req.node_id)?;
            (n.id.clone(), n.drain_strategy.is_some())
        };
        let now = now_ms();
        let command = if req.enable {
            let drain = DrainStrategy {
                deadline_ms: req.deadline_ms,
                force_deadline_ms: if req.deadline_ms > 0 { now + req.deadline_ms } else { 0 },
                started_at_ms: now,
                ignore_system: req.ignore_system,
            };
            let message = if req.deadline_ms > 0 {
                format!("drain started (deadline {}s)", req.deadline_ms / 1000)
            } else {
                "drain started (no deadline)".to_string()
            };
            Command::UpdateNodeDrain { node_id: node_id.clone(), drain: Some(drain), mark_eligible: false, message }
        } else {
            if !draining {
                return Err(ApiError::InvalidArgument(format!("node {node_id} is not draining")));
            }
            Command::UpdateNodeDrain { node_id: node_id.clone(), drain: None, mark_eligible: true, message: "drain cancelled".into() }
        };
        let resp = self.raft.submit(Request { now_ms: now, command }).await?;
        Ok(NodeDrainResponse { index: resp.index, node_id })
    }

    /// Marks a node eligible or ineligible for new placements (running work stays).
    pub async fn update_eligibility(&self, req: NodeEligibilityRequest) -> Result<NodeEligibilityResponse, ApiError> {
        require_id("node_id", &req.node_id)?;
        self.read_barrier(false).await?;
        let node_id = self.state.read().find_node(&req.node_id)?.id.clone();
        let resp = self
            .raft
            .submit(Request {
                now_ms: now_ms(),
                command: Command::UpdateNodeEligibility { node_id: node_id.clone(), eligible: req.eligible },
            })
            .await?;
        Ok(NodeEligibilityResponse { index: resp.index, node_id })
    }

    pub async fn list_evals(&self, job_id: &str, b: Block) -> Result<ListEvalsResponse, ApiError> {
        self.block(b, &[(events::TOPIC_EVALUATION, job_id)], "").await?;
        self.read_barrier(false).await?;
        let st = self.state.read();
        let mut evaluations: Vec<Evaluation> = st.evals.values().filter(|e| job_id.is_empty() || e.job_id == job_id).cloned().collect();
        evaluations.sort_by_key(|e| e.create_index);
        Ok(ListEvalsResponse { evaluations, index: st.index })
    }

    /// An evaluation and the state's index.
    pub async fn get_eval(&self, id: &str, b: Block) -> Result<(Evaluation, u64), ApiError> {
        require_id("eval_id", id)?;
        if b.min_index > 0 {
            let full = self.state.read().find_eval(id).map(|e| e.id.clone()).unwrap_or_default();
            self.block(b, &[(events::TOPIC_EVALUATION, full.as_str())], "").await?;
        }
        self.read_barrier(false).await?;
        let st = self.state.read();
        Ok((st.find_eval(id)?.clone(), st.index))
    }

    /// `mlp system gc`: collects now everything eligible, whatever its age, after a
    /// linearizable read (so that what this server computes from is current), and commits it
    /// through the leader.
    pub async fn system_gc(&self) -> Result<SystemGcResponse, ApiError> {
        self.read_barrier(false).await?;
        let (n, index) =
            crate::leader::gc::collect(&self.raft, &self.state, &self.metrics, &crate::leader::gc::GcThresholds::FORCE, true).await?;
        Ok(SystemGcResponse { evals: n.evals, allocs: n.allocs, jobs: n.jobs, nodes: n.nodes, index })
    }

    pub fn leader(&self) -> LeaderResponse {
        let m = self.raft.metrics();
        LeaderResponse {
            leader_addr: self.raft.leader_addr().unwrap_or_default(),
            leader_id: m.leader_id.unwrap_or(0),
            term: m.term,
            commit_index: m.commit_index,
            applied_index: m.applied_index,
        }
    }

    // ---- agent RPCs ----

    /// Registers a node as a fresh agent would (no node secret presented): claims a node id
    /// nobody holds, refuses one that an agent holds (see [`Api::register_node_as`]).
    pub async fn register_node(&self, node: Option<Node>) -> Result<RegisterNodeResponse, ApiError> {
        self.register_node_as(node, None).await
    }

    /// Checks that the caller presenting `secret` is the agent that holds `node_id` (issue 15
    /// §3): `NotFound` when the node is not registered (the agent registers), `PermissionDenied`
    /// when the secret is missing or wrong, or when the node has none yet (registered before node
    /// secrets existed: its agent registers again and is issued one).
    pub fn authenticate_node(&self, node_id: &str, secret: Option<&str>) -> Result<(), ApiError> {
        require_id("node_id", node_id)?;
        let st = self.state.read();
        if !st.nodes.contains_key(node_id) {
            return Err(ApiError::NotFound(format!("node {node_id:?} is not registered")));
        }
        match (st.node_secrets.get(node_id), secret) {
            (Some(stored), Some(s)) if mlp_tls::secret::verify(s, stored) => Ok(()),
            (Some(_), None) => Err(ApiError::PermissionDenied(format!(
                "node {node_id:?}: this request carries no node secret ({}); only the agent that registered the node may act for it",
                mlp_tls::secret::METADATA_KEY
            ))),
            (Some(_), Some(_)) => Err(ApiError::PermissionDenied(format!(
                "node {node_id:?}: wrong node secret ({}); only the agent that registered the node may act for it",
                mlp_tls::secret::METADATA_KEY
            ))),
            (None, _) => Err(ApiError::PermissionDenied(format!("node {node_id:?} has no node secret yet: register it again"))),
        }
    }

    /// Registers (or re-registers) a node. The first registration of a node id claims it with
    /// the secret it presents (`secret`, which the agent made and kept first), or, when it
    /// presents none, with a fresh one that the answer carries; only the hash is committed with
    /// the node. Later ones must present that secret, so a node id cannot be taken over.
    pub async fn register_node_as(&self, node: Option<Node>, secret: Option<&str>) -> Result<RegisterNodeResponse, ApiError> {
        let mut node = node.ok_or_else(|| ApiError::InvalidArgument("node is required".into()))?;
        require_id("node.id", &node.id)?;
        if node.name.is_empty() {
            return Err(ApiError::InvalidArgument("node.name is required".into()));
        }
        check_node_shape(&node)?;
        let res = node.resources.as_mut().ok_or_else(|| ApiError::InvalidArgument("node.resources is required".into()))?;
        if res.cpu_total_mhz == 0 || res.memory_mib == 0 {
            return Err(ApiError::InvalidArgument("node.resources must report cpu_total_mhz and memory_mib above 0".into()));
        }
        // GPUs: the shared check (also run by the agent); a negative NUMA node becomes unknown.
        mlp_proto::gpu::check_gpu_devices("node.resources.gpus", &mut res.gpus).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if node.datacenter.is_empty() {
            node.datacenter = "dc1".into();
        }
        if node.node_pool.is_empty() {
            node.node_pool = "default".into();
        }
        if let Some(o) = &node.overlay {
            if !o.vtep_addr.is_empty() && o.vtep_addr.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(ApiError::InvalidArgument(format!("node.overlay.vtep_addr: {:?} is not an IPv4 address", o.vtep_addr)));
            }
            if !o.subnet.is_empty() {
                crate::state::parse_subnet(&o.subnet).map_err(|e| ApiError::InvalidArgument(format!("node.overlay.subnet: {e}")))?;
            }
        }
        node.status = node_status::READY.to_string();
        node.status_description = "registered".into();
        let held = self.state.read().node_secrets.get(&node.id).cloned();
        let (secret_hash, new_secret) = match held {
            Some(_) => {
                self.authenticate_node(&node.id, secret).map_err(|e| match e {
                    ApiError::PermissionDenied(m) => ApiError::PermissionDenied(format!(
                        "{m}: node id {:?} is registered by another agent (an agent keeps its node id and secret in its data dir)",
                        node.id
                    )),
                    other => other,
                })?;
                (None, None)
            }
            // An agent makes its secret itself and keeps it on disk before it first registers,
            // so that dying right after this claim commits cannot leave it without the secret the
            // servers hold (its node id would be refused for good): the claim takes that secret.
            None => match secret {
                Some(s) if mlp_tls::secret::well_formed(s) => (Some(mlp_tls::secret::hash(s)), None),
                Some(_) => {
                    return Err(ApiError::InvalidArgument(format!(
                        "{}: not a node secret (64 hex digits expected)",
                        mlp_tls::secret::METADATA_KEY
                    )))
                }
                // An agent that brings none is issued one in the answer.
                None => {
                    let s = mlp_tls::secret::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
                    (Some(mlp_tls::secret::hash(&s)), Some(s))
                }
            },
        };
        let command = Command::UpsertNode { node: node.clone(), overlay: self.overlay.clone(), secret_hash };
        let resp = self.raft.submit(Request { now_ms: now_ms(), command }).await?;
        if let Some(e) = resp.error {
            // Two agents raced for a fresh node id: the other one's claim committed first.
            if e.contains("already registered by another agent") {
                return Err(ApiError::PermissionDenied(e));
            }
            return Err(ApiError::InvalidArgument(e));
        }
        let (ttl, overlay_subnet) = {
            let st = self.state.read();
            let subnet = st.nodes.get(&node.id).and_then(|n| n.overlay.as_ref()).map(|o| o.subnet.clone()).unwrap_or_default();
            (self.heartbeat.ttl_in(&st), subnet)
        };
        self.heartbeats.touch(&node.id, ttl);
        tracing::info!(node_id = node.id, name = node.name, subnet = overlay_subnet, "node registered");
        let overlay_cluster_cidr = self.overlay.as_ref().map(|p| p.cluster_cidr.clone()).unwrap_or_default();
        Ok(RegisterNodeResponse {
            heartbeat_ttl_ms: ttl.as_millis() as u64,
            index: resp.index,
            overlay_subnet,
            overlay_cluster_cidr,
            tracking_uri: self.tracking_uri.clone(),
            node_secret: new_secret.unwrap_or_default(),
        })
    }

    /// Node `node_id`'s overlay peers: every other node that holds a subnet and is not down.
    pub fn overlay_peers(&self, node_id: &str) -> mlp_proto::v1::OverlayPeers {
        let st = self.state.read();
        let peers = st
            .nodes
            .values()
            .filter(|n| n.id != node_id && n.status != node_status::DOWN)
            .filter_map(|n| {
                let o = n.overlay.as_ref().filter(|o| !o.subnet.is_empty() && !o.vtep_addr.is_empty())?;
                Some(mlp_proto::v1::OverlayPeer {
                    node_id: n.id.clone(),
                    node_name: n.name.clone(),
                    subnet: o.subnet.clone(),
                    vtep_addr: o.vtep_addr.clone(),
                })
            })
            .collect();
        mlp_proto::v1::OverlayPeers { peers, index: st.index }
    }

    pub async fn heartbeat(&self, node_id: &str) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat_with(node_id, Vec::new()).await
    }

    /// A heartbeat carrying the node's GPU measurements (kept in this server's memory).
    pub async fn heartbeat_with(&self, node_id: &str, gpu_stats: Vec<mlp_proto::v1::GpuStats>) -> Result<HeartbeatResponse, ApiError> {
        require_id("node_id", node_id)?;
        check_gpu_stats(&gpu_stats)?;
        if !self.raft.is_leader() {
            return Err(ApiError::NotLeader(self.raft.leader_addr()));
        }
        let status = {
            let st = self.state.read();
            st.nodes
                .get(node_id)
                .map(|n| n.status.clone())
                .ok_or_else(|| ApiError::NotFound(format!("node {node_id:?} is not registered")))?
        };
        let ttl = self.heartbeat.ttl_in(&self.state.read());
        self.heartbeats.touch(node_id, ttl);
        self.heartbeats.record_gpu_stats(node_id, gpu_stats, ttl);
        Metrics::inc(&self.metrics.node_heartbeats);
        if status != node_status::READY {
            let evals = crate::leader::node_evals(&self.state.read(), node_id);
            self.raft
                .write(Request {
                    now_ms: now_ms(),
                    command: Command::UpdateNodeStatus {
                        node_id: node_id.to_string(),
                        status: node_status::READY.to_string(),
                        description: "heartbeat resumed".into(),
                        evals,
                    },
                })
                .await?;
        }
        Ok(HeartbeatResponse { heartbeat_ttl_ms: ttl.as_millis() as u64 })
    }

    /// All allocations the node should know, with the job version each runs.
    pub fn node_allocations(&self, node_id: &str) -> NodeAllocations {
        let st = self.state.read();
        let allocations = st.allocs_for_node(node_id).map(|a| with_job(&st, a)).collect();
        NodeAllocations { allocations, index: st.index, partial: false }
    }

    /// The given allocations of the node (those one entry changed), as a partial message:
    /// O(changes), however many allocations the node has had.
    pub fn node_allocations_changed(&self, node_id: &str, ids: &BTreeSet<String>) -> NodeAllocations {
        let st = self.state.read();
        let allocations =
            ids.iter().filter_map(|id| st.allocs.get(id)).filter(|a| a.node_id == node_id).map(|a| with_job(&st, a)).collect();
        NodeAllocations { allocations, index: st.index, partial: true }
    }

    pub async fn update_allocs(&self, mut req: UpdateAllocsRequest) -> Result<UpdateAllocsResponse, ApiError> {
        require_id("node_id", &req.node_id)?;
        let index = {
            let st = self.state.read();
            if !st.nodes.contains_key(&req.node_id) {
                return Err(ApiError::NotFound(format!("node {:?} is not registered", req.node_id)));
            }
            for u in &req.updates {
                require_id("updates[].alloc_id", &u.alloc_id)?;
                if !matches!(
                    u.client_status.as_str(),
                    alloc_client::PENDING | alloc_client::RUNNING | alloc_client::COMPLETE | alloc_client::FAILED
                ) {
                    return Err(ApiError::InvalidArgument(format!(
                        "updates[{}].client_status {:?} is not one of pending, running, complete, failed",
                        u.alloc_id, u.client_status
                    )));
                }
                if let Some(a) = st.allocs.get(&u.alloc_id) {
                    if a.node_id != req.node_id {
                        return Err(ApiError::InvalidArgument(format!("allocation {} belongs to another node", u.alloc_id)));
                    }
                }
            }
            // An allocation the state no longer has was garbage-collected (only terminal ones
            // are): the agent's word on it is no news. Refusing the batch instead would have the
            // agent retry it, and its other updates, forever.
            let before = req.updates.len();
            req.updates.retain(|u| st.allocs.contains_key(&u.alloc_id));
            if req.updates.len() < before {
                tracing::debug!(
                    node_id = req.node_id,
                    dropped = before - req.updates.len(),
                    "updates for allocations no longer in the state dropped"
                );
            }
            st.index
        };
        let ttl = self.heartbeat.ttl_in(&self.state.read());
        self.heartbeats.touch(&req.node_id, ttl);
        if req.updates.is_empty() {
            return Ok(UpdateAllocsResponse { index });
        }
        Metrics::add(&self.metrics.alloc_updates, req.updates.len() as u64);
        let resp = self
            .raft
            .submit(Request { now_ms: now_ms(), command: Command::UpdateAllocsFromClient { node_id: req.node_id, updates: req.updates } })
            .await?;
        Ok(UpdateAllocsResponse { index: resp.index })
    }
}

/// An allocation with the job version it runs attached (the state keeps jobs apart).
fn with_job(st: &crate::state::ClusterState, a: &Allocation) -> Allocation {
    let mut a = a.clone();
    a.job = st.job_version(&a.namespace, &a.job_id, a.job_version).cloned();
    a
}

#[cfg(test)]
mod tests {
    use super::tracking_uri;

    #[test]
    fn the_tracking_uri_is_a_dialable_http_address() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
        assert_eq!(tracking_uri("http", addr("127.0.0.1:7646"), "127.0.0.1:7647"), "http://127.0.0.1:7646");
        assert_eq!(tracking_uri("http", addr("[::1]:7646"), "[::1]:7647"), "http://[::1]:7646");
        // Bound to every address: the advertised host, with the HTTP port.
        assert_eq!(tracking_uri("http", addr("0.0.0.0:7646"), "10.1.2.3:7647"), "http://10.1.2.3:7646");
        assert_eq!(tracking_uri("http", addr("0.0.0.0:7646"), "server-1.dc1:7647"), "http://server-1.dc1:7646");
        assert_eq!(tracking_uri("http", addr("[::]:7646"), "[fd00::5]:7647"), "http://[fd00::5]:7646");
        assert_eq!(tracking_uri("https", addr("127.0.0.1:7646"), "127.0.0.1:7647"), "https://127.0.0.1:7646");
        // Nothing better known: loopback.
        assert_eq!(tracking_uri("http", addr("0.0.0.0:7646"), "0.0.0.0:7647"), "http://127.0.0.1:7646");
    }
}
