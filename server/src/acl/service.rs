//! `AclService`: bootstrap, policies and tokens. What each call needs is in `rules.rs`; the
//! guard checked it before these run. Secrets and accessor ids are UUIDv4s made here; only the
//! secret's hash is committed.

use std::sync::Arc;

use mlp_proto::v1::acl_service_server::AclService;
use mlp_proto::v1::*;
use tonic::{Request, Response, Status};

use super::policy::{self, Access};
use super::state::{hash_secret, AclCommand, StoredPolicy, StoredToken};
use super::{Area, Authz};
use crate::api::{Api, ApiError};
use crate::leader::now_ms;
use crate::state::{Command, Request as Entry};

type GrpcResult<T> = Result<Response<T>, Status>;

/// The longest token TTL accepted (10 years).
pub const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3_600_000;
/// Policies one token may name.
pub const MAX_TOKEN_POLICIES: usize = 64;

#[derive(Clone)]
pub struct AclApi {
    pub api: Arc<Api>,
}

#[allow(clippy::result_large_err)] // tonic's Status, as every handler returns
fn enabled(api: &Api) -> Result<(), Status> {
    if api.acl.enabled {
        Ok(())
    } else {
        Err(Status::failed_precondition("ACLs are not enabled on this server (start it with --acl-enabled)"))
    }
}

impl AclApi {
    async fn commit(&self, cmd: AclCommand) -> Result<u64, Status> {
        let resp = self.api.raft.submit(Entry { now_ms: now_ms(), command: Command::Acl(cmd) }).await.map_err(ApiError::from)?;
        Ok(resp.index)
    }

    async fn read(&self) -> Result<(), Status> {
        self.api.read_barrier(false).await.map_err(Status::from)
    }
}

fn new_token(name: &str, policies: Vec<String>, ttl_ms: u64, management: bool) -> (StoredToken, String) {
    let secret = uuid::Uuid::new_v4().hyphenated().to_string();
    let now = now_ms();
    let token = StoredToken {
        accessor_id: uuid::Uuid::new_v4().hyphenated().to_string(),
        secret_hash: hash_secret(&secret),
        name: name.to_string(),
        management,
        policies,
        create_time_ms: now,
        expiration_time_ms: if ttl_ms == 0 { 0 } else { now.saturating_add(ttl_ms) },
        create_index: 0,
    };
    (token, secret)
}

#[allow(clippy::result_large_err)] // tonic's Status, as every handler returns
fn check_text(field: &str, v: &str, max: usize) -> Result<(), Status> {
    if v.len() > max || v.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("{field}: at most {max} bytes without control characters")));
    }
    Ok(())
}

#[tonic::async_trait]
impl AclService for AclApi {
    async fn bootstrap(&self, _req: Request<AclBootstrapRequest>) -> GrpcResult<AclBootstrapResponse> {
        enabled(&self.api)?;
        self.read().await?;
        let refused = || Status::failed_precondition("ACL bootstrap already done: the cluster has a management token");
        if self.api.state.read().acl.bootstrapped {
            self.api.acl.record("grpc", "acl bootstrap", "", None, "denied", "already bootstrapped");
            return Err(refused());
        }
        let (token, secret) = new_token("Bootstrap Token", Vec::new(), 0, true);
        match self.commit(AclCommand::Bootstrap { token: token.clone() }).await {
            Ok(_) => {}
            Err(s) if s.message().contains("already done") => {
                self.api.acl.record("grpc", "acl bootstrap", "", None, "denied", "already bootstrapped");
                return Err(refused());
            }
            Err(s) => return Err(s),
        }
        let stored = self.api.state.read().acl.tokens.get(&token.secret_hash).cloned().unwrap_or(token);
        let authz = Authz { accessor: stored.accessor_id.clone(), name: stored.name.clone(), management: true, policies: Arc::default() };
        self.api.acl.record("grpc", "acl bootstrap", &stored.accessor_id, Some(&authz), "allowed", "first management token");
        let mut view = stored.view();
        view.secret_id = secret;
        Ok(Response::new(AclBootstrapResponse { token: Some(view) }))
    }

    async fn policy_apply(&self, req: Request<AclPolicyApplyRequest>) -> GrpcResult<AclPolicyApplyResponse> {
        enabled(&self.api)?;
        let req = req.into_inner();
        let p = req.policy.ok_or_else(|| Status::invalid_argument("policy is required"))?;
        policy::check_name(&p.name).map_err(Status::invalid_argument)?;
        check_text("policy.description", &p.description, 1024)?;
        let file = if req.file_name.is_empty() { "<request>".to_string() } else { req.file_name.chars().take(256).collect() };
        let parsed = policy::parse(&p.rules, &file).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let stored = StoredPolicy { name: p.name, description: p.description, rules: p.rules, parsed, create_index: 0, modify_index: 0 };
        let index = self.commit(AclCommand::UpsertPolicy { policy: stored }).await?;
        Ok(Response::new(AclPolicyApplyResponse { index }))
    }

    async fn policy_list(&self, _req: Request<AclPolicyListRequest>) -> GrpcResult<AclPolicyListResponse> {
        enabled(&self.api)?;
        self.read().await?;
        let st = self.api.state.read();
        Ok(Response::new(AclPolicyListResponse { policies: st.acl.policies.values().map(StoredPolicy::view).collect(), index: st.index }))
    }

    async fn policy_get(&self, req: Request<AclPolicyGetRequest>) -> GrpcResult<AclPolicyGetResponse> {
        enabled(&self.api)?;
        self.read().await?;
        let name = req.into_inner().name;
        let st = self.api.state.read();
        let p = st.acl.policies.get(&name).ok_or_else(|| Status::not_found(format!("no ACL policy {name:?}")))?;
        Ok(Response::new(AclPolicyGetResponse { policy: Some(p.view()), index: st.index }))
    }

    async fn policy_delete(&self, req: Request<AclPolicyDeleteRequest>) -> GrpcResult<AclPolicyDeleteResponse> {
        enabled(&self.api)?;
        let name = req.into_inner().name;
        policy::check_name(&name).map_err(Status::invalid_argument)?;
        let index = self.commit(AclCommand::DeletePolicy { name }).await.map_err(not_found_if_missing)?;
        Ok(Response::new(AclPolicyDeleteResponse { index }))
    }

    async fn token_create(&self, req: Request<AclTokenCreateRequest>) -> GrpcResult<AclTokenCreateResponse> {
        enabled(&self.api)?;
        let req = req.into_inner();
        check_text("name", &req.name, 256)?;
        if req.policies.is_empty() {
            return Err(Status::invalid_argument("policies: name at least one policy (-policy NAME)"));
        }
        if req.policies.len() > MAX_TOKEN_POLICIES {
            return Err(Status::invalid_argument(format!("policies: at most {MAX_TOKEN_POLICIES}")));
        }
        for (i, p) in req.policies.iter().enumerate() {
            policy::check_name(p).map_err(|e| Status::invalid_argument(format!("policies[{i}]: {e}")))?;
        }
        if req.ttl_ms > MAX_TTL_MS {
            return Err(Status::invalid_argument(format!("ttl_ms: {} is more than ten years", req.ttl_ms)));
        }
        let mut policies = req.policies;
        policies.sort();
        policies.dedup();
        let (token, secret) = new_token(&req.name, policies, req.ttl_ms, false);
        self.commit(AclCommand::CreateToken { token: token.clone() }).await.map_err(not_found_if_missing)?;
        let stored = self.api.state.read().acl.tokens.get(&token.secret_hash).cloned().unwrap_or(token);
        let mut view = stored.view();
        view.secret_id = secret;
        Ok(Response::new(AclTokenCreateResponse { token: Some(view) }))
    }

    async fn token_list(&self, _req: Request<AclTokenListRequest>) -> GrpcResult<AclTokenListResponse> {
        enabled(&self.api)?;
        self.read().await?;
        let st = self.api.state.read();
        let mut tokens: Vec<AclToken> = st.acl.tokens.values().map(StoredToken::view).collect();
        tokens.sort_by_key(|t| t.create_index);
        Ok(Response::new(AclTokenListResponse { tokens, index: st.index }))
    }

    async fn token_get(&self, req: Request<AclTokenGetRequest>) -> GrpcResult<AclTokenGetResponse> {
        enabled(&self.api)?;
        let authz = req.extensions().get::<Authz>().cloned();
        let mut accessor = req.into_inner().accessor_id;
        if let Some(a) = &authz {
            if accessor.is_empty() {
                accessor = a.accessor.clone();
            }
            if accessor != a.accessor && !a.allows_area(Area::Acl, Access::Read) {
                let d = super::guard::Denied(format!("token {} lacks acl read", a.accessor));
                self.api.acl.record("grpc", "acl token info", &accessor, Some(a), "denied", &d.0);
                return Err(d.into());
            }
        }
        self.read().await?;
        let st = self.api.state.read();
        let t =
            st.acl.token_by_accessor(&accessor).ok_or_else(|| Status::not_found(format!("no ACL token with accessor id {accessor:?}")))?;
        Ok(Response::new(AclTokenGetResponse { token: Some(t.view()), index: st.index }))
    }

    async fn token_delete(&self, req: Request<AclTokenDeleteRequest>) -> GrpcResult<AclTokenDeleteResponse> {
        enabled(&self.api)?;
        let accessor_id = req.into_inner().accessor_id;
        check_text("accessor_id", &accessor_id, 128)?;
        let index = self.commit(AclCommand::DeleteToken { accessor_id }).await.map_err(not_found_if_missing)?;
        Ok(Response::new(AclTokenDeleteResponse { index }))
    }
}

/// `apply`'s "no ACL policy/token ..." refusals are NotFound, not InvalidArgument.
fn not_found_if_missing(s: Status) -> Status {
    if s.code() == tonic::Code::InvalidArgument && s.message().starts_with("no ACL ") {
        Status::not_found(s.message().to_string())
    } else {
        s
    }
}
