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
use std::sync::Arc;

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
///
/// Shared, not owned: openraft reads every entry back after appending it, to apply it and once
/// per follower to replicate it, and the log's tail cache answers those reads with clones. A
/// batch of a few hundred job registrations cloned three times was 8% of a server's CPU under
/// load (perf, `bench-ha.sh regs`); an `Arc` makes each clone a reference count. On the wire
/// and on disk it is the plain list of requests, as before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestBatch(pub Arc<Vec<Request>>);

impl RequestBatch {
    pub fn new(requests: Vec<Request>) -> Self {
        RequestBatch(Arc::new(requests))
    }
}

impl Serialize for RequestBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct("RequestBatch", self.0.as_slice())
    }
}

impl<'de> Deserialize<'de> for RequestBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "RequestBatch")]
        struct Wire(Vec<Request>);
        Wire::deserialize(d).map(|w| RequestBatch::new(w.0))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    #[test]
    fn a_batch_is_the_plain_list_of_requests_on_the_wire_and_clones_share_it() {
        let batch = RequestBatch::new(vec![Request { now_ms: 7, command: Command::UpsertEvals { evals: vec![] } }]);
        let json = serde_json::to_string(&batch).expect("serializes");
        // The format of entries written before the batch was shared: a JSON array.
        let plain =
            serde_json::to_string(&vec![Request { now_ms: 7, command: Command::UpsertEvals { evals: vec![] } }]).expect("serializes");
        assert_eq!(json, plain);
        let back: RequestBatch = serde_json::from_str(&plain).expect("decodes the old format");
        assert_eq!(back, batch);
        let copy = batch.clone();
        assert!(Arc::ptr_eq(&copy.0, &batch.0), "a clone shares the requests");
    }
}
