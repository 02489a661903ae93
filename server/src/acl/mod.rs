//! ACL tokens and policies (issue 15 §2).
//!
//! * `policy.rs`: the HCL policy language (namespaces with capabilities and globs, `node`,
//!   `operator`, `acl`), validated with `file:line:column: field: message` problems.
//! * `state.rs`: policies and hashed tokens in the replicated state (`Command::Acl`).
//! * `rules.rs`: the one table of what each gRPC method and HTTP route needs.
//! * `guard.rs`: the gRPC layer and the HTTP middleware that apply the table to every request
//!   before any handler runs, and the narrowing helpers handlers call with the namespace of the
//!   object they touch.
//! * `audit.rs`: `<data-dir>/audit.log`, one JSON line per denied or privileged request.
//! * `service.rs`: `AclService` (bootstrap, policies, tokens).
//!
//! With ACLs off (`--acl-enabled` not given) nothing is checked, nothing redacted, nothing
//! audited: the API behaves as before.

pub mod audit;
pub mod guard;
pub mod policy;
pub mod rules;
pub mod service;
pub mod state;

use std::sync::Arc;

use policy::{Access, Capability, Policy};
use rules::Need;

pub use guard::{AclLayer, Guard};

/// The gRPC metadata key (and, case-insensitively, the HTTP header) carrying a token's secret.
pub const TOKEN_HEADER: &str = "x-mlp-token";

/// The namespace-less areas of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Node,
    Operator,
    Acl,
}

/// What a request's token may do: resolved once per request by the guard and handed to the
/// handler in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authz {
    pub accessor: String,
    pub name: String,
    pub management: bool,
    pub policies: Arc<Vec<Policy>>,
}

impl Authz {
    /// Whether the token holds `cap` in `namespace`. Per policy, an exact namespace rule wins
    /// over patterns, and the longest matching pattern over shorter ones; a `deny` chosen by any
    /// policy denies; otherwise the capabilities of the chosen rules add up.
    pub fn allows_ns(&self, cap: Capability, namespace: &str) -> bool {
        if self.management {
            return true;
        }
        let mut granted = false;
        for p in self.policies.iter() {
            let exact = p.namespaces.iter().find(|r| r.pattern == namespace);
            let rule = exact.or_else(|| p.namespaces.iter().filter(|r| r.matches(namespace)).max_by_key(|r| r.pattern.len()));
            if let Some(r) = rule {
                if r.deny {
                    return false;
                }
                granted |= r.capabilities.contains(&cap);
            }
        }
        granted
    }

    /// Whether the token holds `cap` in at least one namespace (the guard's check before the
    /// handler knows the namespace).
    pub fn allows_some_ns(&self, cap: Capability) -> bool {
        self.management || self.policies.iter().any(|p| p.namespaces.iter().any(|r| !r.deny && r.capabilities.contains(&cap)))
    }

    /// Whether the token has `need` (read or write) on `area`; `deny` in any policy denies.
    pub fn allows_area(&self, area: Area, need: Access) -> bool {
        if self.management {
            return true;
        }
        let mut best: Option<Access> = None;
        for p in self.policies.iter() {
            let a = match area {
                Area::Node => p.node,
                Area::Operator => p.operator,
                Area::Acl => p.acl,
            };
            match a {
                Some(Access::Deny) => return false,
                Some(a) => best = best.max(Some(a)),
                None => {}
            }
        }
        matches!((need, best), (_, Some(Access::Write)) | (Access::Read, Some(Access::Read)))
    }

    /// Whether the token satisfies `need` (namespace needs: in some namespace).
    pub fn satisfies(&self, need: Need) -> bool {
        match need {
            Need::None | Need::Token => true,
            Need::Ns(cap) => self.allows_some_ns(cap),
            Need::Node(a) => self.allows_area(Area::Node, a),
            Need::Operator(a) => self.allows_area(Area::Operator, a),
            Need::Acl(a) => self.allows_area(Area::Acl, a),
            Need::Management => self.management,
        }
    }
}

/// Task `env` values replaced by `<redacted>` (for tokens without `read-job-env`).
pub fn redact_env(job: &mut mlp_proto::v1::Job) {
    for g in &mut job.groups {
        for t in &mut g.tasks {
            for v in t.env.values_mut() {
                *v = mlp_proto::redact::REDACTED.to_string();
            }
            if let Some(c) = t.config.as_mut() {
                for v in c.env.values_mut() {
                    *v = mlp_proto::redact::REDACTED.to_string();
                }
            }
        }
    }
}

/// An event batch as `authz` may see it: env redacted in the jobs (and allocations' jobs) of
/// namespaces where the token lacks `read-job-env`.
pub fn redact_batch(batch: &mut mlp_proto::v1::EventBatch, authz: &Authz) {
    for e in &mut batch.events {
        let ns = if e.namespace.is_empty() { "default" } else { e.namespace.as_str() };
        if authz.allows_ns(Capability::ReadJobEnv, ns) {
            continue;
        }
        if let Some(j) = e.job.as_mut() {
            redact_env(j);
        }
        if let Some(j) = e.allocation.as_mut().and_then(|a| a.job.as_mut()) {
            redact_env(j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz(src: &str) -> Authz {
        let p = policy::parse(src, "t.hcl").expect("policy");
        Authz { accessor: "a".into(), name: "t".into(), management: false, policies: Arc::new(vec![p]) }
    }

    #[test]
    fn namespace_rules_exact_beats_glob_and_deny_wins() {
        let a = authz(
            r#"
namespace "*" { policy = "read" }
namespace "team-*" { policy = "write" }
namespace "team-secret" { policy = "deny" }
namespace "default" { capabilities = ["read-job"] }
"#,
        );
        use Capability::*;
        assert!(a.allows_ns(ReadJob, "default"));
        assert!(!a.allows_ns(ListJobs, "default"), "the exact rule replaces the * rule");
        assert!(a.allows_ns(SubmitJob, "team-a"));
        assert!(!a.allows_ns(AllocNodeExec, "team-a"), "write does not include alloc-node-exec");
        assert!(a.allows_ns(ListJobs, "other"));
        assert!(!a.allows_ns(SubmitJob, "other"));
        assert!(!a.allows_ns(ReadJob, "team-secret"));
        assert!(a.allows_some_ns(SubmitJob));
        assert!(!a.allows_some_ns(AllocNodeExec));
        // A second policy adds, but cannot undo a deny.
        let b = policy::parse("namespace \"team-secret\" { policy = \"write\" }\nnamespace \"other\" { policy = \"write\" }", "b.hcl")
            .expect("policy");
        let both = Authz { policies: Arc::new(vec![a.policies[0].clone(), b]), ..a.clone() };
        assert!(both.allows_ns(SubmitJob, "other"));
        assert!(!both.allows_ns(ReadJob, "team-secret"));
    }

    #[test]
    fn areas_and_needs() {
        let a = authz("node { policy = \"read\" }\noperator { policy = \"write\" }\nnamespace \"default\" { policy = \"read\" }");
        assert!(a.satisfies(Need::Node(Access::Read)));
        assert!(!a.satisfies(Need::Node(Access::Write)));
        assert!(a.satisfies(Need::Operator(Access::Read)));
        assert!(a.satisfies(Need::Operator(Access::Write)));
        assert!(!a.satisfies(Need::Acl(Access::Read)));
        assert!(!a.satisfies(Need::Management));
        assert!(a.satisfies(Need::Ns(Capability::ReadJob)));
        assert!(!a.satisfies(Need::Ns(Capability::SubmitJob)));
        assert!(!a.satisfies(Need::Ns(Capability::ReadLogs)));
        assert!(!a.satisfies(Need::Ns(Capability::AllocExec)));
        let m = Authz { management: true, policies: Arc::new(Vec::new()), ..a };
        assert!(m.satisfies(Need::Management) && m.allows_ns(Capability::AllocNodeExec, "x"));
    }

    #[test]
    fn env_is_redacted() {
        let mut job = mlp_proto::v1::Job {
            groups: vec![mlp_proto::v1::TaskGroup {
                tasks: vec![mlp_proto::v1::Task {
                    env: [("KEY".to_string(), "secret".to_string())].into_iter().collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        redact_env(&mut job);
        assert_eq!(job.groups[0].tasks[0].env["KEY"], "<redacted>");
    }
}
