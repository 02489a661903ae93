//! mlp's wire contract: the protobuf messages and gRPC services (generated), the job spec
//! parser, and small helpers shared by the server, the agent and the CLI.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("mlp.v1");
}

pub mod compact;
pub mod consts;
pub mod durable;
pub mod gpu;
pub mod jobspec;
pub mod matcher;
pub mod snapshot;

pub use v1::*;

/// The address part of a node's `rpc_addr` ("10.0.0.5:4648" → "10.0.0.5", "[::1]:1" → "::1"):
/// where the node's host ports are reached.
pub fn node_address(rpc_addr: &str) -> String {
    match rpc_addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => rpc_addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(rpc_addr).to_string(),
    }
}

/// Secrets a job carries for the agent (an `oci` task's registry `auth`) replaced by
/// [`REDACTED`] wherever a job leaves the servers through the API (reads, versions, events);
/// only the agent that runs the task gets them.
pub mod redact {
    use crate::v1::{Allocation, Job};

    /// What a secret reads as in the API.
    pub const REDACTED: &str = "<redacted>";

    /// Redacts the job's secrets in place.
    pub fn job(job: &mut Job) {
        for group in &mut job.groups {
            for task in &mut group.tasks {
                if let Some(auth) = task.config.as_mut().and_then(|c| c.auth.as_mut()) {
                    auth.password = REDACTED.to_string();
                }
            }
        }
    }

    /// Redacts the secrets of the job an allocation carries, if any.
    pub fn alloc(alloc: &mut Allocation) {
        if let Some(j) = alloc.job.as_mut() {
            job(j);
        }
    }
}
