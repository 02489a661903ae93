//! mlp server: the Raft-replicated cluster state, the scheduler, the leader's evaluation and
//! plan loops, and the gRPC and HTTP APIs.

pub mod acl;
pub mod api;
pub mod deploy;
mod deploy_api;
pub mod events;
pub mod grpc;
pub mod http;
pub mod jobtypes;
pub mod leader;
pub mod metrics;
pub mod namespace;
pub mod plan_apply;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod sim;
pub mod state;
pub mod tracking;

pub use server::{ClusterSettings, Server, ServerConfig, ServerError};
