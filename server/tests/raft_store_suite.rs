//! openraft's storage conformance suite against the sled-backed store, plus a reopen test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use mlp_server::raft::{open_storage, Entry, LogStore, NodeId, StateMachineStore, TypeConfig};
use mlp_server::state::StateHandle;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, LogId, StorageError, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let (state, _events) = StateHandle::new();
        let (log, sm) = open_storage(dir.path(), state).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn raft_store_conformance_suite() {
    Suite::test_all(Builder).unwrap();
}

fn blank(term: u64, index: u64) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
}

#[tokio::test]
async fn raft_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (state, _events) = StateHandle::new();
        let (mut log, _sm) = open_storage(dir.path(), state).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| blank(1, i)).collect();
        // `blocking_append` waits for the flush callback.
        log.blocking_append(entries).await.unwrap();
        log.save_vote(&Vote::new(3, 7)).await.unwrap();
        log.save_committed(Some(LogId::new(CommittedLeaderId::new(1, 1), 8))).await.unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 2)).await.unwrap();
        log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 10)).await.unwrap();
    }
    let (state, _events) = StateHandle::new();
    let (mut log, _sm) = open_storage(dir.path(), state).unwrap();
    let got = log.try_get_log_entries(0..100).await.unwrap();
    let idx: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
    assert_eq!(idx, (3..=9).collect::<Vec<_>>());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
    assert_eq!(log.read_committed().await.unwrap().map(|l| l.index), Some(8));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
    assert_eq!(st.last_log_id.map(|l| l.index), Some(9));
}

/// An entry whose JSON is about `kb` KiB: one tracking `log-batch` of that many points.
fn big(index: u64, kb: usize) -> Entry {
    use mlp_server::raft::RequestBatch;
    use mlp_server::state::{Command, Request};
    use mlp_server::tracking::state::{Metric, MetricValue};
    use mlp_server::tracking::TrackingCommand;
    // A point is about 70 bytes of JSON; 15 of them make a KiB.
    let metrics = (0..kb as i64 * 15).map(|s| Metric { key: "loss".into(), value: MetricValue(s as f64), timestamp: s, step: s }).collect();
    let cmd = TrackingCommand::LogBatch { run_id: "r".into(), metrics, params: vec![], tags: vec![] };
    let batch = RequestBatch::new(vec![Request { now_ms: 1, command: Command::Tracking(cmd) }]);
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(batch) }
}

#[tokio::test]
async fn a_replication_message_carries_at_most_half_a_mebibyte_of_entries_and_at_least_one() {
    // openraft times an AppendEntries out after one heartbeat and resends the same range: a
    // follower behind on large entries must be sent a bounded message, or it never catches up.
    let dir = tempfile::tempdir().unwrap();
    let sizes = |entries: &[Entry]| entries.iter().map(|e| serde_json::to_vec(e).unwrap().len()).collect::<Vec<_>>();
    {
        let (state, _events) = StateHandle::new();
        let (mut log, _sm) = open_storage(dir.path(), state).unwrap();
        let mut entries: Vec<Entry> = (1..=20).map(|i| big(i, 100)).collect();
        // One entry larger than the whole bound.
        entries.push(big(21, 900));
        entries.extend((22..=30).map(|i| blank(1, i)));
        log.blocking_append(entries).await.unwrap();
        let mut reader = log.get_log_reader().await;
        // From the tail cache.
        let got = reader.limited_get_log_entries(1, 31).await.unwrap();
        assert!(!got.is_empty() && got.len() < 20, "{} entries of ~100 KiB in one message", got.len());
        assert_eq!(got.first().map(|e| e.log_id.index), Some(1));
        assert!(sizes(&got).iter().sum::<usize>() <= 512 * 1024, "{:?}", sizes(&got));
        let one = reader.limited_get_log_entries(21, 31).await.unwrap();
        assert_eq!(one.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![21], "the large entry goes alone");
        let small = reader.limited_get_log_entries(22, 31).await.unwrap();
        assert_eq!(small.len(), 9, "small entries all go together");
        // The full reads are not bounded.
        assert_eq!(reader.try_get_log_entries(1..31).await.unwrap().len(), 30);
    }
    // From sled (a reopened store's cache is empty): the same bounds.
    let (state, _events) = StateHandle::new();
    let (mut log, _sm) = open_storage(dir.path(), state).unwrap();
    let mut reader = log.get_log_reader().await;
    let got = reader.limited_get_log_entries(1, 31).await.unwrap();
    assert!(!got.is_empty() && got.len() < 20, "{} entries of ~100 KiB in one message", got.len());
    assert!(sizes(&got).iter().sum::<usize>() <= 512 * 1024, "{:?}", sizes(&got));
    let one = reader.limited_get_log_entries(21, 31).await.unwrap();
    assert_eq!(one.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![21]);
    assert_eq!(reader.limited_get_log_entries(22, 31).await.unwrap().len(), 9);
    assert!(reader.limited_get_log_entries(5, 5).await.unwrap().is_empty());
}
