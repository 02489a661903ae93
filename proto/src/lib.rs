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
