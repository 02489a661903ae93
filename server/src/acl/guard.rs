//! Where the table meets requests: `Guard::check` (token → `Authz`, need → allowed or denied,
//! audit), the gRPC layer around every service of a server, the HTTP middleware around every
//! route, and the narrowing helpers handlers call once they know an object's namespace.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::audit::{rfc3339, Audit, Record};
use super::policy::Capability;
use super::rules::{self, Need};
use super::Authz;
use crate::raft::node::RaftNode;
use crate::state::StateHandle;

/// A refused request: gRPC `PermissionDenied`, HTTP 403.
#[derive(Debug, Clone, thiserror::Error)]
#[error("permission denied: {0}")]
pub struct Denied(pub String);

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        tonic::Status::permission_denied(d.to_string())
    }
}

/// The ACL checks of one server.
pub struct Guard {
    /// `--acl-enabled`: without it nothing is checked.
    pub enabled: bool,
    pub audit: Audit,
    state: Arc<StateHandle>,
    raft: Arc<RaftNode>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("enabled", &self.enabled).finish()
    }
}

impl Guard {
    pub fn new(enabled: bool, audit: Audit, state: Arc<StateHandle>, raft: Arc<RaftNode>) -> Guard {
        Guard { enabled, audit, state, raft }
    }

    /// The token of `secret`, valid now. A secret this server does not know may be a token
    /// just created through another server: after a linearizable barrier it is looked up
    /// once more.
    pub async fn resolve(&self, secret: Option<&str>) -> Result<Authz, Denied> {
        let Some(secret) = secret.map(str::trim).filter(|s| !s.is_empty()) else {
            return Err(Denied("no ACL token: set MLP_TOKEN (gRPC metadata x-mlp-token, HTTP header X-MLP-Token)".into()));
        };
        if secret.len() > 128 {
            return Err(Denied("the ACL token is not valid".into()));
        }
        let hash = super::state::hash_secret(secret);
        if let Some(a) = self.lookup(&hash)? {
            return Ok(a);
        }
        if self.raft.linearizable_read().await.is_ok() {
            if let Some(a) = self.lookup(&hash)? {
                return Ok(a);
            }
        }
        Err(Denied("the ACL token is not valid".into()))
    }

    fn lookup(&self, hash: &str) -> Result<Option<Authz>, Denied> {
        let st = self.state.read();
        let Some(t) = st.acl.tokens.get(hash) else { return Ok(None) };
        if t.expired(crate::leader::now_ms()) {
            return Err(Denied(format!("the ACL token {} expired", t.accessor_id)));
        }
        let policies = t.policies.iter().filter_map(|p| st.acl.policies.get(p).map(|p| p.parsed.clone())).collect();
        Ok(Some(Authz { accessor: t.accessor_id.clone(), name: t.name.clone(), management: t.management, policies: Arc::new(policies) }))
    }

    /// Checks a request against its need (`None`: an endpoint the table does not know).
    /// `Ok(None)`: nothing to check (ACLs off, or an endpoint that needs no token).
    pub async fn check(&self, transport: &str, operation: &str, need: Option<Need>, secret: Option<&str>) -> Result<Option<Authz>, Denied> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(need) = need else {
            let d = Denied(format!("{operation} is not an API endpoint that ACLs allow"));
            self.record(transport, operation, "", None, "denied", &d.0);
            return Err(d);
        };
        if need == Need::None {
            return Ok(None);
        }
        let authz = match self.resolve(secret).await {
            Ok(a) => a,
            Err(d) => {
                self.record(transport, operation, "", None, "denied", &d.0);
                return Err(d);
            }
        };
        if !authz.satisfies(need) {
            let d = Denied(format!("token {} lacks {}", authz.accessor, describe(need)));
            self.record(transport, operation, "", Some(&authz), "denied", &d.0);
            return Err(d);
        }
        if need.privileged() {
            self.record(transport, operation, "", Some(&authz), "allowed", &describe(need));
        }
        Ok(Some(authz))
    }

    /// Narrows a namespace need to the object's namespace: a handler calls this with the
    /// `Authz` the guard put in the request (absent: ACLs off or no check needed).
    pub fn require_ns(&self, authz: Option<&Authz>, cap: Capability, namespace: &str, operation: &str, target: &str) -> Result<(), Denied> {
        let Some(a) = authz else { return Ok(()) };
        let ns = if namespace.is_empty() { "default" } else { namespace };
        if a.allows_ns(cap, ns) {
            return Ok(());
        }
        let d = Denied(format!("token {} lacks {cap} in namespace {ns:?}", a.accessor));
        self.record("api", operation, target, Some(a), "denied", &d.0);
        Err(d)
    }

    /// Whether job env is shown to `authz` in `namespace` (always with ACLs off).
    pub fn shows_env(&self, authz: Option<&Authz>, namespace: &str) -> bool {
        authz.is_none_or(|a| a.allows_ns(Capability::ReadJobEnv, if namespace.is_empty() { "default" } else { namespace }))
    }

    /// Writes an audit record (only with ACLs on).
    pub fn record(&self, transport: &str, operation: &str, target: &str, authz: Option<&Authz>, result: &str, reason: &str) {
        if !self.enabled {
            return;
        }
        self.audit.record(&Record {
            time: rfc3339(crate::leader::now_ms()),
            accessor: authz.map_or("anonymous", |a| a.accessor.as_str()),
            transport,
            operation,
            target,
            result,
            reason,
        });
    }
}

fn describe(need: Need) -> String {
    match need {
        Need::None => "nothing".into(),
        Need::Token => "a valid token".into(),
        Need::Ns(c) => format!("capability {c}"),
        Need::Node(a) => format!("node {}", a.as_str()),
        Need::Operator(a) => format!("operator {}", a.as_str()),
        Need::Acl(a) => format!("acl {}", a.as_str()),
        Need::Management => "a management token".into(),
    }
}

// ---- gRPC ----

/// The tower layer put around all of a server's gRPC services.
#[derive(Clone)]
pub struct AclLayer {
    pub guard: Arc<Guard>,
}

impl<S> tower_layer::Layer<S> for AclLayer {
    type Service = AclGrpc<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AclGrpc { inner, guard: self.guard.clone() }
    }
}

/// The service [`AclLayer`] makes.
#[derive(Clone)]
pub struct AclGrpc<S> {
    inner: S,
    guard: Arc<Guard>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower_service::Service<http::Request<B>> for AclGrpc<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::BoxBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the new one waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            if !guard.enabled {
                return inner.call(req).await;
            }
            let path = req.uri().path().to_string();
            let secret = req.headers().get(super::TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
            match guard.check("grpc", &path, rules::grpc(&path), secret.as_deref()).await {
                Ok(Some(authz)) => {
                    req.extensions_mut().insert(authz);
                    inner.call(req).await
                }
                Ok(None) => inner.call(req).await,
                Err(d) => Ok(tonic::Status::from(d).into_http()),
            }
        })
    }
}

// ---- HTTP ----

/// The middleware on every HTTP route (mlp's and MLflow's): the table's need, with a
/// namespace need checked in the request's `namespace` query parameter (default `default`;
/// MLflow's routes are in `default`). The handler may narrow further (a job's own namespace).
pub async fn http_middleware(
    axum::extract::State(guard): axum::extract::State<Arc<Guard>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !guard.enabled {
        return next.run(req).await;
    }
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let operation = format!("{method} {path}");
    let need = rules::http(&method, route.as_deref(), &path);
    let secret = http_secret(req.headers());
    let denied = |d: Denied| (axum::http::StatusCode::FORBIDDEN, axum::Json(serde_json::json!({ "error": d.to_string() }))).into_response();
    match guard.check("http", &operation, need, secret.as_deref()).await {
        Ok(Some(authz)) => {
            if let Some(Need::Ns(cap)) = need {
                // MLflow's routes name their namespace as MLflow names a workspace.
                let mlflow = route.as_deref().is_some_and(|r| r.starts_with("/api/"));
                let ns = if mlflow {
                    match crate::tracking::http::workspace_of(req.headers()) {
                        Ok(ns) => ns,
                        Err(e) => return e.into_response(),
                    }
                } else {
                    query_namespace(req.uri().query())
                };
                if let Err(d) = guard.require_ns(Some(&authz), cap, &ns, &operation, "") {
                    return denied(d);
                }
            }
            req.extensions_mut().insert(authz);
            next.run(req).await
        }
        Ok(None) => next.run(req).await,
        Err(d) => denied(d),
    }
}

/// A request's token: its `X-MLP-Token` header, else an `Authorization: Bearer` one (what
/// MLflow's client sends from `MLFLOW_TRACKING_TOKEN`, and Nomad's clients too).
fn http_secret(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(super::TOKEN_HEADER) {
        return v.to_str().ok().map(str::to_string);
    }
    let auth = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string()).filter(|t| !t.is_empty())
}

/// The `namespace` query parameter (`default` when absent or empty).
fn query_namespace(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "namespace")
        .map(|(_, v)| v.replace("%2A", "*").replace("%2a", "*"))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_comes_from_x_mlp_token_or_a_bearer_authorization() {
        use axum::http::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        assert_eq!(super::http_secret(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer  abc "));
        assert_eq!(super::http_secret(&h).as_deref(), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert_eq!(super::http_secret(&h), None, "basic credentials are not a token");
        h.insert("x-mlp-token", HeaderValue::from_static("xyz"));
        assert_eq!(super::http_secret(&h).as_deref(), Some("xyz"), "X-MLP-Token wins");
    }

    #[test]
    fn namespace_from_the_query() {
        assert_eq!(super::query_namespace(None), "default");
        assert_eq!(super::query_namespace(Some("stale=true&namespace=team-a")), "team-a");
        assert_eq!(super::query_namespace(Some("namespace=")), "default");
        assert_eq!(super::query_namespace(Some("namespace=%2A")), "*");
    }
}
