//! Raft: openraft type config, the sled-backed log and state-machine storage, and the gRPC network.
//!
//! * [`store`]: the durable Raft log (sled, fsync'd per `append` batch) and the state machine
//!   that drives [`crate::state::StateHandle`], with snapshots kept in the same sled database.
//! * [`network`]: Raft RPCs carried as serde_json blobs inside the `RaftService` gRPC service.
//! * [`node`]: starting a node (id, storage, bootstrap of a single-voter cluster) and the
//!   write / linearizable-read entry points the rest of the server uses.

use std::io::Cursor;

pub mod network;
pub mod node;
pub mod store;

pub use network::{raft_grpc_service, GrpcNetworkFactory, RaftGrpcService};
pub use node::{start, RaftMetricsView, RaftNode, RaftSettings, RaftStartError, WriteError};
pub use store::{open_storage, LogStore, StateMachineStore, StorageError};

openraft::declare_raft_types!(
    /// openraft's type configuration for mlp: log entries carry a [`crate::state::Request`],
    /// applying one yields a [`crate::state::CommandResponse`], and snapshots are the
    /// serialized [`crate::state::ClusterState`] held in memory.
    pub TypeConfig:
        D = crate::state::Request,
        R = crate::state::CommandResponse,
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
