//! Raft: openraft type config, the sled-backed log and state-machine storage, and the gRPC network.
//!
//! * [`store`]: the durable Raft log (sled, fsync'd per `append` batch) and the state machine
//!   that drives [`crate::state::StateHandle`], with snapshots kept in the same sled database.
//! * [`network`]: Raft RPCs carried as serde_json blobs inside the `RaftService` gRPC service.
//! * [`cluster`]: forming a cluster (`--bootstrap-expect`, `--join`), forwarding writes and
//!   read barriers from followers to the leader, and the operator RPCs (`ClusterService`).
//! * [`forward`]: a follower's forwarded writes, sent to the leader in batches.
//! * [`node`]: starting a node (id, storage, bootstrap of a single-voter cluster) and the
//!   write / linearizable-read entry points the rest of the server uses.
//!
//! Group commit: openraft 0.9 appends (and so fsyncs) every `client_write` on its own, one at
//! a time. To get thousands of writes per second through an fsync'd log, [`node::RaftNode::write`]
//! queues requests and a batcher commits everything queued as one log entry, a
//! [`RequestBatch`]. Every request of a batch is applied at that entry's index, in order.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::state::{CommandResponse, Request};

pub mod cluster;
pub mod forward;
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
///
/// Encoded once: the leader wrote each entry's JSON for its log and again for every follower's
/// `AppendEntries`, and each follower encoded what it had just decoded for its own log. The
/// batch keeps its JSON (the text it was decoded from, or its first encoding), shared by its
/// clones, and serde_json writes that text again instead of encoding the requests anew. The
/// requests never change after the batch is made, so the text stays theirs.
#[derive(Clone, Default)]
pub struct RequestBatch(pub Arc<Vec<Request>>, Arc<OnceLock<Box<RawValue>>>);

impl RequestBatch {
    pub fn new(requests: Vec<Request>) -> Self {
        RequestBatch(Arc::new(requests), Arc::default())
    }

    /// The batch's JSON (the plain list of requests), encoded on the first call.
    fn json(&self) -> Result<&RawValue, serde_json::Error> {
        if let Some(raw) = self.1.get() {
            return Ok(raw);
        }
        // Compact: the protobuf messages without their default fields (`mlp_proto::compact`).
        let raw = mlp_proto::compact::encode(|| serde_json::value::to_raw_value(self.0.as_slice()))?;
        Ok(self.1.get_or_init(|| raw))
    }

    /// The size of the kept JSON, or 0 when there is none yet.
    pub fn json_len(&self) -> usize {
        self.1.get().map_or(0, |raw| raw.get().len())
    }
}

/// Whether `T` is serde_json's serializer or deserializer (`&mut serde_json::ser::Serializer<…>`,
/// `&mut serde_json::de::Deserializer<…>`): only those can take a [`RawValue`] as the text it
/// holds. Any other format (none is used today) gets the requests themselves, so a name that
/// stopped matching would cost speed, never correctness.
fn is_serde_json<T: ?Sized>(module: &str) -> bool {
    std::any::type_name::<T>().trim_start_matches("&mut ").starts_with(module)
}

impl std::fmt::Debug for RequestBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequestBatch").field(&self.0).finish()
    }
}

impl PartialEq for RequestBatch {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Serialize for RequestBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if is_serde_json::<S>("serde_json::ser::Serializer<") {
            return self.json().map_err(serde::ser::Error::custom)?.serialize(s);
        }
        s.serialize_newtype_struct("RequestBatch", self.0.as_slice())
    }
}

impl<'de> Deserialize<'de> for RequestBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if is_serde_json::<D>("serde_json::de::Deserializer<") {
            let raw = Box::<RawValue>::deserialize(d)?;
            let requests: Vec<Request> = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
            return Ok(RequestBatch(Arc::new(requests), Arc::new(OnceLock::from(raw))));
        }
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

    #[test]
    fn a_batch_is_encoded_once_and_keeps_the_text_it_was_decoded_from() {
        let reqs = vec![
            Request { now_ms: 7, command: Command::UpsertEvals { evals: vec![] } },
            Request {
                now_ms: 8,
                command: Command::StopJob {
                    namespace: "default".into(),
                    job_id: "a \"quoted\" id".into(),
                    purge: false,
                    eval: Default::default(),
                },
            },
        ];
        // The list as the servers write it: protobuf fields at their defaults left out.
        let plain = mlp_proto::compact::encode(|| serde_json::to_string(&reqs)).expect("serializes");
        let batch = RequestBatch::new(reqs.clone());
        assert_eq!(batch.json_len(), 0);
        // Inside an entry and alone, the kept text is the plain list, and clones share it.
        let copy = batch.clone();
        let entry = serde_json::to_string(&openraft::EntryPayload::<TypeConfig>::Normal(batch.clone())).expect("serializes");
        assert_eq!(entry, format!("{{\"Normal\":{plain}}}"));
        assert_eq!(copy.json_len(), plain.len());
        assert_eq!(serde_json::to_string(&copy).expect("serializes"), plain);
        // Other serializers get the requests themselves.
        assert_eq!(serde_json::to_value(&batch).expect("to a value"), serde_json::to_value(&reqs).expect("to a value"));
        // Decoded, a batch keeps the text it came from (so a follower writes it as received).
        let back: openraft::EntryPayload<TypeConfig> = serde_json::from_str(&entry).expect("decodes");
        let openraft::EntryPayload::Normal(back) = back else { panic!("a normal entry") };
        assert_eq!((back.0.as_slice(), back.json_len()), (reqs.as_slice(), plain.len()));
        assert_eq!(serde_json::to_string(&back).expect("serializes"), plain);
        let from_value: RequestBatch = serde_json::from_value(serde_json::to_value(&reqs).expect("to a value")).expect("decodes");
        assert_eq!((from_value.0.as_slice(), from_value.json_len()), (reqs.as_slice(), 0));
        assert!(serde_json::from_str::<RequestBatch>("[{\"now_ms\": \"x\"}]").is_err());
    }

    /// A registration as a server writes it: the job and evaluation without their default
    /// fields. Entries written before that (every field present) decode to the same requests,
    /// and so do these by a server that writes full JSON: mixed versions read each other's log.
    #[test]
    fn entries_leave_out_default_fields_and_read_the_same_as_full_ones() {
        let job = mlp_proto::v1::Job {
            id: "train".into(),
            namespace: "default".into(),
            r#type: "batch".into(),
            groups: vec![mlp_proto::v1::TaskGroup {
                name: "g".into(),
                count: Some(0),
                tasks: vec![mlp_proto::v1::Task { name: "t".into(), driver: "exec".into(), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let eval = mlp_proto::v1::Evaluation { id: "e1".into(), job_id: "train".into(), ..Default::default() };
        let reqs = vec![Request { now_ms: 9, command: Command::RegisterJob { job, eval } }];
        let batch = RequestBatch::new(reqs.clone());
        let written = serde_json::to_string(&batch).expect("serializes");
        let full = serde_json::to_string(&reqs).expect("serializes");
        assert!(written.len() * 3 < full.len(), "{written} against {full}");
        assert!(!written.contains("\"priority\"") && full.contains("\"priority\":0"), "{written}");
        assert!(written.contains("\"count\":0"), "an optional field set to zero stays: {written}");
        for text in [&written, &full] {
            let back: RequestBatch = serde_json::from_str(text).expect("decodes");
            assert_eq!(back.0.as_slice(), reqs.as_slice());
        }
        // JSON written elsewhere (the API, the event stream) keeps every field.
        assert_eq!(serde_json::to_string(&reqs).expect("serializes"), full);
    }
}
