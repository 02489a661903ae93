//! The HTTP JSON API: a mirror of the gRPC API for reads and job submission, plus Prometheus
//! metrics. Every error is JSON `{"error": "..."}` with a 4xx/5xx status.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mlp_proto::v1::{GetJobRequest, Job, ListAllocsRequest, ListJobsRequest, StopJobRequest};
use serde::Deserialize;
use serde_json::json;

use crate::api::{Api, ApiError};
use crate::metrics::Metrics;

/// Largest request body accepted (job specs are small).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// An HTTP error response.
pub struct HttpError(StatusCode, String);

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
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/job/:id", get(get_job).delete(stop_job))
        .route("/v1/job/:id/allocations", get(job_allocs))
        .route("/v1/job/:id/versions", get(job_versions))
        .route("/v1/job/:id/evaluations", get(job_evals))
        .route("/v1/allocations", get(list_allocs))
        .route("/v1/allocation/:id", get(get_alloc))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/node/:id", get(get_node))
        .route("/v1/node/:id/drain", axum::routing::post(node_drain))
        .route("/v1/node/:id/eligibility", axum::routing::post(node_eligibility))
        .route("/v1/evaluations", get(list_evals))
        .route("/v1/evaluation/:id", get(get_eval))
        .route("/v1/status/leader", get(leader))
        .route("/v1/metrics", get(metrics))
        .route("/v1/system/gc", axum::routing::post(system_gc))
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

async fn list_jobs(State(api): State<Arc<Api>>, Query(p): Query<Params>) -> HttpResult {
    ok(api.list_jobs(ListJobsRequest { namespace: p.namespace, stale: p.stale }).await?.jobs)
}

async fn submit_job(State(api): State<Arc<Api>>, StrictJson(body): StrictJson<SubmitJob>) -> HttpResult {
    let job = match (body.job, body.hcl) {
        (Some(job), None) => job,
        // Parsing up to 1 MiB of text is blocking work; keep it off the request threads.
        (None, Some(src)) => tokio::task::spawn_blocking(move || mlp_proto::jobspec::parse_str(&src, "<request>"))
            .await
            .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("the job spec parser failed: {e}")))?
            .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e.to_string()))?,
        _ => return Err(HttpError(StatusCode::BAD_REQUEST, "give exactly one of \"job\" (JSON) or \"hcl\" (job spec text)".into())),
    };
    ok(api.register_job(Some(job)).await?)
}

async fn get_job(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.get_job(GetJobRequest { job_id: id, namespace: p.namespace, stale: p.stale }).await?)
}

async fn stop_job(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.stop_job(StopJobRequest { job_id: id, namespace: p.namespace, purge: p.purge }).await?)
}

async fn job_allocs(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.get_job(GetJobRequest { job_id: id, namespace: p.namespace, stale: p.stale }).await?.allocations)
}

async fn job_versions(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.job_versions(GetJobRequest { job_id: id, namespace: p.namespace, stale: p.stale }).await?.versions)
}

async fn job_evals(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(p): Query<Params>) -> HttpResult {
    ok(api.get_job(GetJobRequest { job_id: id, namespace: p.namespace, stale: p.stale }).await?.evaluations)
}

async fn list_allocs(State(api): State<Arc<Api>>, Query(p): Query<Params>) -> HttpResult {
    ok(api.list_allocs(ListAllocsRequest { job_id: p.job_id, node_id: p.node_id, namespace: p.namespace }).await?.allocations)
}

async fn get_alloc(State(api): State<Arc<Api>>, Path(id): Path<String>) -> HttpResult {
    ok(api.get_alloc(&id).await?)
}

async fn list_nodes(State(api): State<Arc<Api>>) -> HttpResult {
    ok(api.list_nodes().await?.nodes)
}

async fn get_node(State(api): State<Arc<Api>>, Path(id): Path<String>) -> HttpResult {
    ok(api.get_node(&id).await?)
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

async fn list_evals(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> HttpResult {
    let job = q.get("job_id").cloned().unwrap_or_default();
    ok(api.list_evals(&job).await?.evaluations)
}

async fn get_eval(State(api): State<Arc<Api>>, Path(id): Path<String>) -> HttpResult {
    ok(api.get_eval(&id).await?)
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
        api.metrics.render(&st, api.raft_figures())
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
