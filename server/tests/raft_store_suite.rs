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
