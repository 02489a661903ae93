//! mlp's wire contract: the protobuf messages and gRPC services (generated), the job spec
//! parser, and small helpers shared by the server, the agent and the CLI.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("mlp.v1");
}

pub mod consts;
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
