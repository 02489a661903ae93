//! Which certificate role each gRPC method needs, enforced in one tower layer ([`AuthorizeLayer`])
//! on every gRPC listener, before any service sees the request.
//!
//! On a server ([`server_rule`]): the Raft RPCs and the cluster-internal `ClusterService`
//! methods (`Info`, `Join`, `Forward`, `ReadIndex`, `TriggerElect`) need the server role;
//! `AgentService` the agent role; everything else (the public API, the operator RPCs of
//! `ClusterService`) any certificate the CA signed. On an agent ([`agent_rule`]): its
//! `ClientService` (logs, `alloc exec`, proxied by the servers) needs the server role. A
//! server certificate satisfies every role. Without TLS the layer lets everything through.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::net::PeerInfo;
use crate::{satisfies, Role};

/// What a method asks of the caller's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any certificate the CA signed.
    AnyCert,
    /// A certificate with this role (or the server role).
    Role(Role),
}

/// The server's table, by gRPC path (`/package.Service/Method`).
pub fn server_rule(path: &str) -> Need {
    let (service, method) = split(path);
    match service {
        "mlp.v1.RaftService" => Need::Role(Role::Server),
        "mlp.v1.ClusterService" => match method {
            "Info" | "Join" | "Forward" | "ReadIndex" | "TriggerElect" => Need::Role(Role::Server),
            // ListPeers, RemovePeer, TransferLeadership, SnapshotSave, SnapshotRestore: the
            // operator's (any certificate today; ACLs narrow them).
            _ => Need::AnyCert,
        },
        "mlp.v1.AgentService" => Need::Role(Role::Agent),
        _ => Need::AnyCert,
    }
}

/// The agent listener's table: only servers call it (they proxy logs and exec sessions).
pub fn agent_rule(_path: &str) -> Need {
    Need::Role(Role::Server)
}

fn split(path: &str) -> (&str, &str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

/// Whether a peer may call `path` under `rule`: `Ok` or the reason it may not.
pub fn check(rule: fn(&str) -> Need, path: &str, peer: Option<&PeerInfo>) -> Result<(), String> {
    let Some(roles) = peer.and_then(|p| p.roles.as_ref()) else {
        return Err(format!("{path}: the connection is not mutual TLS"));
    };
    match rule(path) {
        Need::AnyCert => Ok(()),
        Need::Role(r) if satisfies(roles, r) => Ok(()),
        Need::Role(r) => {
            let held = if roles.is_empty() { "no role".to_string() } else { roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ") };
            Err(format!("{path} needs a certificate with the {r} role ({}); the caller's has {held}", r.dns_name()))
        }
    }
}

/// The layer; `enabled` is false on a plaintext listener (everything passes).
#[derive(Clone, Copy)]
pub struct AuthorizeLayer {
    rule: fn(&str) -> Need,
    enabled: bool,
}

impl AuthorizeLayer {
    pub fn new(rule: fn(&str) -> Need, enabled: bool) -> Self {
        AuthorizeLayer { rule, enabled }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, rule: self.rule, enabled: self.enabled }
    }
}

/// The service of [`AuthorizeLayer`]: a refused call is answered `PermissionDenied` without
/// reaching the inner service.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    rule: fn(&str) -> Need,
    enabled: bool,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::BoxBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.enabled {
            if let Err(why) = check(self.rule, req.uri().path(), req.extensions().get::<PeerInfo>()) {
                let remote = req.extensions().get::<PeerInfo>().and_then(|p| p.remote_addr);
                tracing::warn!(remote = ?remote, reason = %why, "request refused");
                let resp = tonic::Status::permission_denied(why).into_http();
                return Box::pin(async move { Ok(resp) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(roles: &[Role]) -> PeerInfo {
        PeerInfo { remote_addr: None, roles: Some(roles.to_vec()) }
    }

    #[test]
    fn server_only_methods_need_the_server_role() {
        for path in [
            "/mlp.v1.RaftService/AppendEntries",
            "/mlp.v1.RaftService/Vote",
            "/mlp.v1.RaftService/InstallSnapshot",
            "/mlp.v1.RaftService/PutBlob",
            "/mlp.v1.RaftService/GetBlob",
            "/mlp.v1.ClusterService/Join",
            "/mlp.v1.ClusterService/Forward",
            "/mlp.v1.ClusterService/ReadIndex",
            "/mlp.v1.ClusterService/Info",
            "/mlp.v1.ClusterService/TriggerElect",
        ] {
            assert!(check(server_rule, path, Some(&peer(&[Role::Server]))).is_ok(), "{path}");
            assert!(check(server_rule, path, Some(&peer(&[Role::Client]))).is_err(), "{path}");
            assert!(check(server_rule, path, Some(&peer(&[Role::Agent]))).is_err(), "{path}");
            assert!(check(server_rule, path, Some(&peer(&[]))).is_err(), "{path}");
        }
    }

    #[test]
    fn agent_methods_need_the_agent_role_and_the_api_any_certificate() {
        let p = "/mlp.v1.AgentService/Register";
        assert!(check(server_rule, p, Some(&peer(&[Role::Agent]))).is_ok());
        assert!(check(server_rule, p, Some(&peer(&[Role::Server]))).is_ok());
        assert!(check(server_rule, p, Some(&peer(&[Role::Client]))).is_err());
        for p in ["/mlp.v1.JobService/Register", "/mlp.v1.ClusterService/ListPeers", "/mlp.v1.ClusterService/SnapshotSave"] {
            assert!(check(server_rule, p, Some(&peer(&[]))).is_ok(), "{p}");
        }
        // No TLS identity at all on a TLS listener: refused.
        assert!(check(server_rule, "/mlp.v1.JobService/List", None).is_err());
        assert!(check(server_rule, "/mlp.v1.JobService/List", Some(&PeerInfo::default())).is_err());
    }

    #[test]
    fn the_agent_listener_serves_servers_only() {
        let p = "/mlp.v1.ClientService/Exec";
        assert!(check(agent_rule, p, Some(&peer(&[Role::Server]))).is_ok());
        assert!(check(agent_rule, p, Some(&peer(&[Role::Client]))).is_err());
        assert!(check(agent_rule, p, Some(&peer(&[Role::Agent]))).is_err());
    }
}
