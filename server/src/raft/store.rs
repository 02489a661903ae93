//! sled-backed Raft storage: the durable log ([`LogStore`]) and the state machine
//! ([`StateMachineStore`]) that drives the in-memory [`StateHandle`].
//!
//! Layout of the sled database at `<data_dir>/raft`:
//! * tree `logs`: key = big-endian u64 log index (so sled's byte order is index order),
//!   value = serde_json of the openraft entry;
//! * tree `meta`: `vote`, `committed`, `last_purged` (serde_json);
//! * tree `snapshot`: `meta` (serde_json of the snapshot meta), `data` (the raw
//!   [`StateHandle::to_snapshot_bytes`] content: the state, then every metric point) and
//!   `points_of` (the id of the snapshot the points tree holds the points of), written
//!   together in one atomic batch;
//! * tree `tracking_points`: every metric point (`tracking::points`), written by `apply` with
//!   the entry that logged it.
//!
//! The cluster state itself lives only in memory and in snapshots: on open the persisted
//! snapshot is loaded into the [`StateHandle`], `applied_state` reports the snapshot's last log
//! id, and openraft re-applies the committed log tail after it (`read_committed`). The metric
//! points are not reloaded when `points_of` names the persisted snapshot: the tree then holds
//! the snapshot's points plus those of entries after it, which the re-applied tail writes again
//! with the same keys (idempotent), so a restart does not rewrite millions of keys.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{BatchResponse, Entry, NodeId, RaftStorageError, TypeConfig};
use crate::state::StateHandle;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";
/// Which snapshot's points the points tree holds (absent: unknown, load them again).
const KEY_POINTS_OF: &[u8] = b"points_of";

/// How many recently appended entries are kept decoded in memory. openraft reads every entry
/// back right after appending it (to apply it, and to replicate it); serving those reads from
/// memory saves a JSON decode per entry on the hot write path.
const TAIL_CACHE_ENTRIES: usize = 4096;
/// And how many bytes of them (counted as their encoded size, twice for a batch that keeps its
/// JSON, see `RequestBatch`): MLflow `log-batch` entries of
/// 1,000 points are ~100 KB each, and 4,096 of them kept about 400 MB of RSS (benchmarks.md).
/// The newest entry is always kept, however large.
const TAIL_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// How many bytes of entries (at least one entry, however large) one replication message
/// carries (`limited_get_log_entries`). openraft 0.9 times an AppendEntries out after one
/// heartbeat interval and resends the same range, so a follower that fell behind on large
/// entries (MLflow `log-batch`es of ~100 KB, a restore's 512 KiB `RestorePoints`, batches of
/// job specs) would otherwise be sent `max_payload_entries` of them, megabytes, that a loaded
/// host cannot take and store within one heartbeat, and would time out on every resend: it
/// would never catch up. Counted as the tail cache counts (encoded size, twice for a batch
/// that keeps its JSON).
const REPLICATION_BYTES: usize = 512 * 1024;

/// The decoded tail of the log: a contiguous index range (appends are contiguous, truncation
/// cuts the top, purge and eviction cut the bottom), bounded by entries and by bytes.
#[derive(Default)]
struct TailCache {
    entries: BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl TailCache {
    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Appends (the caller keeps it contiguous), then evicts the oldest over either bound.
    fn push(&mut self, entry: Entry, size: usize, max_entries: usize, max_bytes: usize) {
        if let Some((_, old)) = self.entries.insert(entry.log_id.index, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.entries.len() > 1 && (self.entries.len() > max_entries || self.bytes > max_bytes) {
            if let Some((_, (_, s))) = self.entries.pop_first() {
                self.bytes -= s;
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.entries.retain(|&idx, _| keep(idx));
        self.bytes = self.entries.values().map(|(_, s)| *s).sum();
    }
}

/// Errors opening the Raft storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("opening the raft database at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("opening sled tree {tree}: {source}")]
    Tree { tree: &'static str, source: sled::Error },
    #[error("reading the persisted snapshot: {0}")]
    Snapshot(String),
}

/// sled's page cache. Its default (1 GiB) lets it keep log entries and whole snapshots (one
/// value of the full state each) in memory: about 18 MiB of a 176 MiB server holding 10,000
/// jobs (docs/benchmarks.md). Entries are read back right after they are appended, so a small
/// cache serves them.
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Opens (creating if needed) the sled database at `<data_dir>/raft` and returns the log store
/// and the state machine store sharing it. A persisted snapshot, if any, is loaded into `state`.
pub fn open_storage(data_dir: &Path, state: Arc<StateHandle>) -> Result<(LogStore, StateMachineStore), StorageError> {
    let path = data_dir.join("raft");
    // sled holds an exclusive file lock until the last handle of a closed store is gone; the
    // flush tasks of a store just dropped in this process may hold one for a moment, so a
    // reopen waits for the lock (bounded) instead of failing. Another process holding it
    // still fails after the wait.
    let mut tries = 0;
    let db = loop {
        match sled::Config::new().path(&path).cache_capacity(SLED_CACHE_BYTES).open() {
            Ok(db) => break db,
            Err(sled::Error::Io(e)) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => return Err(StorageError::Open { path: path.display().to_string(), source }),
        }
    };
    let tree = |name: &'static str| db.open_tree(name).map_err(|source| StorageError::Tree { tree: name, source });
    let logs = tree("logs")?;
    let meta = tree("meta")?;
    let snapshot = tree("snapshot")?;
    state.points().attach(tree(crate::tracking::points::TREE)?);

    let log_store = LogStore { db: db.clone(), logs, meta, cache: Arc::new(Mutex::new(TailCache::default())) };
    let sm = StateMachineStore::open(db, snapshot, state)?;
    Ok((log_store, sm))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    serde_json::to_vec(v).map_err(|e| AnyError::new(&e))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AnyError> {
    serde_json::from_slice(bytes).map_err(|e| AnyError::new(&e))
}

fn io_err(e: &sled::Error) -> AnyError {
    AnyError::new(e)
}

fn to_io_error(e: sled::Error) -> std::io::Error {
    match e {
        sled::Error::Io(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

/// The Raft log, vote and committed index, in sled. Cloning is cheap and shares the database
/// (it is also the log reader handed to replication tasks).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
    /// Decoded copy of the most recently appended entries.
    cache: Arc<Mutex<TailCache>>,
}

impl LogStore {
    fn read_meta<T: DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, AnyError> {
        match self.meta.get(k).map_err(|e| io_err(&e))? {
            Some(v) => Ok(Some(from_json(&v)?)),
            None => Ok(None),
        }
    }

    fn write_meta<T: Serialize>(&self, k: &[u8], v: &T) -> Result<(), AnyError> {
        self.meta.insert(k, to_json(v)?).map_err(|e| io_err(&e))?;
        Ok(())
    }

    // The error type is openraft's, fixed by the storage traits.
    #[allow(clippy::result_large_err)]
    fn last_purged(&self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        self.read_meta(KEY_LAST_PURGED).map_err(|e| StorageIOError::read_logs(e).into())
    }

    /// The entries of `[start, end)` in order, up to `max_bytes` of encoded entries (at least
    /// one). From the tail cache when it holds `start` and, unless `prefix_will_do`, everything
    /// asked for; from sled otherwise.
    // The error type is openraft's, fixed by the storage traits.
    #[allow(clippy::result_large_err)]
    fn read_range(&self, start: u64, end: u64, max_bytes: usize, prefix_will_do: bool) -> Result<Vec<Entry>, RaftStorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        if let Some((entries, whole)) = self.cached_range(start, end, max_bytes) {
            if whole || prefix_will_do {
                return Ok(entries);
            }
        }
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for item in self.logs.range(key(start)..key(end)) {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(io_err(&e)))?;
            if !out.is_empty() && bytes.saturating_add(v.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(v.len());
            out.push(from_json(&v).map_err(StorageIOError::read_logs)?);
        }
        Ok(out)
    }

    /// The first entries of `[start, end)` from the tail cache, up to `max_bytes` (at least one
    /// entry), and whether they are all that was asked for (the byte bound or `end` was
    /// reached); None when the cache does not hold `start`.
    fn cached_range(&self, start: u64, end: u64, max_bytes: usize) -> Option<(Vec<Entry>, bool)> {
        let cache = lock(&self.cache);
        if start < *cache.entries.keys().next()? {
            return None;
        }
        let (mut out, mut bytes, mut next) = (Vec::new(), 0usize, start);
        for (&index, (entry, size)) in cache.entries.range(start..end) {
            if !out.is_empty() && bytes.saturating_add(*size) > max_bytes {
                return Some((out, true));
            }
            bytes = bytes.saturating_add(*size);
            out.push(entry.clone());
            next = index.saturating_add(1);
        }
        (!out.is_empty()).then_some((out, next >= end))
    }

    /// Removes `[start, end]` from the logs tree in one batch.
    fn delete_range(&self, start: u64, end: Option<u64>) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        let range = match end {
            Some(end) => self.logs.range(key(start)..=key(end)),
            None => self.logs.range(key(start)..),
        };
        for item in range.keys() {
            batch.remove(item?);
        }
        self.logs.apply_batch(batch)
    }
}

/// Converts any `RangeBounds<u64>` into a half-open `[start, end)`; `end` saturates at u64::MAX.
fn half_open<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let (start, end) = half_open(&range);
        self.read_range(start, end, usize::MAX, false)
    }

    /// What one replication message carries: the first entries of `[start, end)` up to
    /// [`REPLICATION_BYTES`], at least one (see there).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, RaftStorageError> {
        self.read_range(start, end, REPLICATION_BYTES, true)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = self.logs.last().map_err(|e| StorageIOError::read_logs(io_err(&e)))?;
        let last_log_id = match last {
            Some((_, v)) => {
                let entry: Entry = from_json(&v).map_err(StorageIOError::read_logs)?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.write_meta(KEY_VOTE, vote).map_err(StorageIOError::write_vote)?;
        // A vote must survive a crash, or this node could vote twice in one term.
        self.db.flush_async().await.map_err(|e| StorageIOError::write_vote(io_err(&e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.read_meta(KEY_VOTE).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), RaftStorageError> {
        // Not flushed on its own: the committed index is only a hint for re-applying the log on
        // restart, it rides along with the next log flush (or sled's periodic flush).
        self.write_meta(KEY_COMMITTED, &committed).map_err(StorageIOError::write)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        let got: Option<Option<LogId<NodeId>>> = self.read_meta(KEY_COMMITTED).map_err(StorageIOError::read)?;
        Ok(got.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One insert per entry, not a sled batch: a batch reserves a manifest in sled's log that
        // goes to disk as a write (and a sync) of its own, and takes sled's global write lock.
        // Atomicity is not needed here: the entries are acknowledged only after the flush below,
        // and what a crash can leave of them is a prefix in index order (sled recovers its log
        // in order), which is a valid Raft log.
        let mut appended = Vec::new();
        for entry in entries {
            let value = to_json(&entry).map_err(StorageIOError::write_logs)?;
            // A batch keeps its JSON (`RequestBatch`), which the cache holds with it.
            let kept = match &entry.payload {
                EntryPayload::Normal(batch) => batch.json_len(),
                _ => 0,
            };
            let size = value.len() + kept;
            self.logs.insert(key(entry.log_id.index), value).map_err(|e| StorageIOError::write_logs(io_err(&e)))?;
            appended.push((entry, size));
        }

        {
            let mut cache = lock(&self.cache);
            // Keep the cache contiguous: an append that doesn't continue it starts it afresh.
            let continues = match (cache.entries.keys().next_back(), appended.first()) {
                (Some(&last), Some((first, _))) => first.log_id.index <= last.saturating_add(1),
                _ => true,
            };
            if !continues {
                cache.clear();
            }
            for (entry, size) in appended {
                cache.push(entry, size, TAIL_CACHE_ENTRIES, TAIL_CACHE_BYTES);
            }
        }

        // Durability: the entries are acknowledged only once on disk. One flush per call, so a
        // multi-entry append costs one fsync.
        match self.db.flush_async().await {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the raft log failed");
                let err = StorageIOError::write_logs(io_err(&e));
                callback.log_io_completed(Err(to_io_error(e)));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        tracing::debug!(%log_id, "truncating raft log");
        lock(&self.cache).retain(|idx| idx < log_id.index);
        self.delete_range(log_id.index, None).map_err(|e| StorageIOError::write_logs(io_err(&e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        tracing::debug!(%log_id, "purging raft log");
        // Record the purge point first: if we crash mid-delete, get_log_state still reports it.
        self.write_meta(KEY_LAST_PURGED, &log_id).map_err(StorageIOError::write_logs)?;
        lock(&self.cache).retain(|idx| idx > log_id.index);
        self.delete_range(0, Some(log_id.index)).map_err(|e| StorageIOError::write_logs(io_err(&e)))?;
        Ok(())
    }
}

/// What the state machine has applied: kept apart from the [`StateHandle`] and locked while
/// applying, so a snapshot sees a state and a log id that belong together.
#[derive(Debug, Clone, Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// A persisted snapshot: its meta and the state bytes.
type StoredSnapshot = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// The Raft state machine: applies committed entries to the shared [`StateHandle`] and keeps
/// the current snapshot in sled. Cloning shares everything (the clone is the snapshot builder).
#[derive(Clone)]
pub struct StateMachineStore {
    state: Arc<StateHandle>,
    applied: Arc<Mutex<Applied>>,
    db: sled::Db,
    snapshot: sled::Tree,
}

impl StateMachineStore {
    fn open(db: sled::Db, snapshot: sled::Tree, state: Arc<StateHandle>) -> Result<Self, StorageError> {
        let sm = StateMachineStore { state, applied: Arc::new(Mutex::new(Applied::default())), db, snapshot };
        let persisted = sm.read_snapshot().map_err(|e| StorageError::Snapshot(e.to_string()))?;
        if let Some((meta, data)) = persisted {
            let points_of = sm.snapshot.get(KEY_POINTS_OF).map_err(|e| StorageError::Snapshot(e.to_string()))?;
            let load_points = points_of.as_deref() != Some(meta.snapshot_id.as_bytes());
            sm.state.install_snapshot_bytes(&data, load_points).map_err(|e| StorageError::Snapshot(e.to_string()))?;
            if load_points {
                sm.snapshot.insert(KEY_POINTS_OF, meta.snapshot_id.as_bytes()).map_err(|e| StorageError::Snapshot(e.to_string()))?;
                sm.db.flush().map_err(|e| StorageError::Snapshot(e.to_string()))?;
            }
            tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, load_points, "loaded raft snapshot");
            let mut applied = lock(&sm.applied);
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        Ok(sm)
    }

    /// The shared cluster state this state machine writes.
    pub fn state(&self) -> &Arc<StateHandle> {
        &self.state
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, AnyError> {
        let meta = self.snapshot.get(KEY_SNAPSHOT_META).map_err(|e| io_err(&e))?;
        let data = self.snapshot.get(KEY_SNAPSHOT_DATA).map_err(|e| io_err(&e))?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some((from_json(&meta)?, data.to_vec()))),
            _ => Ok(None),
        }
    }

    /// Stores `meta` + `data` as the current snapshot, atomically and durably, and records that
    /// the points tree holds its points (true of a snapshot just built from it or installed
    /// into it).
    async fn persist_snapshot(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<(), RaftStorageError> {
        let sig = Some(meta.signature());
        // The points the snapshot says the tree holds reach the disk before the snapshot does.
        self.db.flush_async().await.map_err(|e| StorageIOError::write_snapshot(sig.clone(), io_err(&e)))?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT_META, to_json(meta).map_err(|e| StorageIOError::write_snapshot(sig.clone(), e))?);
        batch.insert(KEY_SNAPSHOT_DATA, data);
        batch.insert(KEY_POINTS_OF, meta.snapshot_id.as_bytes());
        self.snapshot.apply_batch(batch).map_err(|e| StorageIOError::write_snapshot(sig.clone(), io_err(&e)))?;
        self.db.flush_async().await.map_err(|e| StorageIOError::write_snapshot(sig, io_err(&e)))?;
        Ok(())
    }
}

impl StateMachineStore {
    /// The metadata of a snapshot of what is applied now (under the applied lock).
    fn snapshot_meta(applied: &Applied) -> SnapshotMeta<NodeId, BasicNode> {
        let snapshot_id = match &applied.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, now_ms()),
            None => format!("0-0-{}", now_ms()),
        };
        SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone(), snapshot_id }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        // The state is serialized under the applied lock, so that it and the metadata are of
        // `last_applied` exactly (this runs in its own task, concurrently with `apply`). Its
        // metric points (millions, seconds to read) are added after the lock is let go, while
        // entries go on being applied (`StateHandle::snapshot_finish`); only when a purge or a
        // restore changed them meanwhile is the whole snapshot taken again, holding the lock.
        let (meta, start) = {
            let applied = lock(&self.applied);
            let start = self.state.snapshot_start().map_err(|e| StorageIOError::read_state_machine(&e))?;
            (Self::snapshot_meta(&applied), start)
        };
        let (state, applied) = (self.state.clone(), self.applied.clone());
        let (meta, data) = tokio::task::spawn_blocking(move || match state.snapshot_finish(start)? {
            Some((data, _)) => Ok((meta, data)),
            None => {
                let applied = lock(&applied);
                let (data, _) = state.to_snapshot_bytes_holding_applies()?;
                Ok((Self::snapshot_meta(&applied), data))
            }
        })
        .await
        .map_err(|e| StorageIOError::read_state_machine(AnyError::error(format!("building a snapshot: {e}"))))?
        .map_err(|e: crate::state::SnapshotError| StorageIOError::read_state_machine(&e))?;
        self.persist_snapshot(&meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built raft snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Milliseconds since the epoch, only to make snapshot ids unique.
fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), RaftStorageError> {
        let applied = lock(&self.applied);
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResponse>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = lock(&self.applied);
        let mut responses = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let resp = match &entry.payload {
                // Every request of a batch is applied at the entry's index, in order.
                EntryPayload::Normal(batch) if !batch.0.is_empty() => BatchResponse(
                    self.state.try_apply_entry(index, &batch.0).map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?,
                ),
                EntryPayload::Normal(_) | EntryPayload::Blank => {
                    self.state.apply_noop(index);
                    BatchResponse::default()
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    self.state.apply_noop(index);
                    BatchResponse::default()
                }
            };
            applied.last_applied = Some(entry.log_id);
            responses.push(resp);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        // The points tree is about to stop matching the persisted snapshot: forget which one it
        // matched first, so that a crash half-way loads the points again on restart.
        let sig = Some(meta.signature());
        self.snapshot.remove(KEY_POINTS_OF).map_err(|e| StorageIOError::write_snapshot(sig.clone(), io_err(&e)))?;
        self.db.flush_async().await.map_err(|e| StorageIOError::write_snapshot(sig, io_err(&e)))?;
        {
            let mut applied = lock(&self.applied);
            self.state.install_snapshot_bytes(&data, true).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        self.persist_snapshot(meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed raft snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let snap = self.read_snapshot().map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(snap.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry {
        Entry { log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), index), payload: openraft::EntryPayload::Blank }
    }

    fn indexes(c: &TailCache) -> Vec<u64> {
        c.entries.keys().copied().collect()
    }

    #[test]
    fn the_tail_cache_is_bounded_by_entries_and_by_bytes() {
        let mut c = TailCache::default();
        for i in 1..=10 {
            c.push(entry(i), 100, 4, 1_000);
        }
        assert_eq!(indexes(&c), vec![7, 8, 9, 10], "the entry bound");
        assert_eq!(c.bytes, 400);
        // Large entries: the byte bound evicts the oldest first.
        c.push(entry(11), 500, 4, 1_000);
        c.push(entry(12), 500, 4, 1_000);
        assert_eq!(indexes(&c), vec![11, 12]);
        assert_eq!(c.bytes, 1_000);
        // An entry larger than the whole bound is still kept, alone (the next read wants it).
        c.push(entry(13), 5_000, 4, 1_000);
        assert_eq!(indexes(&c), vec![13]);
        assert_eq!(c.bytes, 5_000);
        c.push(entry(14), 10, 4, 1_000);
        assert_eq!(indexes(&c), vec![14]);
        // Truncation and purge keep the byte count true.
        for i in 15..=17 {
            c.push(entry(i), 10, 4, 1_000);
        }
        c.retain(|i| i < 16);
        assert_eq!((indexes(&c), c.bytes), (vec![14, 15], 20));
        c.clear();
        assert_eq!((indexes(&c), c.bytes), (vec![], 0));
    }
}
