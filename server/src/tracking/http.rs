//! MLflow's REST API on mlp's HTTP listener: `/api/2.0/mlflow/<endpoint>` (tracking and model
//! registry), `/api/2.0/mlflow-artifacts/artifacts/<path>` (artifact upload, download, list)
//! and `/api/3.0/mlflow/server-info`. Every error is MLflow's `{"error_code", "message"}`
//! with MLflow's HTTP status; unknown MLflow paths answer `ENDPOINT_NOT_FOUND` as JSON.
//!
//! Requests are read as MLflow's clients send them: GET endpoints with query parameters, the
//! others with a JSON body; both are accepted on every endpoint, and int64 fields may come as
//! numbers or strings (proto3 JSON). Every input is checked against MLflow's limits here,
//! before anything reaches Raft; what depends on the state (existence, immutable params) is
//! checked again by `apply`, so a refused write changes nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::artifacts::ArtifactService;
use super::limits::*;
use super::search::{self, Searchable, VersionOf};
use super::state::{self, Metric, MetricValue, TrackingCommand as C, LIFECYCLE_ACTIVE, LIFECYCLE_DELETED, RUN_NAME_TAG};
use super::{check_key, check_value, ErrorCode, TrackingError};
use crate::api::Api;
use crate::leader::now_ms;
use crate::raft::node::WriteError;
use crate::state::{Command, Request};

type TResult<T> = Result<T, TrackingError>;

/// What the handlers share.
pub struct Tracking {
    pub api: Arc<Api>,
    pub artifacts: Arc<ArtifactService>,
}

/// The tracking routes, to be merged into the server's HTTP router. `artifacts`: the blob
/// store (`tracking::artifacts`), shared with the `RaftService` blob RPCs.
pub fn router(api: Arc<Api>, artifacts: Arc<ArtifactService>) -> Router {
    let t = Arc::new(Tracking { api, artifacts });
    Router::new()
        .route("/api/2.0/mlflow/*endpoint", any(mlflow))
        .route("/api/2.0/mlflow-artifacts/artifacts", get(list_artifacts).fallback(method_not_allowed))
        .route(
            "/api/2.0/mlflow-artifacts/artifacts/*path",
            get(download_artifact).put(upload_artifact).delete(delete_artifact).fallback(method_not_allowed),
        )
        .route("/api/2.0/mlflow-artifacts/*rest", any(endpoint_not_found))
        .route("/api/3.0/mlflow/server-info", get(server_info))
        .route("/api/3.0/mlflow/workspaces", get(list_workspaces).fallback(workspaces_are_namespaces))
        .route("/api/3.0/mlflow/workspaces/:name", get(get_workspace).fallback(workspaces_are_namespaces))
        .route("/api/3.0/mlflow/*rest", any(endpoint_not_found))
        .route("/api/2.0/mlflow", any(endpoint_not_found))
        .route("/api/2.0/mlflow-artifacts", any(endpoint_not_found))
        // Uploads stream to disk with their own limit; JSON bodies are read with MLflow's 1 MB.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(t)
}

impl Tracking {
    /// The view of a request with these headers (its workspace).
    fn cx(&self, headers: &HeaderMap) -> TResult<Cx<'_>> {
        Ok(Cx { api: &self.api, artifacts: &self.artifacts, ns: workspace_of(headers)? })
    }
}

impl IntoResponse for TrackingError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error_code": self.code.as_str(), "message": self.message }))).into_response()
    }
}

fn from_write(e: WriteError) -> TrackingError {
    match e {
        WriteError::Rejected(msg) => TrackingError::from_wire(&msg),
        other => TrackingError::new(ErrorCode::TemporarilyUnavailable, other.to_string()),
    }
}

async fn endpoint_not_found(method: Method, uri: Uri) -> TrackingError {
    TrackingError::new(ErrorCode::EndpointNotFound, format!("No API endpoint for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> TrackingError {
    TrackingError::new(ErrorCode::EndpointNotFound, format!("{} does not take {method}", uri.path()))
}

/// `GET /api/3.0/mlflow/server-info`: what the client asks before artifact transfers.
async fn server_info() -> Response {
    Json(json!({
        "store_type": "mlp",
        "artifact_serving_enabled": true,
        "multipart_uploads_enabled": false,
        "multipart_downloads_enabled": false,
        "artifacts_presigned_only": false,
        // A workspace is an mlp namespace (`X-MLFLOW-WORKSPACE`, `MLFLOW_WORKSPACE`).
        "workspaces_enabled": true,
    }))
    .into_response()
}

// ---- workspaces (mlp namespaces) ----

fn workspace_json(ns: &mlp_proto::v1::Namespace) -> Value {
    json!({ "name": ns.name, "description": ns.description })
}

/// `GET /api/3.0/mlflow/workspaces`: the namespaces this request's token may read (every
/// namespace with ACLs off), as MLflow's `ListWorkspaces` answers.
async fn list_workspaces(State(t): State<Arc<Tracking>>, authz: Option<axum::Extension<crate::acl::Authz>>) -> TResult<Response> {
    t.api.raft.linearizable_read().await.map_err(from_write)?;
    let all = crate::namespace::list(&t.api.state.read());
    let readable = |name: &str| authz.as_ref().is_none_or(|a| a.allows_ns(crate::acl::policy::Capability::ReadJob, name));
    let workspaces: Vec<Value> = all.iter().filter(|ns| readable(&ns.name)).map(workspace_json).collect();
    Ok(Json(json!({ "workspaces": workspaces })).into_response())
}

/// `GET /api/3.0/mlflow/workspaces/<name>`: one namespace, as MLflow's `GetWorkspace` answers.
async fn get_workspace(
    State(t): State<Arc<Tracking>>,
    Path(name): Path<String>,
    authz: Option<axum::Extension<crate::acl::Authz>>,
) -> TResult<Response> {
    t.api.raft.linearizable_read().await.map_err(from_write)?;
    let readable = authz.as_ref().is_none_or(|a| a.allows_ns(crate::acl::policy::Capability::ReadJob, &name));
    let found = crate::namespace::list(&t.api.state.read()).into_iter().find(|ns| ns.name == name && readable);
    match found {
        Some(ns) => Ok(Json(json!({ "workspace": workspace_json(&ns) })).into_response()),
        None => Err(TrackingError::no_workspace(&name)),
    }
}

/// Creating, changing or deleting a workspace through MLflow: refused, it is a namespace.
async fn workspaces_are_namespaces(method: Method, uri: Uri) -> TrackingError {
    TrackingError::new(
        ErrorCode::EndpointNotFound,
        format!("{method} {}: MLflow workspaces are mlp namespaces; change them with `mlp namespace apply|delete`", uri.path()),
    )
}

// ---- request arguments ----

/// A request's arguments: the query string's and the JSON body's, merged (body wins).
struct Args(Map<String, Value>);

fn missing(k: &str) -> TrackingError {
    TrackingError::invalid(format!(
        "Missing value for required parameter '{k}'. See the API docs for more information about request parameters."
    ))
}

impl Args {
    fn parse(uri: &Uri, body: &[u8]) -> TResult<Args> {
        let mut map = Map::new();
        let Query(pairs) =
            Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(|e| TrackingError::invalid(format!("Invalid query string: {e}")))?;
        for (k, v) in pairs {
            match map.get_mut(&k) {
                Some(Value::Array(a)) => a.push(Value::String(v)),
                Some(prev) => {
                    let first = prev.take();
                    *prev = Value::Array(vec![first, Value::String(v)]);
                }
                None => {
                    map.insert(k, Value::String(v));
                }
            }
        }
        if !body.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(o)) => map.extend(o),
                Ok(_) => return Err(TrackingError::invalid("The request body must be a JSON object")),
                Err(e) => return Err(TrackingError::invalid(format!("Malformed JSON request body: {e}"))),
            }
        }
        Ok(Args(map))
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn opt_str(&self, k: &str) -> TResult<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
                Value::String(s) => Ok(Some(s.clone())),
                v => Ok(Some(v.to_string())),
            },
            Some(_) => Err(TrackingError::invalid(format!("Invalid value for parameter '{k}': expected a string"))),
        }
    }

    /// A required string: present and not empty.
    fn str(&self, k: &str) -> TResult<String> {
        self.opt_str(k)?.filter(|s| !s.is_empty()).ok_or_else(|| missing(k))
    }

    fn opt_i64(&self, k: &str) -> TResult<Option<i64>> {
        let bad = || TrackingError::invalid(format!("Invalid value for parameter '{k}': expected an integer"));
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18).map(|f| f as i64))
                .map(Some)
                .ok_or_else(bad),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    }

    fn version(&self, k: &str) -> TResult<u64> {
        let v = self.str(k)?;
        v.trim().parse().map_err(|_| TrackingError::invalid(format!("Parameter '{k}' must be an integer, got '{v}'.")))
    }

    fn f64(&self, k: &str) -> TResult<f64> {
        let bad = || TrackingError::invalid(format!("Invalid value for parameter '{k}': expected a number"));
        match self.get(k) {
            None => Err(missing(k)),
            Some(Value::Number(n)) => n.as_f64().ok_or_else(bad),
            Some(Value::String(s)) => state::parse_metric_value(s).ok_or_else(bad),
            Some(_) => Err(bad()),
        }
    }

    fn list(&self, k: &str) -> TResult<Vec<String>> {
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(TrackingError::invalid(format!("Invalid value for parameter '{k}': expected a list of strings"))),
                })
                .collect(),
            Some(_) => Ok(self.opt_str(k)?.into_iter().collect()),
        }
    }

    fn objects(&self, k: &str) -> TResult<Vec<Args>> {
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Object(o) => Ok(Args(o.clone())),
                    _ => Err(TrackingError::invalid(format!("Invalid value for parameter '{k}': expected a list of objects"))),
                })
                .collect(),
            Some(_) => Err(TrackingError::invalid(format!("Invalid value for parameter '{k}': expected a list"))),
        }
    }

    /// `[{"key": .., "value": ..}]`, each key and value checked.
    fn key_values(&self, k: &str, max_items: usize, max_value: usize) -> TResult<Vec<(String, String)>> {
        let items = self.objects(k)?;
        if items.len() > max_items {
            return Err(TrackingError::invalid(format!("A request may carry at most {max_items} {k}, found {}", items.len())));
        }
        items
            .iter()
            .map(|o| {
                let key = o.str("key")?;
                let value = o.opt_str("value")?.unwrap_or_default();
                check_key("key", &key, MAX_NAME_CHARS)?;
                check_value(&format!("value of '{key}'"), &value, max_value)?;
                Ok((key, value))
            })
            .collect()
    }
}

// ---- plumbing ----

/// The request header that names the MLflow workspace (MLflow's `X-MLFLOW-WORKSPACE`, sent by
/// its client when `MLFLOW_WORKSPACE` is set): an mlp namespace. Absent: `default`.
pub const WORKSPACE_HEADER: &str = "x-mlflow-workspace";

/// The namespace a request works in: its `X-MLFLOW-WORKSPACE` header, `default` without one.
/// Whether it exists is checked where the state is read or changed.
pub fn workspace_of(headers: &HeaderMap) -> TResult<String> {
    match headers.get(WORKSPACE_HEADER) {
        None => Ok(crate::namespace::DEFAULT.to_string()),
        Some(v) => {
            let ws = v.to_str().map_err(|_| TrackingError::invalid("The X-MLFLOW-WORKSPACE header is not ASCII"))?.trim();
            if ws.is_empty() {
                return Ok(crate::namespace::DEFAULT.to_string());
            }
            check_key("workspace", ws, 128)?;
            Ok(ws.to_string())
        }
    }
}

/// One request's view: the server's tracking, in the namespace (MLflow workspace) the
/// request names. Every read and write goes through it, so no request sees or changes another
/// namespace's experiments, runs, models or artifact paths.
struct Cx<'a> {
    api: &'a Api,
    artifacts: &'a ArtifactService,
    ns: String,
}

impl Cx<'_> {
    /// Commits a tracking command in the request's namespace through Raft; `Ok(created)` as
    /// `apply` answered.
    async fn submit(&self, cmd: C) -> TResult<Option<String>> {
        submit(self.api, &self.ns, cmd).await
    }

    /// A linearizable look at the request namespace's tracking state.
    async fn read<T>(&self, f: impl FnOnce(&state::TrackingState) -> TResult<T>) -> TResult<T> {
        read(self.api, &self.ns, f).await
    }
}

/// Commits a tracking command in namespace `ns` (`Command::Tracking` in `default`, as before
/// workspaces, `Command::TrackingIn` elsewhere).
pub async fn submit(api: &Api, ns: &str, cmd: C) -> TResult<Option<String>> {
    let r = api.raft.submit(Request { now_ms: now_ms(), command: Command::tracking_in(ns, cmd) }).await.map_err(from_write)?;
    Ok(r.created)
}

/// A linearizable look at namespace `ns`'s tracking state on `api`'s server (the REST
/// handlers' and `TrackingService`'s); a namespace that does not exist is not found.
pub async fn read<T>(api: &Api, ns: &str, f: impl FnOnce(&state::TrackingState) -> TResult<T>) -> TResult<T> {
    api.raft.linearizable_read().await.map_err(from_write)?;
    let st = api.state.read();
    f(st.tracking_in(ns).ok_or_else(|| TrackingError::no_workspace(ns))?)
}

fn now() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// A random numeric id, as MLflow's file store makes experiment ids.
fn new_experiment_id() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 1_000_000_000_000_000_000;
    n.to_string()
}

fn check_id(what: &str, s: &str) -> TResult<()> {
    check_key(what, s, 256)
}

fn run_id_of(a: &Args) -> TResult<String> {
    let id = match a.opt_str("run_id")?.filter(|s| !s.is_empty()) {
        Some(id) => id,
        None => a.str("run_uuid").map_err(|_| missing("run_id"))?,
    };
    check_id("run_id", &id)?;
    Ok(id)
}

/// `max_results` and `page_token` over a sorted list; the token is an offset, opaque to
/// clients.
fn page<T>(items: Vec<T>, a: &Args, default_max: usize, cap: usize) -> TResult<(Vec<T>, Option<String>)> {
    let max = match a.opt_i64("max_results")? {
        None => default_max,
        Some(n) if n >= 1 && (n as u64) <= cap as u64 => n as usize,
        Some(n) => {
            return Err(TrackingError::invalid(format!("Invalid value {n} for parameter 'max_results': it must be between 1 and {cap}")))
        }
    };
    let offset = match a.opt_str("page_token")?.filter(|s| !s.is_empty()) {
        None => 0,
        Some(t) => t.parse::<usize>().map_err(|_| TrackingError::invalid(format!("Invalid page token {t:?}")))?,
    };
    let total = items.len();
    let out: Vec<T> = items.into_iter().skip(offset).take(max).collect();
    let next = (offset + out.len() < total && !out.is_empty()).then(|| (offset + out.len()).to_string());
    Ok((out, next))
}

fn with_token(mut v: Value, token: Option<String>) -> Value {
    if let (Some(t), Some(o)) = (token, v.as_object_mut()) {
        o.insert("next_page_token".into(), Value::String(t));
    }
    v
}

/// `ACTIVE_ONLY` (default), `DELETED_ONLY`, `ALL`.
fn view_type(a: &Args, k: &str) -> TResult<fn(&str) -> bool> {
    match a.opt_str(k)?.as_deref() {
        None | Some("") | Some("ACTIVE_ONLY") | Some("1") => Ok(|s| s == LIFECYCLE_ACTIVE),
        Some("DELETED_ONLY") | Some("2") => Ok(|s| s == LIFECYCLE_DELETED),
        Some("ALL") | Some("3") => Ok(|_| true),
        Some(o) => Err(TrackingError::invalid(format!("Invalid value '{o}' for parameter '{k}'"))),
    }
}

fn filter_and_sort<'a, T: Searchable + 'a>(items: impl Iterator<Item = &'a T>, a: &Args, default_order: &[&str]) -> TResult<Vec<&'a T>> {
    let clauses = search::parse_filter::<T>(&a.opt_str("filter")?.unwrap_or_default())?;
    let mut terms = a.list("order_by")?;
    if terms.len() > 10 {
        return Err(TrackingError::invalid("At most 10 order_by terms"));
    }
    terms.extend(default_order.iter().map(|s| s.to_string()));
    let order = search::parse_order_by::<T>(&terms)?;
    let mut out: Vec<&T> = items.filter(|i| clauses.iter().all(|c| c.matches(*i))).collect();
    out.sort_by(|x, y| search::compare(*x, *y, &order));
    Ok(out)
}

// ---- the MLflow endpoints ----

async fn mlflow(
    State(t): State<Arc<Tracking>>,
    method: Method,
    Path(endpoint): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return TrackingError::invalid(format!("The request body is larger than the limit of {MAX_REQUEST_BYTES} bytes (1 MB)"))
                .into_response()
        }
    };
    let endpoint = endpoint.trim_end_matches('/');
    let t = match t.cx(&headers) {
        Ok(cx) => cx,
        Err(e) => return e.into_response(),
    };
    let t = &t;
    let result = match Args::parse(&uri, &body) {
        // The one answer that can be megabytes: its bytes are written directly (`search_runs`).
        Ok(a) if endpoint == "runs/search" => search_runs(t, &a)
            .await
            .map(|b| ([(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"))], b).into_response()),
        Ok(a) => dispatch(t, &method, endpoint, &a).await.map(|v| Json(v).into_response()),
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| {
        tracing::debug!(endpoint, error = %e, "mlflow request refused");
        e.into_response()
    })
}

async fn dispatch(t: &Cx<'_>, method: &Method, endpoint: &str, a: &Args) -> TResult<Value> {
    match endpoint {
        "experiments/create" => create_experiment(t, a).await,
        "experiments/get" => {
            let id = a.str("experiment_id")?;
            t.read(|s| Ok(json!({ "experiment": s.experiment(&id)?.to_json() }))).await
        }
        "experiments/get-by-name" => {
            let name = a.str("experiment_name")?;
            t.read(|s| match s.experiment_by_name(&name) {
                Some(e) => Ok(json!({ "experiment": e.to_json() })),
                None => Err(TrackingError::not_found(format!("Could not find experiment with name '{name}'"))),
            })
            .await
        }
        "experiments/search" | "experiments/list" => search_experiments(t, a).await,
        "experiments/update" => {
            let id = a.str("experiment_id")?;
            let new_name = a.str("new_name")?;
            check_key("new_name", &new_name, MAX_NAME_CHARS)?;
            t.submit(C::RenameExperiment { experiment_id: id, new_name }).await?;
            Ok(json!({}))
        }
        "experiments/delete" => {
            t.submit(C::DeleteExperiment { experiment_id: a.str("experiment_id")? }).await?;
            Ok(json!({}))
        }
        "experiments/restore" => {
            t.submit(C::RestoreExperiment { experiment_id: a.str("experiment_id")? }).await?;
            Ok(json!({}))
        }
        "experiments/set-experiment-tag" => {
            let (key, value) = (a.str("key")?, a.opt_str("value")?.unwrap_or_default());
            check_key("key", &key, MAX_NAME_CHARS)?;
            check_value("value", &value, MAX_EXPERIMENT_TAG_VALUE_CHARS)?;
            t.submit(C::SetExperimentTag { experiment_id: a.str("experiment_id")?, key, value }).await?;
            Ok(json!({}))
        }
        "runs/create" => create_run(t, a).await,
        "runs/update" => update_run(t, a).await,
        "runs/get" => {
            let id = run_id_of(a)?;
            t.read(|s| Ok(json!({ "run": s.run(&id)?.to_json() }))).await
        }
        "runs/delete" => {
            t.submit(C::DeleteRun { run_id: run_id_of(a)? }).await?;
            Ok(json!({}))
        }
        "runs/restore" => {
            t.submit(C::RestoreRun { run_id: run_id_of(a)? }).await?;
            Ok(json!({}))
        }
        "runs/set-tag" => {
            let (key, value) = (a.str("key")?, a.opt_str("value")?.unwrap_or_default());
            check_key("key", &key, MAX_NAME_CHARS)?;
            check_value("value", &value, MAX_TAG_VALUE_CHARS)?;
            t.submit(C::LogBatch { run_id: run_id_of(a)?, metrics: vec![], params: vec![], tags: vec![(key, value)] }).await?;
            Ok(json!({}))
        }
        "runs/delete-tag" => {
            let key = a.str("key")?;
            check_key("key", &key, MAX_NAME_CHARS)?;
            t.submit(C::DeleteRunTag { run_id: run_id_of(a)?, key }).await?;
            Ok(json!({}))
        }
        "runs/log-metric" => {
            let m = metric_of(a)?;
            t.submit(C::LogBatch { run_id: run_id_of(a)?, metrics: vec![m], params: vec![], tags: vec![] }).await?;
            Ok(json!({}))
        }
        "runs/log-parameter" => {
            let (key, value) = (a.str("key")?, a.opt_str("value")?.unwrap_or_default());
            check_key("key", &key, MAX_NAME_CHARS)?;
            check_value("value", &value, MAX_PARAM_VALUE_CHARS)?;
            t.submit(C::LogBatch { run_id: run_id_of(a)?, metrics: vec![], params: vec![(key, value)], tags: vec![] }).await?;
            Ok(json!({}))
        }
        "runs/log-batch" => {
            let cmd = log_batch_of(a)?;
            t.submit(cmd).await?;
            Ok(json!({}))
        }
        // "runs/search" is answered before dispatch (`mlflow`), as bytes.
        "metrics/get-history" => {
            let id = run_id_of(a)?;
            let key = a.str("metric_key")?;
            // From the points tree, under the state's read lock: the points of exactly the
            // entries the state has applied.
            let store = t.api.state.clone();
            let points = t
                .read(|s| {
                    s.run(&id)?;
                    store.points().history(&id, &key).map_err(|e| TrackingError::internal(e.to_string()))
                })
                .await?;
            let (points, token) = page(points, a, usize::MAX, usize::MAX)?;
            let points: Vec<Value> = points.iter().map(|p| state::metric_json(&key, p)).collect();
            Ok(with_token(json!({ "metrics": points }), token))
        }
        // MLflow 3's client looks for logged models of a run when it lists or downloads the
        // run's artifacts; mlp has no logged models yet, so the answer is always none.
        "logged-models/search" => {
            let ids = a.list("experiment_ids")?;
            if ids.len() > 1000 {
                return Err(TrackingError::invalid("At most 1000 experiment_ids"));
            }
            search::parse_filter::<search::NoFields>(&a.opt_str("filter")?.unwrap_or_default())?;
            Ok(json!({ "models": [] }))
        }
        // ---- model registry ----
        "registered-models/create" => {
            let name = a.str("name")?;
            check_key("name", &name, MAX_NAME_CHARS)?;
            let description = a.opt_str("description")?.unwrap_or_default();
            check_value("description", &description, MAX_DESCRIPTION_CHARS)?;
            let tags = a.key_values("tags", MAX_CREATE_TAGS, MAX_MODEL_TAG_VALUE_CHARS)?;
            t.submit(C::CreateRegisteredModel { name: name.clone(), description, tags }).await?;
            t.read(|s| Ok(json!({ "registered_model": s.model(&name)?.to_json() }))).await
        }
        "registered-models/get" => {
            let name = a.str("name")?;
            t.read(|s| Ok(json!({ "registered_model": s.model(&name)?.to_json() }))).await
        }
        "registered-models/search" => {
            let (models, token) = t
                .read(|s| {
                    let found = filter_and_sort(s.models.values(), a, &["name ASC"])?;
                    page(found.into_iter().map(|m| m.to_json()).collect(), a, 100, 1000)
                })
                .await?;
            Ok(with_token(json!({ "registered_models": models }), token))
        }
        "registered-models/rename" => {
            let (name, new_name) = (a.str("name")?, a.str("new_name")?);
            check_key("new_name", &new_name, MAX_NAME_CHARS)?;
            t.submit(C::RenameRegisteredModel { name, new_name: new_name.clone() }).await?;
            t.read(|s| Ok(json!({ "registered_model": s.model(&new_name)?.to_json() }))).await
        }
        "registered-models/update" => {
            let name = a.str("name")?;
            let description = a.opt_str("description")?.unwrap_or_default();
            check_value("description", &description, MAX_DESCRIPTION_CHARS)?;
            t.submit(C::UpdateRegisteredModel { name: name.clone(), description }).await?;
            t.read(|s| Ok(json!({ "registered_model": s.model(&name)?.to_json() }))).await
        }
        "registered-models/delete" => {
            t.submit(C::DeleteRegisteredModel { name: a.str("name")? }).await?;
            Ok(json!({}))
        }
        "registered-models/set-tag" => {
            let (key, value) = (a.str("key")?, a.opt_str("value")?.unwrap_or_default());
            check_key("key", &key, MAX_NAME_CHARS)?;
            check_value("value", &value, MAX_MODEL_TAG_VALUE_CHARS)?;
            t.submit(C::SetRegisteredModelTag { name: a.str("name")?, key, value }).await?;
            Ok(json!({}))
        }
        "registered-models/delete-tag" => {
            t.submit(C::DeleteRegisteredModelTag { name: a.str("name")?, key: a.str("key")? }).await?;
            Ok(json!({}))
        }
        "registered-models/get-latest-versions" => {
            let name = a.str("name")?;
            let stages = a.list("stages")?;
            t.read(|s| {
                let m = s.model(&name)?;
                let mut latest: std::collections::BTreeMap<&str, &state::ModelVersion> = Default::default();
                for v in m.versions.values() {
                    if stages.is_empty() || stages.iter().any(|st| st.eq_ignore_ascii_case(&v.current_stage)) {
                        latest.insert(&v.current_stage, v);
                    }
                }
                Ok(json!({ "model_versions": latest.values().map(|v| v.to_json(m)).collect::<Vec<_>>() }))
            })
            .await
        }
        "registered-models/alias" => alias(t, method, a).await,
        "model-versions/create" => {
            let name = a.str("name")?;
            let source = a.str("source")?;
            check_value("source", &source, MAX_URI_CHARS)?;
            let run_id = a.opt_str("run_id")?.unwrap_or_default();
            check_value("run_id", &run_id, 256)?;
            let run_link = a.opt_str("run_link")?.unwrap_or_default();
            check_value("run_link", &run_link, MAX_URI_CHARS)?;
            let description = a.opt_str("description")?.unwrap_or_default();
            check_value("description", &description, MAX_DESCRIPTION_CHARS)?;
            let tags = a.key_values("tags", MAX_CREATE_TAGS, MAX_MODEL_TAG_VALUE_CHARS)?;
            let request_id = uuid::Uuid::new_v4().to_string();
            let created =
                t.submit(C::CreateModelVersion { name: name.clone(), source, run_id, run_link, description, tags, request_id }).await?;
            let version: u64 =
                created.and_then(|v| v.parse().ok()).ok_or_else(|| TrackingError::internal("the new version's number was not returned"))?;
            t.read(|s| {
                let m = s.model(&name)?;
                Ok(json!({ "model_version": s.model_version(&name, version)?.to_json(m) }))
            })
            .await
        }
        "model-versions/get" => {
            let (name, version) = (a.str("name")?, a.version("version")?);
            t.read(|s| Ok(json!({ "model_version": s.model_version(&name, version)?.to_json(s.model(&name)?) }))).await
        }
        "model-versions/search" => {
            let (versions, token) = t
                .read(|s| {
                    let all: Vec<VersionOf<'_>> = s
                        .models
                        .values()
                        .flat_map(|m| m.versions.values().map(move |v| VersionOf { model: m, version: v, number: v.version.to_string() }))
                        .collect();
                    let found = filter_and_sort(all.iter(), a, &["name ASC", "version_number DESC"])?;
                    page(found.into_iter().map(|v| v.version.to_json(v.model)).collect(), a, 10_000, 200_000)
                })
                .await?;
            Ok(with_token(json!({ "model_versions": versions }), token))
        }
        "model-versions/update" => {
            let (name, version) = (a.str("name")?, a.version("version")?);
            let description = a.opt_str("description")?.unwrap_or_default();
            check_value("description", &description, MAX_DESCRIPTION_CHARS)?;
            t.submit(C::UpdateModelVersion { name: name.clone(), version, description }).await?;
            t.read(|s| Ok(json!({ "model_version": s.model_version(&name, version)?.to_json(s.model(&name)?) }))).await
        }
        "model-versions/delete" => {
            t.submit(C::DeleteModelVersion { name: a.str("name")?, version: a.version("version")? }).await?;
            Ok(json!({}))
        }
        "model-versions/set-tag" => {
            let (key, value) = (a.str("key")?, a.opt_str("value")?.unwrap_or_default());
            check_key("key", &key, MAX_NAME_CHARS)?;
            check_value("value", &value, MAX_MODEL_TAG_VALUE_CHARS)?;
            t.submit(C::SetModelVersionTag { name: a.str("name")?, version: a.version("version")?, key, value }).await?;
            Ok(json!({}))
        }
        "model-versions/delete-tag" => {
            t.submit(C::DeleteModelVersionTag { name: a.str("name")?, version: a.version("version")?, key: a.str("key")? }).await?;
            Ok(json!({}))
        }
        "model-versions/get-download-uri" => {
            let (name, version) = (a.str("name")?, a.version("version")?);
            t.read(|s| Ok(json!({ "artifact_uri": s.model_version(&name, version)?.source }))).await
        }
        other => Err(TrackingError::new(ErrorCode::EndpointNotFound, format!("No API endpoint /api/2.0/mlflow/{other} in mlp"))),
    }
}

async fn create_experiment(t: &Cx<'_>, a: &Args) -> TResult<Value> {
    let name = a.str("name")?;
    check_key("name", &name, MAX_NAME_CHARS)?;
    let artifact_location = a.opt_str("artifact_location")?.unwrap_or_default();
    check_value("artifact_location", &artifact_location, MAX_URI_CHARS)?;
    let tags = a.key_values("tags", MAX_CREATE_TAGS, MAX_EXPERIMENT_TAG_VALUE_CHARS)?;
    let experiment_id = new_experiment_id();
    t.submit(C::CreateExperiment { experiment_id: experiment_id.clone(), name, artifact_location, tags }).await?;
    Ok(json!({ "experiment_id": experiment_id }))
}

async fn search_experiments(t: &Cx<'_>, a: &Args) -> TResult<Value> {
    let keep = view_type(a, "view_type")?;
    let (experiments, token) = t
        .read(|s| {
            let found = filter_and_sort(
                s.experiments.values().filter(|e| keep(&e.lifecycle_stage)),
                a,
                &["creation_time DESC", "experiment_id ASC"],
            )?;
            page(found.into_iter().map(|e| e.to_json()).collect(), a, 1000, MAX_SEARCH_RESULTS)
        })
        .await?;
    Ok(with_token(json!({ "experiments": experiments }), token))
}

async fn create_run(t: &Cx<'_>, a: &Args) -> TResult<Value> {
    let experiment_id = a.opt_str("experiment_id")?.filter(|s| !s.is_empty()).unwrap_or_else(|| state::DEFAULT_EXPERIMENT_ID.into());
    check_id("experiment_id", &experiment_id)?;
    let user_id = a.opt_str("user_id")?.unwrap_or_default();
    check_value("user_id", &user_id, MAX_NAME_CHARS)?;
    let start_time = a.opt_i64("start_time")?.unwrap_or_else(now);
    let tags = a.key_values("tags", MAX_BATCH_TAGS, MAX_TAG_VALUE_CHARS)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let run_name = match a.opt_str("run_name")?.filter(|s| !s.is_empty()) {
        Some(n) => n,
        None => match tags.iter().find(|(k, v)| k == RUN_NAME_TAG && !v.is_empty()) {
            Some((_, v)) => v.clone(),
            None => format!("run-{}", &run_id[..8]),
        },
    };
    check_key("run_name", &run_name, MAX_NAME_CHARS)?;
    let tags = tags.into_iter().filter(|(k, _)| k != RUN_NAME_TAG).collect();
    t.submit(C::CreateRun { run_id: run_id.clone(), experiment_id, run_name, user_id, start_time, tags }).await?;
    t.read(|s| Ok(json!({ "run": s.run(&run_id)?.to_json() }))).await
}

async fn update_run(t: &Cx<'_>, a: &Args) -> TResult<Value> {
    let run_id = run_id_of(a)?;
    let status = a.opt_str("status")?.filter(|s| !s.is_empty());
    if let Some(s) = &status {
        if !state::RUN_STATUSES.contains(&s.as_str()) {
            return Err(TrackingError::invalid(format!("Invalid value '{s}' for parameter 'status': one of {:?}", state::RUN_STATUSES)));
        }
    }
    let end_time = a.opt_i64("end_time")?;
    let run_name = a.opt_str("run_name")?.filter(|s| !s.is_empty());
    if let Some(n) = &run_name {
        check_key("run_name", n, MAX_NAME_CHARS)?;
    }
    t.submit(C::UpdateRun { run_id: run_id.clone(), status, end_time, run_name }).await?;
    t.read(|s| Ok(json!({ "run_info": s.run(&run_id)?.info_json() }))).await
}

fn metric_of(a: &Args) -> TResult<Metric> {
    let key = a.str("key")?;
    check_key("key", &key, MAX_NAME_CHARS)?;
    let value = a.f64("value")?;
    let timestamp = a.opt_i64("timestamp")?.unwrap_or_else(now);
    let step = a.opt_i64("step")?.unwrap_or(0);
    Ok(Metric { key, value: MetricValue(value), timestamp, step })
}

fn log_batch_of(a: &Args) -> TResult<C> {
    let run_id = run_id_of(a)?;
    let metrics = a.objects("metrics")?;
    if metrics.len() > MAX_BATCH_METRICS {
        return Err(TrackingError::invalid(format!(
            "A batch logging request can contain at most {MAX_BATCH_METRICS} metrics. Got {} metrics.",
            metrics.len()
        )));
    }
    let params = a.key_values("params", MAX_BATCH_PARAMS, MAX_PARAM_VALUE_CHARS).map_err(|e| {
        if e.message.starts_with("A request may carry") {
            TrackingError::invalid(format!("A batch logging request can contain at most {MAX_BATCH_PARAMS} params."))
        } else {
            e
        }
    })?;
    let tags = a.key_values("tags", MAX_BATCH_TAGS, MAX_TAG_VALUE_CHARS).map_err(|e| {
        if e.message.starts_with("A request may carry") {
            TrackingError::invalid(format!("A batch logging request can contain at most {MAX_BATCH_TAGS} tags."))
        } else {
            e
        }
    })?;
    let total = metrics.len() + params.len() + tags.len();
    if total > MAX_BATCH_ITEMS {
        return Err(TrackingError::invalid(format!(
            "A batch logging request can contain at most {MAX_BATCH_ITEMS} total metrics, params and tags. Got {total}."
        )));
    }
    let metrics = metrics.iter().map(metric_of).collect::<TResult<Vec<_>>>()?;
    // Two values for one param in one batch: refused before Raft (apply checks it too).
    let mut seen = std::collections::BTreeMap::new();
    for (k, v) in &params {
        if seen.insert(k.as_str(), v.as_str()).is_some_and(|old| old != v) {
            return Err(TrackingError::invalid(format!("Duplicate parameter keys have been submitted: '{k}' with different values")));
        }
    }
    Ok(C::LogBatch { run_id, metrics, params, tags })
}

/// `runs/search`, answered as the JSON body's bytes: the page's runs are written straight from
/// the state (`state::RunOut`), and only the page's.
async fn search_runs(t: &Cx<'_>, a: &Args) -> TResult<Vec<u8>> {
    let experiment_ids = a.list("experiment_ids")?;
    if experiment_ids.len() > 1000 {
        return Err(TrackingError::invalid("At most 1000 experiment_ids"));
    }
    let keep = view_type(a, "run_view_type")?;
    t.read(|s| {
        let runs = s
            .runs
            .values()
            .filter(|r| experiment_ids.is_empty() || experiment_ids.contains(&r.experiment_id))
            .filter(|r| keep(&r.lifecycle_stage));
        let found = filter_and_sort(runs, a, &["attributes.start_time DESC", "attributes.run_id ASC"])?;
        let (runs, token) = page(found, a, 1000, MAX_SEARCH_RESULTS)?;
        #[derive(serde::Serialize)]
        struct Body<'a> {
            runs: Vec<state::RunOut<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            next_page_token: Option<String>,
        }
        let body = Body { runs: runs.into_iter().map(state::RunOut).collect(), next_page_token: token };
        serde_json::to_vec(&body).map_err(|e| TrackingError::internal(format!("writing the runs: {e}")))
    })
    .await
}

/// `registered-models/alias`: POST sets, GET reads (the version it points at), DELETE removes.
async fn alias(t: &Cx<'_>, method: &Method, a: &Args) -> TResult<Value> {
    let name = a.str("name")?;
    let alias = a.str("alias")?;
    check_key("alias", &alias, MAX_ALIAS_CHARS)?;
    if *method == Method::GET {
        return t
            .read(|s| {
                let m = s.model(&name)?;
                let v =
                    m.aliases.get(&alias).ok_or_else(|| TrackingError::not_found(format!("Registered model alias {alias} not found.")))?;
                Ok(json!({ "model_version": s.model_version(&name, *v)?.to_json(m) }))
            })
            .await;
    }
    if *method == Method::DELETE {
        t.submit(C::DeleteAlias { name, alias }).await?;
        return Ok(json!({}));
    }
    super::check_alias_not_reserved(&alias)?;
    let version = a.version("version")?;
    t.submit(C::SetAlias { name, alias, version }).await?;
    Ok(json!({}))
}

// ---- artifacts ----

/// `GET /api/2.0/mlflow-artifacts/artifacts?path=<dir>`: `{"files": [{"path", "is_dir",
/// "file_size"}]}` with each entry's name in `<dir>`; nothing (`{}`) when `<dir>` is absent.
/// Answered from the replicated index: every server lists every artifact.
async fn list_artifacts(State(t): State<Arc<Tracking>>, uri: Uri, headers: HeaderMap) -> Result<Response, TrackingError> {
    let t = t.cx(&headers)?;
    let a = Args::parse(&uri, &[])?;
    let path = a.opt_str("path")?.unwrap_or_default();
    let files = t.read(|s| Ok(s.artifacts.list(&path)?)).await?;
    if files.is_empty() {
        return Ok(Json(json!({})).into_response());
    }
    Ok(Json(json!({ "files": files })).into_response())
}

/// `GET /api/2.0/mlflow-artifacts/artifacts/<path>`: the file's bytes (fetched from a peer
/// first when this server lacks the blob).
async fn download_artifact(
    State(t): State<Arc<Tracking>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Response, TrackingError> {
    let t = t.cx(&headers)?;
    let pointer = t.read(|s| Ok(s.artifacts.get(&path)?.clone())).await?;
    let stream = t.artifacts.open(&pointer).await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(pointer.size));
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// `PUT /api/2.0/mlflow-artifacts/artifacts/<path>`: stores the body at `<path>`. The blob is
/// on a quorum of servers (or in the object store) before the index entry commits through
/// Raft, and the entry is committed before the answer.
async fn upload_artifact(
    State(t): State<Arc<Tracking>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, TrackingError> {
    let t = t.cx(&headers)?;
    let pointer = t.artifacts.store(&t.ns, &path, body.into_data_stream()).await?;
    t.submit(C::PutArtifact { path: path.clone(), sha256: pointer.sha256.clone(), size: pointer.size }).await?;
    tracing::debug!(path, sha256 = pointer.sha256, size = pointer.size, "artifact stored");
    Ok(Json(json!({})).into_response())
}

/// `DELETE /api/2.0/mlflow-artifacts/artifacts/<path>`: the file, or everything under the
/// directory; blobs nothing names any more go with the next GC sweep.
async fn delete_artifact(State(t): State<Arc<Tracking>>, Path(path): Path<String>, headers: HeaderMap) -> Result<Response, TrackingError> {
    let t = t.cx(&headers)?;
    super::artifacts::clean_path(&path)?;
    t.submit(C::DeleteArtifacts { path }).await?;
    Ok(Json(json!({})).into_response())
}
