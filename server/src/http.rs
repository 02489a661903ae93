//! The HTTP JSON API: a mirror of the gRPC API for reads and job submission, plus Prometheus
//! metrics. Every error is JSON `{"error": "..."}` with a 4xx/5xx status.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mlp_proto::v1::{
    DeploymentAllocHealthRequest, DeploymentFailRequest, DeploymentPauseRequest, DeploymentPromoteRequest, DispatchJobRequest, EventTopic,
    EventsRequest, GetJobRequest, GetServiceRequest, Job, JobChildrenRequest, ListAllocsRequest, ListDeploymentsRequest, ListJobsRequest,
    ListServicesRequest, PeriodicForceRequest, RestartJobRequest, RevertJobRequest, ScaleJobRequest, StopJobRequest,
};
use serde::Deserialize;
use serde_json::json;

use crate::acl::{self, policy::Capability, Authz};
use crate::api::{Api, ApiError, Block};
use crate::events::EventError;
use crate::metrics::Metrics;

/// Largest request body accepted (job specs are small).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// An HTTP error response.
pub struct HttpError(pub StatusCode, pub String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NotLeader(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        };
        HttpError(code, e.to_string())
    }
}

type HttpResult = Result<Response, HttpError>;

/// A JSON request body decoded strictly, as a job file is: a field the API does not know is an
/// error (serde alone would drop it silently), and every error names the field's path.
pub struct StrictJson<T>(pub T);

#[axum::async_trait]
impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for StrictJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
        if !json {
            return Err(HttpError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid request body: expected `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| HttpError(e.status(), format!("invalid request body: {}", e.body_text())))?;
        decode_strict(&bytes).map(StrictJson)
    }
}

/// Decodes `bytes` as `T`, refusing unknown fields; errors name the field path
/// (`job.groups[0].tasks[0].confg`).
pub fn decode_strict<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // serde_ignored writes `?` for the step into an `Option`; users never see that level.
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string().replace(".?", ""));
    let value: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut de, &mut note)).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { format!("{at}: ") };
        let code = if e.inner().is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
        HttpError(code, format!("invalid request body: {at}{}", e.inner()))
    })?;
    de.end().map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))?;
    if let Some(first) = unknown.first() {
        let more = if unknown.len() > 1 { format!(" (and {} more)", unknown.len() - 1) } else { String::new() };
        return Err(HttpError(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid request body: {first}: unknown field{more}")));
    }
    Ok(value)
}

fn ok<T: serde::Serialize>(v: T) -> HttpResult {
    Ok(Json(v).into_response())
}

/// A read's answer with the state's index in `X-Mlp-Index` (the next blocking query's `index`).
fn ok_at<T: serde::Serialize>(v: T, index: u64) -> HttpResult {
    Ok(([(INDEX_HEADER, index.to_string())], Json(v)).into_response())
}

/// The response header that carries a read's index.
pub const INDEX_HEADER: &str = "x-mlp-index";

/// `POST /v1/jobs` body: a job as JSON, or a job spec in HCL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    job: Option<Job>,
    hcl: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Params {
    namespace: String,
    stale: bool,
    purge: bool,
    job_id: String,
    node_id: String,
    /// Blocking query: wait for a change after this index ...
    index: u64,
    /// ... for at most this long (`500ms`, `30s`, `5m`; default 5m, at most 10m).
    wait: Option<String>,
    /// `GET /v1/service/NAME?passing=true`: passing instances only.
    passing: bool,
}

impl Params {
    fn block(&self) -> Result<Block, HttpError> {
        block(self.index, self.wait.as_deref())
    }
}

/// A blocking query from the query parameters `index` and `wait` (`500ms`, `30s`, `5m`).
pub(crate) fn block(index: u64, wait: Option<&str>) -> Result<Block, HttpError> {
    let wait_ms = match wait {
        None => 0,
        Some(w) => mlp_proto::jobspec::parse_duration(w)
            .map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("query parameter wait: {e}")))?
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    Ok(Block { min_index: index, wait_ms })
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/job/:id", get(get_job).delete(stop_job))
        .route("/v1/job/:id/allocations", get(job_allocs))
        .route("/v1/job/:id/versions", get(job_versions))
        .route("/v1/job/:id/evaluations", get(job_evals))
        .route("/v1/job/:id/deployments", get(job_deployments))
        .route("/v1/job/:id/revert", axum::routing::post(job_revert))
        .route("/v1/job/:id/scale", axum::routing::post(job_scale))
        .route("/v1/job/:id/restart", axum::routing::post(job_restart))
        .route("/v1/deployments", get(list_deployments))
        .route("/v1/deployment/:id", get(get_deployment))
        .route("/v1/deployment/:id/promote", axum::routing::post(deployment_promote))
        .route("/v1/deployment/:id/pause", axum::routing::post(deployment_pause))
        .route("/v1/deployment/:id/resume", axum::routing::post(deployment_resume))
        .route("/v1/deployment/:id/fail", axum::routing::post(deployment_fail))
        .route("/v1/deployment/:id/allocation-health", axum::routing::post(deployment_alloc_health))
        .route("/v1/job/:id/dispatch", axum::routing::post(dispatch_job))
        .route("/v1/job/:id/periodic/force", axum::routing::post(periodic_force))
        .route("/v1/job/:id/children", get(job_children))
        .route("/v1/allocations", get(list_allocs))
        .route("/v1/allocation/:id", get(get_alloc))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/node/:id", get(get_node))
        .route("/v1/node/:id/drain", axum::routing::post(node_drain))
        .route("/v1/node/:id/eligibility", axum::routing::post(node_eligibility))
        .route("/v1/evaluations", get(list_evals))
        .route("/v1/evaluation/:id", get(get_eval))
        .route("/v1/services", get(list_services))
        .route("/v1/service/:name", get(get_service))
        .route("/v1/status/leader", get(leader))
        .route("/v1/event/stream", get(event_stream))
        .route("/v1/metrics", get(metrics))
        .route("/v1/system/gc", axum::routing::post(system_gc))
        .route("/v1/namespaces", get(crate::namespace::http_list))
        .route(
            "/v1/namespace/:name",
            get(crate::namespace::http_get)
                .post(crate::namespace::http_apply)
                .put(crate::namespace::http_apply)
                .delete(crate::namespace::http_delete),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(api.clone(), count_requests))
        .with_state(api)
}

async fn count_requests(State(api): State<Arc<Api>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    Metrics::inc(&api.metrics.http_requests);
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        Metrics::inc(&api.metrics.http_errors);
    }
    resp
}

async fn not_found(uri: axum::http::Uri) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, format!("no such endpoint: {}", uri.path()))
}

async fn list_jobs(State(api): State<Arc<Api>>, authz: Token, Query(p): Query<Params>) -> HttpResult {
    let b = p.block()?;
    let mut r =
        api.list_jobs(ListJobsRequest { namespace: p.namespace, stale: p.stale, min_index: b.min_index, wait_ms: b.wait_ms }).await?;
    if let Some(a) = token(&authz) {
        r.jobs.retain(|j| a.allows_ns(Capability::ListJobs, ns_or_default(&j.namespace)));
    }
    ok_at(r.jobs, r.index)
}

/// The token the ACL middleware resolved (absent: ACLs off).
type Token = Option<axum::Extension<Authz>>;

fn token(t: &Token) -> Option<&Authz> {
    t.as_ref().map(|e| &e.0)
}

async fn submit_job(State(api): State<Arc<Api>>, authz: Token, StrictJson(body): StrictJson<SubmitJob>) -> HttpResult {
    let job = match (body.job, body.hcl) {
        (Some(job), None) => job,
        // Parsing up to 1 MiB of text is blocking work; keep it off the request threads.
        (None, Some(src)) => tokio::task::spawn_blocking(move || mlp_proto::jobspec::parse_str(&src, "<request>"))
            .await
            .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("the job spec parser failed: {e}")))?
            .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?,
        _ => return Err(HttpError(StatusCode::BAD_REQUEST, "give exactly one of \"job\" (JSON) or \"hcl\" (job spec text)".into())),
    };
    api.acl.require_ns(token(&authz), Capability::SubmitJob, &job.namespace, "POST /v1/jobs", &job.id).map_err(ApiError::from)?;
    ok(api.register_job(Some(job)).await?)
}

fn get_job_request(id: String, p: Params) -> Result<GetJobRequest, HttpError> {
    let b = p.block()?;
    Ok(GetJobRequest { job_id: id, namespace: p.namespace, stale: p.stale, min_index: b.min_index, wait_ms: b.wait_ms })
}

async fn get_job(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let mut r = api.get_job(get_job_request(id, p)?).await?;
    if let Some(j) = r.job.as_mut() {
        if !api.acl.shows_env(token(&authz), &j.namespace) {
            acl::redact_env(j);
        }
    }
    let index = r.index;
    ok_at(r, index)
}

async fn stop_job(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.stop_job(StopJobRequest { job_id: id, namespace: p.namespace, purge: p.purge }).await?)
}

async fn job_allocs(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let r = api.get_job(get_job_request(id, p)?).await?;
    ok_at(r.allocations, r.index)
}

async fn job_versions(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let show = api.acl.shows_env(token(&authz), &p.namespace);
    let mut versions = api.job_versions(get_job_request(id, p)?).await?.versions;
    if !show {
        versions.iter_mut().for_each(acl::redact_env);
    }
    ok(versions)
}

/// `POST /v1/job/:id/dispatch` body (issue 16 §2): meta, and the payload as UTF-8 text (a
/// binary payload goes through gRPC, as `mlp job dispatch` sends it).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchBody {
    meta: BTreeMap<String, String>,
    payload: String,
    request_id: String,
}

async fn dispatch_job(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    StrictJson(body): StrictJson<DispatchBody>,
) -> HttpResult {
    api.acl.require_ns(token(&authz), Capability::SubmitJob, &p.namespace, "POST /v1/job/:id/dispatch", &id).map_err(ApiError::from)?;
    let req = DispatchJobRequest {
        job_id: id,
        namespace: p.namespace,
        meta: body.meta,
        payload: body.payload.into_bytes(),
        request_id: body.request_id,
    };
    ok(api.dispatch_job(req).await?)
}

async fn periodic_force(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    api.acl
        .require_ns(token(&authz), Capability::SubmitJob, &p.namespace, "POST /v1/job/:id/periodic/force", &id)
        .map_err(ApiError::from)?;
    ok(api.periodic_force(PeriodicForceRequest { job_id: id, namespace: p.namespace }).await?)
}

async fn job_children(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let r = api.job_children(JobChildrenRequest { job_id: id, namespace: p.namespace, stale: p.stale }).await?;
    let index = r.index;
    ok_at(r, index)
}

async fn job_evals(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let r = api.get_job(get_job_request(id, p)?).await?;
    ok_at(r.evaluations, r.index)
}

async fn list_allocs(State(api): State<Arc<Api>>, authz: Token, Query(p): Query<Params>) -> HttpResult {
    let b = p.block()?;
    let req =
        ListAllocsRequest { job_id: p.job_id, node_id: p.node_id, namespace: p.namespace, min_index: b.min_index, wait_ms: b.wait_ms };
    let mut r = api.list_allocs(req).await?;
    if let Some(a) = token(&authz) {
        r.allocations.retain(|x| a.allows_ns(Capability::ReadJob, ns_or_default(&x.namespace)));
    }
    ok_at(r.allocations, r.index)
}

async fn get_alloc(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let (mut a, index) = api.get_alloc(&id, p.block()?).await?;
    api.acl.require_ns(token(&authz), Capability::ReadJob, &a.namespace, "GET /v1/allocation", &a.id).map_err(ApiError::from)?;
    if !api.acl.shows_env(token(&authz), &a.namespace) {
        if let Some(j) = a.job.as_mut() {
            acl::redact_env(j);
        }
    }
    ok_at(a, index)
}

async fn list_nodes(State(api): State<Arc<Api>>, Query(p): Query<Params>) -> HttpResult {
    let r = api.list_nodes(p.block()?).await?;
    ok_at(r.nodes, r.index)
}

async fn get_node(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let r = api.get_node(&id, p.block()?).await?;
    let index = r.index;
    ok_at(r, index)
}

/// `POST /v1/node/{id}/drain` with `{"enable": true, "deadline_ms": 3600000, "ignore_system": false}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    enable: bool,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    ignore_system: bool,
}

async fn node_drain(State(api): State<Arc<Api>>, Path(id): Path<String>, StrictJson(b): StrictJson<DrainBody>) -> HttpResult {
    let req = mlp_proto::v1::NodeDrainRequest { node_id: id, enable: b.enable, deadline_ms: b.deadline_ms, ignore_system: b.ignore_system };
    ok(api.update_drain(req).await?)
}

/// `POST /v1/node/{id}/eligibility` with `{"eligible": false}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EligibilityBody {
    eligible: bool,
}

async fn node_eligibility(State(api): State<Arc<Api>>, Path(id): Path<String>, StrictJson(b): StrictJson<EligibilityBody>) -> HttpResult {
    ok(api.update_eligibility(mlp_proto::v1::NodeEligibilityRequest { node_id: id, eligible: b.eligible }).await?)
}

async fn list_services(State(api): State<Arc<Api>>, Query(p): Query<Params>) -> HttpResult {
    let b = p.block()?;
    let r = api.list_services(ListServicesRequest { namespace: p.namespace, min_index: b.min_index, wait_ms: b.wait_ms }).await?;
    ok_at(r.services, r.index)
}

async fn get_service(State(api): State<Arc<Api>>, Path(name): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let b = p.block()?;
    let req = GetServiceRequest { name, namespace: p.namespace, min_index: b.min_index, wait_ms: b.wait_ms, passing: p.passing };
    let r = api.get_service(req).await?;
    ok_at(r.instances, r.index)
}

async fn list_evals(State(api): State<Arc<Api>>, authz: Token, Query(p): Query<Params>) -> HttpResult {
    let mut r = api.list_evals(&p.job_id, p.block()?).await?;
    if let Some(a) = token(&authz) {
        r.evaluations.retain(|e| a.allows_ns(Capability::ReadJob, ns_or_default(&e.namespace)));
    }
    ok_at(r.evaluations, r.index)
}

async fn get_eval(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let (e, index) = api.get_eval(&id, p.block()?).await?;
    api.acl.require_ns(token(&authz), Capability::ReadJob, &e.namespace, "GET /v1/evaluation", &e.id).map_err(ApiError::from)?;
    ok_at(e, index)
}

// ---- deployments, revert and scale (issue 16 §1) ----

async fn job_deployments(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    let ns = ns_or_default(&p.namespace).to_string();
    api.acl.require_ns(token(&authz), Capability::ReadJob, &ns, "GET /v1/job/deployments", &id).map_err(ApiError::from)?;
    let r = api.list_deployments(ListDeploymentsRequest { namespace: ns, job_id: id, ..Default::default() }).await?;
    ok_at(r.deployments, r.index)
}

/// `POST /v1/job/{id}/revert` with `{"version": N, "enforce_prior_version": M}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    version: u64,
    #[serde(default)]
    enforce_prior_version: Option<u64>,
}

async fn job_revert(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    StrictJson(b): StrictJson<RevertBody>,
) -> HttpResult {
    api.acl
        .require_ns(token(&authz), Capability::SubmitJob, ns_or_default(&p.namespace), "POST /v1/job/revert", &id)
        .map_err(ApiError::from)?;
    let req = RevertJobRequest { job_id: id, namespace: p.namespace, version: b.version, enforce_prior_version: b.enforce_prior_version };
    ok(api.revert_job(req).await?)
}

/// `POST /v1/job/{id}/scale` with `{"group": "web", "count": 5}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    group: String,
    count: u32,
}

async fn job_scale(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    StrictJson(b): StrictJson<ScaleBody>,
) -> HttpResult {
    api.acl
        .require_ns(token(&authz), Capability::SubmitJob, ns_or_default(&p.namespace), "POST /v1/job/scale", &id)
        .map_err(ApiError::from)?;
    ok(api.scale_job(ScaleJobRequest { job_id: id, namespace: p.namespace, group: b.group, count: b.count }).await?)
}

/// `POST /v1/job/{id}/restart` with `{"groups": [...]}` (empty or absent: every group).
async fn job_restart(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    body: Option<StrictJson<PromoteBody>>,
) -> HttpResult {
    api.acl
        .require_ns(token(&authz), Capability::SubmitJob, ns_or_default(&p.namespace), "POST /v1/job/restart", &id)
        .map_err(ApiError::from)?;
    let groups = body.map(|b| b.0.groups).unwrap_or_default();
    ok(api.restart_job(RestartJobRequest { job_id: id, namespace: p.namespace, groups }).await?)
}

async fn list_deployments(State(api): State<Arc<Api>>, authz: Token, Query(p): Query<Params>) -> HttpResult {
    let mut r = api.list_deployments(ListDeploymentsRequest { namespace: p.namespace, job_id: p.job_id, ..Default::default() }).await?;
    if let Some(a) = token(&authz) {
        r.deployments.retain(|d| a.allows_ns(Capability::ReadJob, &d.namespace));
    }
    ok_at(r.deployments, r.index)
}

/// The namespace of the deployment `id` names, checked against the token.
fn deployment_ns(api: &Api, authz: &Token, cap: Capability, id: &str, op: &str) -> Result<(), HttpError> {
    let ns = {
        let st = api.state.read();
        crate::deploy::find(&st, id).map(|d| d.namespace.clone()).unwrap_or_else(|_| "default".to_string())
    };
    api.acl.require_ns(token(authz), cap, &ns, op, id).map_err(ApiError::from)?;
    Ok(())
}

async fn get_deployment(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>) -> HttpResult {
    deployment_ns(&api, &authz, Capability::ReadJob, &id, "GET /v1/deployment")?;
    let r = api.get_deployment(&id).await?;
    let index = r.index;
    ok_at(r, index)
}

/// `POST /v1/deployment/{id}/promote` with `{"groups": [...]}` (empty or absent: every group).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PromoteBody {
    groups: Vec<String>,
}

async fn deployment_promote(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    body: Option<StrictJson<PromoteBody>>,
) -> HttpResult {
    deployment_ns(&api, &authz, Capability::SubmitJob, &id, "POST /v1/deployment/promote")?;
    let groups = body.map(|b| b.0.groups).unwrap_or_default();
    ok(api.promote_deployment(DeploymentPromoteRequest { deployment_id: id, groups }).await?)
}

async fn deployment_pause(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>) -> HttpResult {
    deployment_ns(&api, &authz, Capability::SubmitJob, &id, "POST /v1/deployment/pause")?;
    ok(api.pause_deployment(DeploymentPauseRequest { deployment_id: id, pause: true }).await?)
}

async fn deployment_resume(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>) -> HttpResult {
    deployment_ns(&api, &authz, Capability::SubmitJob, &id, "POST /v1/deployment/resume")?;
    ok(api.pause_deployment(DeploymentPauseRequest { deployment_id: id, pause: false }).await?)
}

async fn deployment_fail(State(api): State<Arc<Api>>, authz: Token, Path(id): Path<String>) -> HttpResult {
    deployment_ns(&api, &authz, Capability::SubmitJob, &id, "POST /v1/deployment/fail")?;
    ok(api.fail_deployment(DeploymentFailRequest { deployment_id: id }).await?)
}

/// `POST /v1/deployment/{id}/allocation-health` with `{"healthy": [ids], "unhealthy": [ids]}`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AllocHealthBody {
    healthy: Vec<String>,
    unhealthy: Vec<String>,
}

async fn deployment_alloc_health(
    State(api): State<Arc<Api>>,
    authz: Token,
    Path(id): Path<String>,
    StrictJson(b): StrictJson<AllocHealthBody>,
) -> HttpResult {
    deployment_ns(&api, &authz, Capability::SubmitJob, &id, "POST /v1/deployment/allocation-health")?;
    let req = DeploymentAllocHealthRequest { deployment_id: id, healthy: b.healthy, unhealthy: b.unhealthy };
    ok(api.set_alloc_health(req).await?)
}

fn ns_or_default(ns: &str) -> &str {
    if ns.is_empty() {
        "default"
    } else {
        ns
    }
}

/// `GET /v1/event/stream?topic=Job&topic=Allocation:<job id>&namespace=N&index=I`: newline-
/// delimited JSON, one `EventBatch` per line (`{"index":…,"events":[…]}`), `{}` as a heartbeat
/// every 10 s; a stream that ends early ends with a line `{"error": "..."}`.
async fn event_stream(State(api): State<Arc<Api>>, authz: Token, Query(q): Query<Vec<(String, String)>>) -> HttpResult {
    let mut req = EventsRequest::default();
    for (k, v) in q {
        match k.as_str() {
            "topic" => {
                let (topic, key) = v.split_once(':').unwrap_or((v.as_str(), ""));
                req.topics.push(EventTopic { topic: topic.to_string(), key: key.to_string() });
            }
            "namespace" => req.namespace = v,
            "index" => {
                req.index =
                    v.parse().map_err(|_| HttpError(StatusCode::BAD_REQUEST, format!("query parameter index: {v:?} is not a number")))?
            }
            other => {
                return Err(HttpError(StatusCode::BAD_REQUEST, format!("unknown query parameter {other:?} (topic, namespace, index)")))
            }
        }
    }
    let ns = if req.namespace.is_empty() { "*" } else { req.namespace.as_str() };
    api.acl.require_ns(token(&authz), Capability::ReadJob, ns, "GET /v1/event/stream", "").map_err(ApiError::from)?;
    let sub = api.subscribe_events(&req).map_err(|e| {
        let code = match e {
            EventError::Gone { .. } => StatusCode::GONE,
            EventError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        HttpError(code, e.to_string())
    })?;
    let authz = authz.map(|e| e.0);
    let rx = Api::pump_events(api.clone(), sub, move |mut item| {
        if let (Ok(batch), Some(a)) = (item.as_mut(), authz.as_ref()) {
            acl::redact_batch(batch, a);
        }
        let line = match item {
            // A batch is never empty; an empty one is the heartbeat.
            Ok(batch) if batch.events.is_empty() => "{}".to_string(),
            Ok(batch) => serde_json::to_string(&batch).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string()),
            Err(e) => json!({ "error": e.to_string() }).to_string(),
        };
        Ok::<_, std::convert::Infallible>(line + "\n")
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `POST /v1/system/gc` (no body): collect everything eligible now; answers the counts.
async fn system_gc(State(api): State<Arc<Api>>) -> HttpResult {
    ok(api.system_gc().await?)
}

async fn leader(State(api): State<Arc<Api>>) -> HttpResult {
    ok(api.leader())
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let text = {
        let st = api.state.read();
        api.metrics.render(&st, api.raft_figures(), api.state.events(), &api.heartbeats.all_gpu_stats())
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves `app` on `listener` over mutual TLS (any certificate the CA signed; the HTTP API has
/// no server-only routes) until `stop`. Each connection is HTTP/1.1 or HTTP/2 (ALPN or prior
/// knowledge), on its own task; `axum::serve` only knows plain TCP listeners.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: std::sync::Arc<mlp_tls::Tls>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use futures::StreamExt;
    let mut incoming = Box::pin(mlp_tls::net::incoming(listener, Some(tls)));
    let mut stop = Box::pin(stop);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = &mut stop => return,
        };
        let conn = match conn {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "HTTP connection failed");
                continue;
            }
            None => return,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(conn), svc).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}
