//! THE table: what every RPC and HTTP route needs (issue 15 §2). A gRPC method or an HTTP
//! route this table does not know is refused when ACLs are on, so a new endpoint cannot be
//! left unchecked by accident (`every_grpc_method_is_in_the_table` checks the proto).

use super::policy::{Access, Capability};

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No token: agents' and servers' own RPCs (node identity and mutual TLS guard those,
    /// issue 15 §1 and §3) and the unauthenticated status endpoint.
    None,
    /// Any valid token (the handler decides the rest).
    Token,
    /// A namespace capability. The guard checks the token grants it in *some* namespace;
    /// the handler narrows it to the object's namespace (`Authz::require_ns`).
    Ns(Capability),
    Node(Access),
    Operator(Access),
    /// ACL administration: `Read` (list, info), `Write` (apply, create, delete).
    Acl(Access),
    /// Only a management token (snapshots: they hold every secret hash and every env).
    Management,
}

impl Need {
    /// Whether a change made under this need is privileged (audited when allowed too).
    pub fn privileged(self) -> bool {
        matches!(
            self,
            Need::Management
                | Need::Acl(Access::Write)
                | Need::Operator(Access::Write)
                | Need::Ns(Capability::AllocExec | Capability::AllocNodeExec)
        )
    }
}

/// The need of a gRPC method, by its path (`/mlp.v1.JobService/Register`); `None`: unknown.
pub fn grpc(path: &str) -> Option<Need> {
    use Access::{Read, Write};
    use Capability::*;
    let (service, method) = path.strip_prefix("/mlp.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("JobService", "Register" | "Plan" | "Stop" | "Revert" | "Scale" | "Restart") => Need::Ns(SubmitJob),
        ("DeploymentService", "List" | "Get") => Need::Ns(ReadJob),
        ("DeploymentService", "Promote" | "Pause" | "Fail" | "SetAllocHealth") => Need::Ns(SubmitJob),
        ("JobService", "List") => Need::Ns(ListJobs),
        ("JobService", "Get" | "Versions") => Need::Ns(ReadJob),
        // Job types (issue 16 §2).
        ("JobService", "Dispatch" | "PeriodicForce") => Need::Ns(SubmitJob),
        ("JobService", "Children") => Need::Ns(ReadJob),
        ("AllocService", "List" | "Get") => Need::Ns(ReadJob),
        ("AllocService", "Logs") => Need::Ns(ReadLogs),
        ("AllocService", "Exec") => Need::Ns(AllocExec),
        ("NodeService", "List" | "Get") => Need::Node(Read),
        ("NodeService", "UpdateDrain" | "UpdateEligibility") => Need::Node(Write),
        ("EvalService", "List" | "Get") => Need::Ns(ReadJob),
        ("EventService", "Events") => Need::Ns(ReadJob),
        ("ServiceService", "List" | "Get") => Need::Ns(ReadJob),
        // MLflow tracking views, in the request's namespace (its MLflow workspace).
        ("TrackingService", "ListRuns" | "GetRun" | "ListModels" | "GetModel") => Need::Ns(ReadJob),
        ("TrackingService", "SetModelAlias") => Need::Ns(SubmitJob),
        ("StatusService", "Leader") => Need::None,
        ("SystemService", "GarbageCollect") => Need::Operator(Write),
        // Agents (node identity: issue 15 §3).
        (
            "AgentService",
            "Register" | "Heartbeat" | "WatchAllocations" | "UpdateAllocs" | "WatchOverlay" | "UpdateServices" | "WatchServices",
        ) => Need::None,
        // Server to server (mutual TLS: issue 15 §1).
        ("RaftService", "AppendEntries" | "Vote" | "InstallSnapshot" | "PutBlob" | "GetBlob") => Need::None,
        ("ClusterService", "Info" | "Join" | "Forward" | "ForwardBatch" | "ReadIndex" | "TriggerElect") => Need::None,
        ("ClusterService", "ListPeers") => Need::Operator(Read),
        ("ClusterService", "RemovePeer" | "TransferLeadership") => Need::Operator(Write),
        ("ClusterService", "SnapshotSave" | "SnapshotRestore") => Need::Management,
        // Works once, without a token: it makes the first one.
        ("AclService", "Bootstrap") => Need::None,
        ("AclService", "PolicyList" | "PolicyGet" | "TokenList") => Need::Acl(Read),
        // Any valid token may read itself (`accessor_id` empty); others need acl read: the
        // handler checks.
        ("AclService", "TokenGet") => Need::Token,
        ("AclService", "PolicyApply" | "PolicyDelete" | "TokenCreate" | "TokenDelete") => Need::Acl(Write),
        // Namespaces (issue 15 §5): any token lists and reads the namespaces it may read
        // (the handler filters and checks `read-job` in the namespace); changes are operator's.
        ("NamespaceService", "List" | "Get") => Need::Token,
        ("NamespaceService", "Apply" | "Delete") => Need::Operator(Write),
        _ => return None,
    })
}

/// The need of an HTTP request: `route` is axum's matched route (`/v1/job/:id`), `path` the
/// request's path (for MLflow's catch-all routes). `None`: unknown route (refused).
///
/// MLflow's tracking, registry and artifact API (`/api/2.0/mlflow*`, `/api/3.0/mlflow*`) works
/// in the namespace its `X-MLFLOW-WORKSPACE` header names (`default` without one): reads (GET,
/// and POST searches) need `read-job` there, every other call `submit-job`.
pub fn http(method: &str, route: Option<&str>, path: &str) -> Option<Need> {
    use Access::{Read, Write};
    use Capability::*;
    let get = method == "GET" || method == "HEAD";
    let Some(route) = route else {
        // No route matched: the answer is a 404 that reads and changes nothing.
        return Some(Need::None);
    };
    // MLflow's workspaces are namespaces: any token lists and reads those it may read (the
    // handler filters); changes are refused whoever asks.
    if route.starts_with("/api/3.0/mlflow/workspaces") {
        return Some(Need::Token);
    }
    if route.starts_with("/api/2.0/mlflow") || route.starts_with("/api/3.0/mlflow") {
        let search = method == "POST" && (path.ends_with("/search") || path.ends_with("/get") || path.contains("/get-"));
        return Some(Need::Ns(if get || search { ReadJob } else { SubmitJob }));
    }
    Some(match (route, get) {
        ("/v1/jobs", true) => Need::Ns(ListJobs),
        ("/v1/jobs", false) => Need::Ns(SubmitJob),
        ("/v1/job/:id", true) => Need::Ns(ReadJob),
        ("/v1/job/:id", false) => Need::Ns(SubmitJob),
        ("/v1/job/:id/allocations" | "/v1/job/:id/versions" | "/v1/job/:id/evaluations" | "/v1/job/:id/deployments", true) => {
            Need::Ns(ReadJob)
        }
        ("/v1/job/:id/revert" | "/v1/job/:id/scale" | "/v1/job/:id/restart", false) => Need::Ns(SubmitJob),
        ("/v1/deployments" | "/v1/deployment/:id", true) => Need::Ns(ReadJob),
        (
            "/v1/deployment/:id/promote"
            | "/v1/deployment/:id/pause"
            | "/v1/deployment/:id/resume"
            | "/v1/deployment/:id/fail"
            | "/v1/deployment/:id/allocation-health",
            false,
        ) => Need::Ns(SubmitJob),
        ("/v1/job/:id/dispatch" | "/v1/job/:id/periodic/force", false) => Need::Ns(SubmitJob),
        ("/v1/job/:id/children", true) => Need::Ns(ReadJob),
        ("/v1/allocations" | "/v1/allocation/:id", true) => Need::Ns(ReadJob),
        ("/v1/nodes" | "/v1/node/:id", true) => Need::Node(Read),
        ("/v1/node/:id/drain" | "/v1/node/:id/eligibility", false) => Need::Node(Write),
        ("/v1/evaluations" | "/v1/evaluation/:id", true) => Need::Ns(ReadJob),
        ("/v1/services" | "/v1/service/:name", true) => Need::Ns(ReadJob),
        ("/v1/status/leader", _) => Need::None,
        ("/v1/event/stream", true) => Need::Ns(ReadJob),
        ("/v1/metrics", true) => Need::Operator(Read),
        ("/v1/system/gc", false) => Need::Operator(Write),
        ("/v1/namespaces" | "/v1/namespace/:name", true) => Need::Token,
        ("/v1/namespace/:name", false) => Need::Operator(Write),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `rpc` of every service in the proto has an entry (agents' own `ClientService`
    /// excepted: agents serve it, not servers).
    #[test]
    fn every_grpc_method_is_in_the_table() {
        let proto = include_str!("../../../proto/proto/mlp.proto");
        let mut service = String::new();
        let mut checked = 0;
        for line in proto.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches('{').trim().to_string();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap_or("").trim();
                if service == "ClientService" {
                    continue;
                }
                let path = format!("/mlp.v1.{service}/{method}");
                assert!(grpc(&path).is_some(), "{path} is not in the ACL table");
                checked += 1;
            }
        }
        assert!(checked > 40, "found only {checked} rpcs");
        assert_eq!(grpc("/mlp.v1.JobService/Nope"), None);
        assert_eq!(grpc("/mlp.v1.ClientService/Exec"), None, "servers do not serve it");
        assert_eq!(grpc("/other.Service/Register"), None);
    }

    #[test]
    fn the_table_maps_operations_to_capabilities() {
        use Capability::*;
        assert_eq!(grpc("/mlp.v1.JobService/Register"), Some(Need::Ns(SubmitJob)));
        assert_eq!(grpc("/mlp.v1.JobService/List"), Some(Need::Ns(ListJobs)));
        assert_eq!(grpc("/mlp.v1.AllocService/Logs"), Some(Need::Ns(ReadLogs)));
        assert_eq!(grpc("/mlp.v1.AllocService/Exec"), Some(Need::Ns(AllocExec)));
        assert_eq!(grpc("/mlp.v1.AgentService/Heartbeat"), Some(Need::None));
        assert_eq!(grpc("/mlp.v1.ClusterService/RemovePeer"), Some(Need::Operator(Access::Write)));
        assert_eq!(grpc("/mlp.v1.ClusterService/SnapshotRestore"), Some(Need::Management));
        assert_eq!(http("POST", Some("/v1/jobs"), "/v1/jobs"), Some(Need::Ns(SubmitJob)));
        assert_eq!(http("GET", Some("/v1/jobs"), "/v1/jobs"), Some(Need::Ns(ListJobs)));
        assert_eq!(http("DELETE", Some("/v1/job/:id"), "/v1/job/x"), Some(Need::Ns(SubmitJob)));
        assert_eq!(http("GET", Some("/v1/metrics"), "/v1/metrics"), Some(Need::Operator(Access::Read)));
        assert_eq!(http("POST", Some("/v1/nodes"), "/v1/nodes"), None);
        let mlflow = Some("/api/2.0/mlflow/*endpoint");
        assert_eq!(http("POST", mlflow, "/api/2.0/mlflow/runs/create"), Some(Need::Ns(SubmitJob)));
        assert_eq!(http("POST", mlflow, "/api/2.0/mlflow/runs/search"), Some(Need::Ns(ReadJob)));
        assert_eq!(http("GET", mlflow, "/api/2.0/mlflow/runs/get"), Some(Need::Ns(ReadJob)));
        assert_eq!(http("GET", None, "/nope"), Some(Need::None));
        assert!(Need::Ns(AllocExec).privileged() && Need::Management.privileged() && !Need::Ns(ReadJob).privileged());
    }
}
