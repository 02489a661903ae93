//! Raft: openraft type config, the sled-backed log and state-machine storage, and the gRPC network.
//!
//! * [`store`]: the durable Raft log (sled, fsync'd per `append` batch) and the state machine
//!   that drives [`crate::state::StateHandle`], with snapshots kept in the same sled database.
//! * [`network`]: Raft RPCs carried as serde_json blobs inside the `RaftService` gRPC service.
//! * [`cluster`]: forming a cluster (`--bootstrap-expect`, `--join`), forwarding writes and
//!   read barriers from followers to the leader, and the operator RPCs (`ClusterService`).
//! * [`node`]: starting a node (id, storage, bootstrap of a single-voter cluster) and the
//!   write / linearizable-read entry points the rest of the server uses.
//!
//! Group commit: openraft 0.9 appends (and so fsyncs) every `client_write` on its own, one at
//! a time. To get thousands of writes per second through an fsync'd log, [`node::RaftNode::write`]
//! queues requests and a batcher commits everything queued as one log entry, a
//! [`RequestBatch`]. Every request of a batch is applied at that entry's index, in order.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{CommandResponse, Request};

pub mod cluster;
pub mod network;
pub mod node;
pub mod store;

pub use network::{raft_grpc_service, raft_grpc_service_with_artifacts, GrpcNetworkFactory, RaftGrpcService};
pub use node::{open, start, RaftMetricsView, RaftNode, RaftSettings, RaftStartError, WriteError};
pub use store::{open_storage, LogStore, StateMachineStore, StorageError};

/// The payload of one Raft log entry: requests committed together (see the module docs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestBatch(pub Vec<Request>);

/// What applying a [`RequestBatch`] returns: one response per request, in order. Blank and
/// membership entries yield an empty batch response.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchResponse(pub Vec<CommandResponse>);

openraft::declare_raft_types!(
    /// openraft's type configuration for mlp: log entries carry a [`RequestBatch`] of
    /// [`crate::state::Request`]s, applying one yields a [`BatchResponse`], and snapshots are the
    /// serialized [`crate::state::ClusterState`] held in memory.
    pub TypeConfig:
        D = RequestBatch,
        R = BatchResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance of an mlp server.
pub type MlpRaft = openraft::Raft<TypeConfig>;
/// Node id: a random u64 generated once per data directory.
pub type NodeId = u64;
/// One Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// openraft's storage error for our node id type.
pub type RaftStorageError = openraft::StorageError<NodeId>;
