//! Namespaces and quotas (issue 15 §5): names, validation, the rules of deletion, and the quota
//! file (HCL). The replicated objects live in `ClusterState::namespaces`; the scheduler's side
//! is `scheduler::quota`.
//!
//! A quota file:
//!
//! ```hcl
//! cpu_mhz    = 64000
//! memory_mib = 262144
//! gpus       = 8                 # whole GPUs; or gpu_milli = 8500 (thousandths)
//! gpu "A100-SXM4-80GB" {
//!   gpus = 4                     # or gpu_milli
//! }
//! ```

use std::collections::BTreeSet;

use hcl_edit::expr::Expression;
use hcl_edit::structure::{Body, Structure};
use mlp_proto::consts::{eval_status, job_status};
use mlp_proto::v1::{GpuModelQuota, Namespace, QuotaSpec};

use crate::acl::policy::{start, Parser, PolicyError};
use crate::state::ClusterState;

/// The namespace every cluster has; it cannot be deleted.
pub const DEFAULT: &str = "default";
/// Longest description.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// Most per-model GPU limits in one quota.
pub const MAX_GPU_MODELS: usize = 64;
/// Largest value of any limit (far above any cluster; keeps sums away from overflow).
pub const MAX_LIMIT: u64 = 1 << 48;
/// Largest quota file.
pub const MAX_QUOTA_FILE_BYTES: usize = 64 * 1024;

/// The error for a job registered into a namespace that does not exist.
pub fn missing(name: &str) -> String {
    format!("namespace {name:?} does not exist; create it first with `mlp namespace apply {name}`")
}

/// A namespace name is a DNS label: 1 to 63 characters of lower-case letters, digits and '-',
/// starting and ending with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "namespace name {name:?}: must be a DNS label: 1 to 63 characters of lower-case letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Every rule a namespace obeys; the message names the field.
pub fn validate(ns: &Namespace) -> Result<(), String> {
    check_name(&ns.name)?;
    if ns.description.len() > MAX_DESCRIPTION_BYTES || ns.description.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(format!("description: at most {MAX_DESCRIPTION_BYTES} bytes without control characters"));
    }
    if let Some(q) = &ns.quota {
        validate_quota(q)?;
    }
    Ok(())
}

/// The rules of a quota spec; the message names the field (`quota.gpu_models[1].model: ...`).
pub fn validate_quota(q: &QuotaSpec) -> Result<(), String> {
    let limit = |field: &str, v: Option<u64>| match v {
        Some(v) if v > MAX_LIMIT => Err(format!("quota.{field}: {v} is above the largest limit {MAX_LIMIT}")),
        _ => Ok(()),
    };
    limit("cpu_mhz", q.cpu_mhz)?;
    limit("memory_mib", q.memory_mib)?;
    limit("gpus", q.gpus)?;
    limit("gpu_milli", q.gpu_milli)?;
    if q.gpus.is_some() && q.gpu_milli.is_some() {
        return Err("quota: set gpus (whole GPUs) or gpu_milli (thousandths), not both".to_string());
    }
    if q.gpu_models.len() > MAX_GPU_MODELS {
        return Err(format!("quota.gpu_models: {} limits; at most {MAX_GPU_MODELS}", q.gpu_models.len()));
    }
    let mut seen = BTreeSet::new();
    for (i, m) in q.gpu_models.iter().enumerate() {
        if m.model.trim().is_empty() || m.model.len() > 256 || m.model.chars().any(char::is_control) {
            return Err(format!("quota.gpu_models[{i}].model: must be 1 to 256 bytes without control characters"));
        }
        if !seen.insert(m.model.as_str()) {
            return Err(format!("quota.gpu_models[{i}].model: {:?} appears twice", m.model));
        }
        match m.gpu_milli {
            None => return Err(format!("quota.gpu_models[{i}].gpu_milli: required (the limit of model {:?})", m.model)),
            Some(v) => limit(&format!("gpu_models[{i}].gpu_milli"), Some(v))?,
        }
    }
    if let Some(b) = &q.borrow {
        limit("borrow.cpu_mhz", b.cpu_mhz)?;
        limit("borrow.memory_mib", b.memory_mib)?;
        limit("borrow.gpus", b.gpus)?;
        limit("borrow.gpu_milli", b.gpu_milli)?;
        if b.gpus.is_some() && b.gpu_milli.is_some() {
            return Err("quota.borrow: set gpus (whole GPUs) or gpu_milli (thousandths), not both".to_string());
        }
        // Borrowing beyond a dimension the quota does not limit means nothing: refused, so that
        // a typo does not read as a limit.
        let unlimited = |field: &str, set: bool, limited: bool| {
            if set && !limited {
                Err(format!("quota.borrow.{field}: the quota sets no {field} limit to borrow beyond"))
            } else {
                Ok(())
            }
        };
        unlimited("cpu_mhz", b.cpu_mhz.is_some(), q.cpu_mhz.is_some())?;
        unlimited("memory_mib", b.memory_mib.is_some(), q.memory_mib.is_some())?;
        let gpu_field = if b.gpus.is_some() { "gpus" } else { "gpu_milli" };
        unlimited(gpu_field, b.gpus.is_some() || b.gpu_milli.is_some(), q.gpus.is_some() || q.gpu_milli.is_some())?;
    }
    Ok(())
}

/// Whether `name` may be deleted now: not `default`, known, and without jobs that are not dead.
pub fn deletable(st: &ClusterState, name: &str) -> Result<(), String> {
    if name == DEFAULT {
        return Err("namespace \"default\" cannot be deleted".to_string());
    }
    if !st.namespaces.contains_key(name) {
        return Err(format!("namespace {name:?} not found"));
    }
    let live: Vec<&str> =
        crate::scheduler::quota::jobs_in(st, name).filter(|j| j.status != job_status::DEAD).map(|j| j.id.as_str()).collect();
    if !live.is_empty() {
        let shown: Vec<&str> = live.iter().take(5).copied().collect();
        let more = if live.len() > shown.len() { format!(" and {} more", live.len() - shown.len()) } else { String::new() };
        return Err(format!(
            "namespace {name:?} has {} job(s) that are not dead ({}{more}); stop them first",
            live.len(),
            shown.join(", ")
        ));
    }
    // Its MLflow workspace: results people keep are never dropped with a namespace.
    if let Some(t) = st.tracking_ns.get(name) {
        use crate::tracking::state::{DEFAULT_EXPERIMENT_ID, LIFECYCLE_ACTIVE};
        let active = |id: &str| t.experiments.get(id).is_some_and(|e| e.lifecycle_stage == LIFECYCLE_ACTIVE);
        // Runs that are neither deleted nor in a deleted experiment.
        let runs = t.runs.values().filter(|r| r.lifecycle_stage == LIFECYCLE_ACTIVE && active(&r.experiment_id)).count();
        // Active experiments, the Default one only when it holds runs.
        let experiments = t
            .experiments
            .values()
            .filter(|e| e.lifecycle_stage == LIFECYCLE_ACTIVE)
            .filter(|e| {
                e.experiment_id != DEFAULT_EXPERIMENT_ID
                    || t.runs.values().any(|r| r.experiment_id == e.experiment_id && r.lifecycle_stage == LIFECYCLE_ACTIVE)
            })
            .count();
        let models = t.models.len();
        if experiments + runs + models > 0 {
            return Err(format!(
                "namespace {name:?} has tracking data in its MLflow workspace ({experiments} experiment(s), {runs} run(s), {models} registered model(s)); delete them first"
            ));
        }
    }
    Ok(())
}

/// Whether the namespace exists (`default` always does).
pub fn exists(st: &ClusterState, name: &str) -> bool {
    name == DEFAULT || st.namespaces.contains_key(name)
}

/// Every namespace, `default` included (as stored, or bare when never applied).
pub fn list(st: &ClusterState) -> Vec<Namespace> {
    let mut out: Vec<Namespace> = st.namespaces.values().cloned().collect();
    if !st.namespaces.contains_key(DEFAULT) {
        out.insert(0, default_namespace());
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `default` as it is before anyone applies it.
pub fn default_namespace() -> Namespace {
    Namespace { name: DEFAULT.to_string(), description: "Default shared namespace".to_string(), ..Default::default() }
}

/// What the namespace holds, how many jobs are not dead and how many evaluations are blocked.
pub fn usage(st: &ClusterState, name: &str) -> mlp_proto::v1::NamespaceUsage {
    let mut u = crate::scheduler::quota::Held::of(st, name, &BTreeSet::new()).view();
    let jobs = || crate::scheduler::quota::jobs_in(st, name);
    u.jobs = jobs().filter(|j| j.status != job_status::DEAD).count() as u32;
    u.blocked_evaluations =
        jobs().flat_map(|j| st.evals_for_job(&j.namespace, &j.id)).filter(|e| e.status == eval_status::BLOCKED).count() as u32;
    u
}

/// Parses a quota file (see the module doc); every problem as `file:line:column: field: message`.
pub fn parse_quota(src: &str, file: &str) -> Result<QuotaSpec, PolicyError> {
    let mut p = Parser::new(src, file);
    let Some(body) = p.body("the quota file", MAX_QUOTA_FILE_BYTES, 8) else { return p.finish(QuotaSpec::default()) };
    let q = p.quota(&body);
    if p.problems.is_empty() {
        if let Err(e) = validate_quota(&q) {
            p.problem(0, "", e);
        }
    }
    p.finish(q)
}

impl Parser<'_> {
    fn number(&mut self, expr: &Expression, path: &str) -> Option<u64> {
        let n = match expr {
            Expression::Number(n) => n.value().as_u64(),
            _ => None,
        };
        match n {
            Some(v) if v <= MAX_LIMIT => Some(v),
            Some(v) => {
                self.problem(start(expr), path, format!("{v} is above the largest limit {MAX_LIMIT}"));
                None
            }
            None => {
                self.problem(start(expr), path, "must be a whole number, 0 or more".into());
                None
            }
        }
    }

    fn quota(&mut self, body: &Body) -> QuotaSpec {
        let mut q = QuotaSpec::default();
        let mut seen = BTreeSet::new();
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let name = a.key.as_str();
                    if !seen.insert(name.to_string()) {
                        self.problem(start(&a.key), name, format!("{name} appears twice"));
                        continue;
                    }
                    let slot = match name {
                        "cpu_mhz" => &mut q.cpu_mhz,
                        "memory_mib" => &mut q.memory_mib,
                        "gpus" => &mut q.gpus,
                        "gpu_milli" => &mut q.gpu_milli,
                        other => {
                            self.problem(
                                start(&a.key),
                                other,
                                format!("unknown field {other:?} (cpu_mhz, memory_mib, gpus, gpu_milli, gpu \"MODEL\" {{ ... }})"),
                            );
                            continue;
                        }
                    };
                    *slot = self.number(&a.value, name);
                }
                Structure::Block(b) if b.ident.as_str() == "gpu" => {
                    let model = match b.labels.as_slice() {
                        [l] => l.as_str().to_string(),
                        _ => {
                            self.problem(
                                start(&b.ident),
                                "gpu",
                                "a gpu block takes one label, the model: `gpu \"A100\" { gpus = 2 }`".into(),
                            );
                            continue;
                        }
                    };
                    let path = format!("gpu.{model}");
                    let mut milli = None;
                    for s in b.body.iter() {
                        match s {
                            Structure::Attribute(a) if a.key.as_str() == "gpus" || a.key.as_str() == "gpu_milli" => {
                                let at = format!("{path}.{}", a.key.as_str());
                                if milli.is_some() {
                                    self.problem(start(&a.key), &at, "set gpus or gpu_milli once".into());
                                    continue;
                                }
                                let v = self.number(&a.value, &at);
                                milli = if a.key.as_str() == "gpus" { v.map(|v| v.saturating_mul(1000)) } else { v };
                            }
                            Structure::Attribute(a) => {
                                let name = a.key.as_str();
                                self.problem(start(&a.key), &format!("{path}.{name}"), format!("unknown field {name:?} (gpus, gpu_milli)"));
                            }
                            Structure::Block(inner) => {
                                let name = inner.ident.as_str();
                                self.problem(
                                    start(&inner.ident),
                                    &format!("{path}.{name}"),
                                    format!("unknown block {name:?} (gpus, gpu_milli)"),
                                );
                            }
                        }
                    }
                    if milli.is_none() && !self.problems.iter().any(|p| p.path.starts_with(&path)) {
                        self.problem(start(&b.ident), &path, "needs `gpus = N` or `gpu_milli = N`".into());
                    }
                    q.gpu_models.push(GpuModelQuota { model, gpu_milli: milli });
                }
                Structure::Block(b) if b.ident.as_str() == "borrow" => {
                    if q.borrow.is_some() {
                        self.problem(start(&b.ident), "borrow", "borrow appears twice".into());
                        continue;
                    }
                    if !b.labels.is_empty() {
                        self.problem(start(&b.ident), "borrow", "a borrow block takes no label".into());
                        continue;
                    }
                    let mut borrow = mlp_proto::v1::QuotaBorrow::default();
                    let mut fields = BTreeSet::new();
                    for s in b.body.iter() {
                        let Structure::Attribute(a) = s else {
                            self.problem(start(s), "borrow", "a borrow block holds cpu_mhz, memory_mib, gpus or gpu_milli".into());
                            continue;
                        };
                        let name = a.key.as_str();
                        let at = format!("borrow.{name}");
                        if !fields.insert(name.to_string()) {
                            self.problem(start(&a.key), &at, format!("{name} appears twice"));
                            continue;
                        }
                        let slot = match name {
                            "cpu_mhz" => &mut borrow.cpu_mhz,
                            "memory_mib" => &mut borrow.memory_mib,
                            "gpus" => &mut borrow.gpus,
                            "gpu_milli" => &mut borrow.gpu_milli,
                            other => {
                                self.problem(start(&a.key), &at, format!("unknown field {other:?} (cpu_mhz, memory_mib, gpus, gpu_milli)"));
                                continue;
                            }
                        };
                        *slot = self.number(&a.value, &at);
                    }
                    q.borrow = Some(borrow);
                }
                Structure::Block(b) => {
                    let name = b.ident.as_str();
                    self.problem(
                        start(&b.ident),
                        name,
                        format!("unknown block {name:?} (a quota file holds gpu \"MODEL\" {{ ... }} and borrow {{ ... }} blocks)"),
                    );
                }
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["default", "team-a", "a", "x1", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Team", "-a", "a-", "a_b", "a.b", &"a".repeat(64), "ü"] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.contains("DNS label"), "{e}");
        }
    }

    #[test]
    fn quota_files_parse_and_every_problem_is_located() {
        let q = parse_quota(
            "cpu_mhz = 4000\nmemory_mib = 8192\ngpus = 4\ngpu \"A100\" {\n  gpus = 2\n}\ngpu \"T4\" { gpu_milli = 500 }\n",
            "q.hcl",
        )
        .expect("parses");
        assert_eq!(q.cpu_mhz, Some(4000));
        assert_eq!(q.memory_mib, Some(8192));
        assert_eq!(q.gpus, Some(4));
        assert_eq!(q.gpu_milli, None);
        assert_eq!(
            q.gpu_models,
            vec![GpuModelQuota { model: "A100".into(), gpu_milli: Some(2000) }, GpuModelQuota { model: "T4".into(), gpu_milli: Some(500) },]
        );
        let e = parse_quota("cpu_mhz = 4000\ncpus = 2\nmemory_mib = -1\ngpu \"A\" { count = 1 }\n", "q.hcl").expect_err("bad");
        let t = e.to_string();
        assert!(t.contains("q.hcl:2:1: cpus: unknown field \"cpus\""), "{t}");
        assert!(t.contains("q.hcl:3:14: memory_mib: must be a whole number"), "{t}");
        assert!(t.contains("q.hcl:4:11: gpu.A.count: unknown field \"count\""), "{t}");
        let e = parse_quota("gpus = 1\ngpu_milli = 500\n", "q.hcl").expect_err("both");
        assert!(e.to_string().contains("not both"), "{e}");
        let e = parse_quota("gpus = [\n", "q.hcl").expect_err("syntax");
        assert!(e.to_string().starts_with("q.hcl:"), "{e}");
        // Borrowing limits (issue 15 §6).
        let q = parse_quota("gpus = 4\ncpu_mhz = 1000\nborrow {\n  gpus = 2\n  cpu_mhz = 500\n}\n", "q.hcl").expect("parses");
        let b = q.borrow.expect("borrow");
        assert_eq!((b.gpus, b.cpu_mhz, b.memory_mib), (Some(2), Some(500), None));
        assert_eq!(crate::scheduler::quota::hard_limit(&q).gpu_milli, Some(6000));
        assert_eq!(crate::scheduler::quota::hard_limit(&q).cpu_mhz, Some(1500));
        let e = parse_quota("gpus = 4\nborrow {\n  gpu = 2\n}\n", "q.hcl").expect_err("unknown");
        assert!(e.to_string().contains("q.hcl:3:3: borrow.gpu: unknown field \"gpu\""), "{e}");
        let e = parse_quota("gpus = 4\nborrow {\n  memory_mib = 2\n}\n", "q.hcl").expect_err("unlimited");
        assert!(e.to_string().contains("quota.borrow.memory_mib: the quota sets no memory_mib limit"), "{e}");
        let e = parse_quota("gpus = 4\nborrow {\n  gpus = 1\n  gpu_milli = 5\n}\n", "q.hcl").expect_err("both");
        assert!(e.to_string().contains("quota.borrow: set gpus"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut ns = Namespace { name: "team-a".into(), ..Default::default() };
        assert!(validate(&ns).is_ok());
        ns.quota = Some(QuotaSpec {
            gpu_models: vec![
                GpuModelQuota { model: "A100".into(), gpu_milli: Some(1) },
                GpuModelQuota { model: "A100".into(), gpu_milli: Some(2) },
            ],
            ..Default::default()
        });
        assert_eq!(validate(&ns).expect_err("dup"), "quota.gpu_models[1].model: \"A100\" appears twice");
        ns.quota = Some(QuotaSpec { cpu_mhz: Some(MAX_LIMIT + 1), ..Default::default() });
        assert!(validate(&ns).expect_err("big").starts_with("quota.cpu_mhz:"));
        ns.quota = Some(QuotaSpec { gpu_models: vec![GpuModelQuota { model: "A100".into(), gpu_milli: None }], ..Default::default() });
        assert!(validate(&ns).expect_err("none").starts_with("quota.gpu_models[0].gpu_milli: required"));
        ns.quota = None;
        ns.description = "a\u{7}".into();
        assert!(validate(&ns).expect_err("ctl").starts_with("description:"));
    }
}

// ---- the API (gRPC `NamespaceService`, HTTP `/v1/namespaces`, `/v1/namespace/NAME`) ----

use crate::api::{Api, ApiError, Block};
use crate::events;
use crate::state::{Command, Request};
use mlp_proto::v1::{
    NamespaceApplyRequest, NamespaceApplyResponse, NamespaceDeleteRequest, NamespaceDeleteResponse, NamespaceGetRequest,
    NamespaceGetResponse, NamespaceListRequest, NamespaceListResponse,
};

use crate::leader::now_ms;

impl Api {
    /// Creates or replaces a namespace (its description and quota; no quota: unlimited).
    pub async fn namespace_apply(&self, req: NamespaceApplyRequest) -> Result<NamespaceApplyResponse, ApiError> {
        let Some(mut ns) = req.namespace else {
            return Err(ApiError::InvalidArgument("namespace is required".to_string()));
        };
        ns.create_index = 0;
        ns.modify_index = 0;
        validate(&ns).map_err(ApiError::InvalidArgument)?;
        let resp = self.raft.submit(Request { now_ms: now_ms(), command: Command::UpsertNamespace { namespace: ns } }).await?;
        Ok(NamespaceApplyResponse { index: resp.index })
    }

    /// Every namespace. A blocking query (`min_index`) wakes on any namespace change.
    pub async fn namespace_list(&self, req: NamespaceListRequest) -> Result<NamespaceListResponse, ApiError> {
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        self.block(b, &[(events::TOPIC_NAMESPACE, "")], "").await?;
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        Ok(NamespaceListResponse { namespaces: list(&st), index: st.index })
    }

    /// A namespace with what it holds (`mlp namespace status`). A blocking query (`min_index`)
    /// wakes on a change of the namespace itself or of what its usage counts: its jobs,
    /// allocations and evaluations.
    pub async fn namespace_get(&self, req: NamespaceGetRequest) -> Result<NamespaceGetResponse, ApiError> {
        check_name(&req.name).map_err(ApiError::InvalidArgument)?;
        let b = Block { min_index: req.min_index, wait_ms: req.wait_ms };
        let topics = [
            (events::TOPIC_NAMESPACE, req.name.as_str()),
            (events::TOPIC_JOB, ""),
            (events::TOPIC_ALLOCATION, ""),
            (events::TOPIC_EVALUATION, ""),
        ];
        self.block(b, &topics, &req.name).await?;
        self.read_barrier(req.stale).await?;
        let st = self.state.read();
        let ns = match st.namespaces.get(&req.name) {
            Some(n) => n.clone(),
            None if req.name == DEFAULT => default_namespace(),
            None => return Err(ApiError::NotFound(format!("namespace {:?} not found", req.name))),
        };
        Ok(NamespaceGetResponse { namespace: Some(ns), usage: Some(usage(&st, &req.name)), index: st.index })
    }

    /// Deletes a namespace (refused for `default` and while it has jobs that are not dead; the
    /// state machine checks again at the entry).
    pub async fn namespace_delete(&self, req: NamespaceDeleteRequest) -> Result<NamespaceDeleteResponse, ApiError> {
        check_name(&req.name).map_err(ApiError::InvalidArgument)?;
        self.read_barrier(false).await?;
        {
            let st = self.state.read();
            if req.name != DEFAULT && !st.namespaces.contains_key(&req.name) {
                return Err(ApiError::NotFound(format!("namespace {:?} not found", req.name)));
            }
            deletable(&st, &req.name).map_err(ApiError::InvalidArgument)?;
        }
        let resp = self.raft.submit(Request { now_ms: now_ms(), command: Command::DeleteNamespace { name: req.name } }).await?;
        Ok(NamespaceDeleteResponse { index: resp.index })
    }
}

// ---- gRPC ----

use crate::acl::{policy::Capability, Authz};
use crate::grpc::GrpcApi;
use mlp_proto::v1::namespace_service_server::NamespaceService;
use tonic::{Response, Status};

/// Keeps the namespaces the token may read (every one with ACLs off).
fn readable(authz: Option<&Authz>, mut namespaces: Vec<Namespace>) -> Vec<Namespace> {
    if let Some(a) = authz {
        namespaces.retain(|n| a.allows_ns(Capability::ReadJob, &n.name));
    }
    namespaces
}

#[tonic::async_trait]
impl NamespaceService for GrpcApi {
    async fn apply(&self, req: tonic::Request<NamespaceApplyRequest>) -> Result<Response<NamespaceApplyResponse>, Status> {
        crate::metrics::Metrics::inc(&self.api.metrics.grpc_requests);
        Ok(Response::new(self.api.namespace_apply(req.into_inner()).await?))
    }
    async fn list(&self, req: tonic::Request<NamespaceListRequest>) -> Result<Response<NamespaceListResponse>, Status> {
        crate::metrics::Metrics::inc(&self.api.metrics.grpc_requests);
        let authz = req.extensions().get::<Authz>().cloned();
        let mut r = self.api.namespace_list(req.into_inner()).await?;
        r.namespaces = readable(authz.as_ref(), r.namespaces);
        Ok(Response::new(r))
    }
    async fn get(&self, req: tonic::Request<NamespaceGetRequest>) -> Result<Response<NamespaceGetResponse>, Status> {
        crate::metrics::Metrics::inc(&self.api.metrics.grpc_requests);
        let authz = req.extensions().get::<Authz>().cloned();
        let req = req.into_inner();
        self.api.acl.require_ns(authz.as_ref(), Capability::ReadJob, &req.name, "namespace get", &req.name)?;
        Ok(Response::new(self.api.namespace_get(req).await?))
    }
    async fn delete(&self, req: tonic::Request<NamespaceDeleteRequest>) -> Result<Response<NamespaceDeleteResponse>, Status> {
        crate::metrics::Metrics::inc(&self.api.metrics.grpc_requests);
        Ok(Response::new(self.api.namespace_delete(req.into_inner()).await?))
    }
}

// ---- HTTP ----

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use std::sync::Arc;

/// `PUT`/`POST /v1/namespace/NAME` body: the namespace's description and quota. Unknown fields
/// are refused with their path (`quota.gpu_count`) by `http::StrictJson`.
#[derive(Debug, serde::Deserialize)]
pub struct ApplyBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub quota: Option<QuotaBody>,
}

/// A quota in JSON (the fields of `QuotaSpec`).
#[derive(Debug, serde::Deserialize)]
pub struct QuotaBody {
    #[serde(default)]
    pub cpu_mhz: Option<u64>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub gpus: Option<u64>,
    #[serde(default)]
    pub gpu_milli: Option<u64>,
    #[serde(default)]
    pub gpu_models: Vec<GpuModelBody>,
    /// Borrowing limits: `QuotaBorrow`'s fields, all optional.
    #[serde(default)]
    pub borrow: Option<mlp_proto::v1::QuotaBorrow>,
}

#[derive(Debug, serde::Deserialize)]
pub struct GpuModelBody {
    pub model: String,
    #[serde(default)]
    pub gpu_milli: Option<u64>,
}

impl From<QuotaBody> for QuotaSpec {
    fn from(q: QuotaBody) -> Self {
        QuotaSpec {
            cpu_mhz: q.cpu_mhz,
            memory_mib: q.memory_mib,
            gpus: q.gpus,
            gpu_milli: q.gpu_milli,
            gpu_models: q.gpu_models.into_iter().map(|m| GpuModelQuota { model: m.model, gpu_milli: m.gpu_milli }).collect(),
            borrow: q.borrow,
        }
    }
}

#[derive(Debug, serde::Deserialize, Default)]
#[serde(default)]
pub struct ReadParams {
    stale: bool,
    /// Blocking query: wait for a change after this index ...
    index: u64,
    /// ... for at most this long (`500ms`, `30s`, `5m`; default 5m, at most 10m).
    wait: Option<String>,
}

type HttpResult = Result<axum::response::Response, crate::http::HttpError>;

fn json<T: serde::Serialize>(v: T, index: u64) -> HttpResult {
    use axum::response::IntoResponse;
    Ok(([(crate::http::INDEX_HEADER, index.to_string())], Json(v)).into_response())
}

/// `GET /v1/namespaces`: the namespaces the token may read.
pub async fn http_list(State(api): State<Arc<Api>>, authz: Option<Extension<Authz>>, Query(p): Query<ReadParams>) -> HttpResult {
    let b = crate::http::block(p.index, p.wait.as_deref())?;
    let mut r = api.namespace_list(NamespaceListRequest { stale: p.stale, min_index: b.min_index, wait_ms: b.wait_ms }).await?;
    r.namespaces = readable(authz.as_ref().map(|a| &a.0), r.namespaces);
    let index = r.index;
    json(r, index)
}

/// `GET /v1/namespace/NAME`: the namespace and what it holds.
pub async fn http_get(
    State(api): State<Arc<Api>>,
    authz: Option<Extension<Authz>>,
    Path(name): Path<String>,
    Query(p): Query<ReadParams>,
) -> HttpResult {
    api.acl.require_ns(authz.as_ref().map(|a| &a.0), Capability::ReadJob, &name, "namespace get", &name).map_err(ApiError::from)?;
    let b = crate::http::block(p.index, p.wait.as_deref())?;
    let r = api.namespace_get(NamespaceGetRequest { name, stale: p.stale, min_index: b.min_index, wait_ms: b.wait_ms }).await?;
    let index = r.index;
    json(r, index)
}

/// `POST`/`PUT /v1/namespace/NAME` with an [`ApplyBody`].
pub async fn http_apply(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    crate::http::StrictJson(b): crate::http::StrictJson<ApplyBody>,
) -> HttpResult {
    if let Some(n) = b.name.as_deref().filter(|n| *n != name) {
        return Err(crate::http::HttpError(
            axum::http::StatusCode::BAD_REQUEST,
            format!("invalid request body: name: {n:?} differs from the path's {name:?}"),
        ));
    }
    let ns = Namespace { name, description: b.description, quota: b.quota.map(QuotaSpec::from), ..Default::default() };
    let r = api.namespace_apply(NamespaceApplyRequest { namespace: Some(ns) }).await?;
    let index = r.index;
    json(r, index)
}

/// `DELETE /v1/namespace/NAME`.
pub async fn http_delete(State(api): State<Arc<Api>>, Path(name): Path<String>) -> HttpResult {
    let r = api.namespace_delete(NamespaceDeleteRequest { name }).await?;
    let index = r.index;
    json(r, index)
}
