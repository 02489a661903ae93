//! Metric points in the Raft state machine: they live in the points tree (not in the in-memory
//! state), travel in snapshots, migrate out of older snapshots, survive a reopen without being
//! reloaded, and a replayed entry writes no point twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use mlp_server::raft::{open_storage, Entry, RequestBatch, StateMachineStore};
use mlp_server::state::{Command, Request, StateHandle};
use mlp_server::tracking::points::{point_key, PointOp};
use mlp_server::tracking::state::{Metric, MetricPoint, MetricValue, DEFAULT_EXPERIMENT_ID};
use mlp_server::tracking::TrackingCommand;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftSnapshotBuilder};

fn entry(index: u64, cmds: Vec<TrackingCommand>) -> Entry {
    let reqs = cmds.into_iter().map(|c| Request { now_ms: 1_000 + index, command: Command::Tracking(c) }).collect();
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(RequestBatch::new(reqs)) }
}

fn create_run(id: &str) -> TrackingCommand {
    TrackingCommand::CreateRun {
        run_id: id.into(),
        experiment_id: DEFAULT_EXPERIMENT_ID.into(),
        run_name: id.into(),
        user_id: "u".into(),
        start_time: 1,
        tags: vec![],
    }
}

/// `n` points of `key` for `run`, steps `from..from+n`.
fn log(run: &str, key: &str, from: i64, n: i64) -> TrackingCommand {
    let metrics =
        (from..from + n).map(|s| Metric { key: key.into(), value: MetricValue(s as f64 / 2.0), timestamp: 10 * s, step: s }).collect();
    TrackingCommand::LogBatch { run_id: run.into(), metrics, params: vec![], tags: vec![] }
}

fn open(dir: &Path) -> (Arc<StateHandle>, StateMachineStore) {
    let (state, _events) = StateHandle::new();
    let (_log, sm) = open_storage(dir, state.clone()).unwrap();
    (state, sm)
}

fn history(state: &StateHandle, run: &str, key: &str) -> Vec<(i64, i64)> {
    state.points().history(run, key).unwrap().iter().map(|p| (p.step, p.timestamp)).collect()
}

/// The first entries: two runs, points in several entries and several requests of one entry.
fn first_entries() -> Vec<Entry> {
    vec![
        entry(1, vec![create_run("r1"), create_run("r2")]),
        entry(2, vec![log("r1", "loss", 0, 100), log("r1", "acc", 0, 3), log("r1", "loss", 100, 5)]),
        entry(3, vec![log("r2", "loss", 0, 7), log("r1", "loss", 50, 1)]),
    ]
}

#[tokio::test]
async fn tracking_snapshot_install_carries_points_and_replaces_the_tree() {
    let a_dir = tempfile::tempdir().unwrap();
    let (a, mut a_sm) = open(a_dir.path());
    a_sm.apply(first_entries()).await.unwrap();
    assert_eq!(a.points().len(), 116);
    let snap = a_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

    // A follower with points of its own that the leader's state does not have.
    let b_dir = tempfile::tempdir().unwrap();
    let (b, mut b_sm) = open(b_dir.path());
    b_sm.apply(vec![entry(1, vec![create_run("stale")]), entry(2, vec![log("stale", "x", 0, 4)])]).await.unwrap();
    assert_eq!(b.points().len(), 4);
    b_sm.install_snapshot(&snap.meta, Box::new(Cursor::new(snap.snapshot.into_inner()))).await.unwrap();

    assert_eq!(b.points().len(), 116, "the leader's points, and only those");
    for (run, key) in [("r1", "loss"), ("r1", "acc"), ("r2", "loss"), ("stale", "x")] {
        assert_eq!(history(&b, run, key), history(&a, run, key), "{run}/{key}");
    }
    let loss = history(&b, "r1", "loss");
    assert_eq!(loss.len(), 106);
    assert_eq!(loss[105], (50, 500), "logged order: the late step-50 point comes last");
    let st = b.read();
    assert_eq!(st.tracking.run("r1").unwrap().latest("loss").map(|p| p.step), Some(104));
    drop(st);

    // The follower restarts: the tree matches its persisted snapshot, nothing is reloaded,
    // and the points are all there.
    drop((b, b_sm));
    let (b, _b_sm) = open(b_dir.path());
    assert_eq!(b.points().len(), 116);
    assert_eq!(history(&b, "r1", "loss"), loss);
}

#[tokio::test]
async fn a_snapshot_holds_the_points_of_its_index_while_later_entries_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut a_sm) = open(dir.path());
    a_sm.apply(first_entries()).await.unwrap();
    let want: Vec<_> = [("r1", "loss"), ("r1", "acc"), ("r2", "loss")].iter().map(|(r, k)| history(&a, r, k)).collect();

    // The state is taken at index 3; entries 4 and 5 are applied before the points are read
    // (applies do not wait for the points scan), and their points are not in the snapshot.
    let start = a.snapshot_start().unwrap();
    assert_eq!(start.index(), 3);
    a_sm.apply(vec![entry(4, vec![log("r1", "loss", 200, 10)]), entry(5, vec![create_run("r3"), log("r3", "m", 0, 2)])]).await.unwrap();
    assert_eq!(a.points().len(), 128);
    let (bytes, index) = a.snapshot_finish(start).unwrap().expect("nothing out of order happened");
    assert_eq!(index, 3);
    let (b, _events) = StateHandle::new();
    b.install_snapshot_bytes(&bytes, true).unwrap();
    assert_eq!(b.points().len(), 116, "the points of entries 1-3 only");
    let got: Vec<_> = [("r1", "loss"), ("r1", "acc"), ("r2", "loss")].iter().map(|(r, k)| history(&b, r, k)).collect();
    assert_eq!(got, want);
    assert_eq!(b.read().index, 3);

    // A purge while the points are read cannot be told apart by its index: the snapshot is
    // refused, and the holding path takes it with the purge in.
    let start = a.snapshot_start().unwrap();
    a.points().apply(6, &[PointOp::RemoveRun("r2".into())]).unwrap();
    assert!(a.snapshot_finish(start).unwrap().is_none(), "a purge meanwhile is noticed");
    // So is a restore's point, which carries the index of the cluster it was saved from.
    let start = a.snapshot_start().unwrap();
    let restored = PointOp::Put { key: point_key("r1", "loss", 2, 9_999), value: [0; 24] };
    a.points().apply(7, &[restored]).unwrap();
    assert!(a.snapshot_finish(start).unwrap().is_none(), "a restored point meanwhile is noticed");
    // Points of the applying entry's own index are not out of order.
    let start = a.snapshot_start().unwrap();
    a.points().apply(8, &[PointOp::Put { key: point_key("r1", "loss", 8, 0), value: [0; 24] }]).unwrap();
    assert!(a.snapshot_finish(start).unwrap().is_some());

    let (bytes, _) = a.to_snapshot_bytes_at().unwrap();
    let (c, _events) = StateHandle::new();
    c.install_snapshot_bytes(&bytes, true).unwrap();
    assert!(history(&c, "r2", "loss").is_empty(), "the purge is in the snapshot taken after it");
    assert_eq!(c.points().len(), a.points().len() - 1, "all but the point of index 8, after the state's index (5)");
}

#[tokio::test]
async fn tracking_restart_keeps_the_tree_and_a_replayed_tail_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tail = vec![entry(4, vec![log("r1", "loss", 200, 10)]), entry(5, vec![create_run("r3"), log("r3", "m", 0, 2)])];
    {
        let (state, mut sm) = open(dir.path());
        sm.apply(first_entries()).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        // Applied after the snapshot: in the tree, not in the snapshot.
        sm.apply(tail.clone()).await.unwrap();
        assert_eq!(state.points().len(), 128);
    }
    let (state, mut sm) = open(dir.path());
    // Not reloaded from the snapshot (which would have dropped the tail's 12 points).
    assert_eq!(state.points().len(), 128, "the tree was kept as it was");
    assert_eq!(state.read().index, 3, "the state comes from the snapshot");
    // openraft applies the committed tail again: same keys, no duplicates.
    sm.apply(tail).await.unwrap();
    assert_eq!(state.points().len(), 128);
    assert_eq!(history(&state, "r1", "loss").len(), 116);
    assert_eq!(history(&state, "r3", "m"), vec![(0, 0), (1, 10)]);
}

#[tokio::test]
async fn tracking_points_of_an_older_snapshot_migrate_into_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    // A snapshot as servers wrote it before points moved to disk: the state's JSON alone,
    // every point inside its run. Written straight into the database, as the old server left it.
    let old_state = r#"{"jobs":{},"job_versions":{},"evals":{},"allocs":{},"nodes":{},"index":9,
        "tracking":{"runs":{"r1":{"run_id":"r1","experiment_id":"0","run_name":"r","user_id":"u","status":"RUNNING",
        "start_time":1,"end_time":null,"artifact_uri":"a","lifecycle_stage":"active","params":{},"tags":{},
        "metrics":{"loss":[{"value":3.0,"timestamp":10,"step":0},{"value":"NaN","timestamp":12,"step":2},{"value":5.0,"timestamp":9,"step":0}]}}}}}"#;
    let meta: openraft::SnapshotMeta<u64, openraft::BasicNode> = openraft::SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 9)),
        last_membership: openraft::StoredMembership::default(),
        snapshot_id: "1-9-0".into(),
    };
    let meta = serde_json::to_vec(&meta).unwrap();
    {
        let db = sled::open(dir.path().join("raft")).unwrap();
        let t = db.open_tree("snapshot").unwrap();
        t.insert("meta", meta).unwrap();
        t.insert("data", old_state.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let (state, mut sm) = open(dir.path());
    assert_eq!(history(&state, "r1", "loss"), vec![(0, 10), (2, 12), (0, 9)], "moved into the tree, in logged order");
    {
        let st = state.read();
        let run = st.tracking.run("r1").unwrap();
        assert!(run.legacy_metrics.is_empty(), "no point stays in memory");
        let latest = run.latest("loss").unwrap();
        assert_eq!((latest.step, latest.timestamp), (2, 12));
        assert!(latest.value.0.is_nan());
    }
    // Points logged since come after them.
    sm.apply(vec![entry(10, vec![log("r1", "loss", 3, 1)])]).await.unwrap();
    assert_eq!(history(&state, "r1", "loss"), vec![(0, 10), (2, 12), (0, 9), (3, 30)]);
    // The next snapshot is in the new format, with the points after the state, none inside it.
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let bytes = snap.snapshot.into_inner();
    assert!(bytes.starts_with(mlp_server::state::SNAPSHOT_MAGIC));
    assert!(!String::from_utf8_lossy(&bytes).contains("\"metrics\""));
    drop((state, sm));
    // Reopened: the migrated points are neither lost nor doubled.
    let (state, _sm) = open(dir.path());
    assert_eq!(history(&state, "r1", "loss").len(), 4);
}

#[tokio::test]
async fn tracking_state_in_memory_does_not_grow_with_points() {
    let dir = tempfile::tempdir().unwrap();
    let (state, mut sm) = open(dir.path());
    sm.apply(vec![entry(1, vec![create_run("r1")]), entry(2, vec![log("r1", "loss", 0, 1)])]).await.unwrap();
    let size = |s: &StateHandle| serde_json::to_vec(&s.read().tracking).unwrap().len();
    let points_in_memory = |s: &StateHandle| {
        let st = s.read();
        st.tracking.runs.values().map(|r| r.latest_metrics.len() + r.legacy_metrics.values().map(Vec::len).sum::<usize>()).sum::<usize>()
    };
    let (one_size, one_count) = (size(&state), points_in_memory(&state));
    // 20,000 more points, in 20 entries of 1,000.
    let entries: Vec<Entry> = (0..20).map(|i| entry(3 + i, vec![log("r1", "loss", 1 + 1000 * i as i64, 1000)])).collect();
    sm.apply(entries).await.unwrap();
    assert_eq!(state.points().len(), 20_001);
    assert_eq!(points_in_memory(&state), one_count, "one point per run and key in memory, whatever the history");
    // The latest value changed (a longer number), nothing else: the size stays within a few bytes.
    assert!(size(&state).abs_diff(one_size) < 32, "{} vs {one_size}", size(&state));
    assert_eq!(
        state.read().tracking.run("r1").unwrap().latest("loss"),
        Some(&MetricPoint { value: MetricValue(10_000.0), timestamp: 200_000, step: 20_000 })
    );
}

#[tokio::test]
async fn tracking_operator_restore_drops_the_points_of_runs_it_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let (state, mut sm) = open(dir.path());
    sm.apply(first_entries()).await.unwrap();
    // A state saved with r1 only (as `mlp operator snapshot save` writes it: no points).
    let saved = {
        let mut st = state.read().clone();
        st.tracking.runs.remove("r2");
        serde_json::to_string(&st).unwrap()
    };
    let restore = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 4),
        payload: EntryPayload::Normal(RequestBatch::new(vec![Request {
            now_ms: 5,
            command: Command::RestoreState { state: saved, points: None },
        }])),
    };
    sm.apply(vec![restore]).await.unwrap();
    assert_eq!(history(&state, "r2", "loss"), vec![], "r2 is gone, and its points with it");
    assert_eq!(history(&state, "r1", "loss").len(), 106, "r1 keeps its history");
}

/// Every (key, value) of the points tree, in key order.
fn all_points(state: &StateHandle) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    state
        .points()
        .for_each(|k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    out
}

fn one(index: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(RequestBatch::new(vec![Request { now_ms: 5, command }])),
    }
}

/// An operator restore of a snapshot that carries points (`mlp operator snapshot save`): the
/// state, then the points in chunks; every point of the tree is replaced by the saved ones,
/// exactly, a repeated chunk changes nothing, a chunk of a superseded restore is refused, and a
/// reopen (the log tail re-applied) keeps the same points.
#[tokio::test]
async fn tracking_operator_restore_with_points_replaces_every_point_in_chunks() {
    use mlp_server::tracking::points::{base64_encode, section_chunks, PointsRestore};
    let dir = tempfile::tempdir().unwrap();
    let (state, mut sm) = open(dir.path());
    sm.apply(first_entries()).await.unwrap();
    let saved_points = all_points(&state);
    let (saved, _) = state.to_snapshot_bytes_at().unwrap();
    let (json, section) = mlp_proto::snapshot::split(&saved).unwrap();
    let (json, section) = (String::from_utf8(json.to_vec()).unwrap(), section.unwrap().to_vec());

    // Later: more points for r1, a new run with points, r2 purged.
    sm.apply(vec![
        entry(4, vec![log("r1", "loss", 1000, 20), create_run("r3"), log("r3", "loss", 0, 9)]),
        entry(
            5,
            vec![
                TrackingCommand::DeleteRun { run_id: "r2".into() },
                TrackingCommand::PurgeRuns { run_ids: vec!["r2".into()], older_than_ms: 0 },
            ],
        ),
    ])
    .await
    .unwrap();
    assert_ne!(all_points(&state), saved_points);
    assert!(!state.read().tracking.runs.contains_key("r2"), "r2 was purged");

    // Small chunks, so there are several.
    let chunks: Vec<_> = section_chunks(&section, 300).map(Result::unwrap).collect();
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    assert_eq!(chunks.iter().map(|c| c.points).sum::<u64>(), saved_points.len() as u64);
    let restore =
        |id: &str| PointsRestore { id: id.into(), points: saved_points.len() as u64, chunks: chunks.len() as u32, ..Default::default() };
    let put = |id: &str, n: usize| Command::RestorePoints { id: id.into(), chunk: n as u32, points: base64_encode(&chunks[n].bytes) };

    // A first restore that stops after one chunk, then the rerun (another id).
    let mut index = 6;
    sm.apply(vec![one(index, Command::RestoreState { state: json.clone(), points: Some(restore("first")) })]).await.unwrap();
    assert_eq!(state.points().len(), 0, "the restore cleared every point");
    sm.apply(vec![one(index + 1, put("first", 0))]).await.unwrap();
    index += 2;
    sm.apply(vec![one(index, Command::RestoreState { state: json.clone(), points: Some(restore("second")) })]).await.unwrap();
    assert_eq!(state.points().len(), 0);
    for n in 0..chunks.len() {
        index += 1;
        sm.apply(vec![one(index, put("second", n))]).await.unwrap();
        if n == 1 {
            // A retried chunk that had committed, and one of the superseded restore.
            index += 1;
            sm.apply(vec![one(index, put("second", 0))]).await.unwrap();
            index += 1;
            sm.apply(vec![one(index, put("first", 1))]).await.unwrap();
        }
    }
    assert_eq!(all_points(&state), saved_points, "exactly the saved points");
    let progress = state.read().points_restore.clone().unwrap();
    assert!(progress.complete() && progress.id == "second" && progress.loaded_points == saved_points.len() as u64, "{progress:?}");
    assert_eq!(history(&state, "r2", "loss").len(), 7, "the purged run is back with its history");
    assert!(state.read().tracking.runs.contains_key("r2") && !state.read().tracking.runs.contains_key("r3"));

    // A chunk out of order is refused; so is one that does not decode.
    let out_of_order = Command::RestorePoints { id: "second".into(), chunk: chunks.len() as u32 + 1, points: String::new() };
    let mut st = state.read().clone();
    assert!(st
        .apply(100, &Request { now_ms: 1, command: out_of_order }, &mut Vec::new())
        .error
        .is_some_and(|e| e.contains("out of order")));

    // Reopened: the log tail (restores, chunks) re-applied gives the same points.
    drop((state, sm));
    let (state, _sm) = open(dir.path());
    assert_eq!(all_points(&state), saved_points);
}
