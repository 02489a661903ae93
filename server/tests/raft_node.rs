//! A single Raft node end to end: writes, restart from the log, restart from a snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_proto::v1::Node;
use mlp_server::raft::{raft_grpc_service, start, RaftNode, RaftSettings};
use mlp_server::state::{Command, Request, StateHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Starts a node on `dir` with its Raft gRPC service on an ephemeral port.
async fn start_node(dir: &Path, settings: RaftSettings) -> (RaftNode, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (state, _events) = StateHandle::new();
    let node = tokio::time::timeout(Duration::from_secs(30), start(dir, addr.to_string(), settings, state))
        .await
        .expect("start timed out")
        .expect("start failed");
    let svc = raft_grpc_service(node.raft.clone());
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await;
    });
    (node, server)
}

async fn stop_node(node: RaftNode, server: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await.expect("shutdown timed out");
    server.abort();
    let _ = server.await;
    drop(node);
}

fn upsert(i: usize) -> Request {
    Request {
        now_ms: 1_000 + i as u64,
        command: Command::UpsertNode {
            node: Node { id: format!("node-{i:04}"), name: format!("n{i}"), ..Default::default() },
            overlay: None,
            secret_hash: None,
        },
    }
}

async fn write_range(node: &RaftNode, range: std::ops::Range<usize>) {
    for i in range {
        let resp =
            tokio::time::timeout(Duration::from_secs(10), node.write(upsert(i))).await.expect("write timed out").expect("write failed");
        assert!(resp.index > 0);
    }
}

fn node_count(state: &Arc<StateHandle>) -> usize {
    state.read().nodes.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_node_writes_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start_node(dir.path(), RaftSettings::default()).await;
    assert!(node.is_leader());
    // The watch follows the Raft metrics from a task of its own: it may trail `is_leader` briefly.
    let mut watch = node.leader_watch();
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|l| *l)).await.expect("leader watch turns true").expect("watch open");
    assert!(node.leader_addr().is_some());
    let first_id = node.node_id;
    write_range(&node, 0..50).await;
    assert_eq!(node_count(&node.state), 50);
    node.linearizable_read().await.unwrap();
    let m = node.metrics();
    assert_eq!(m.leader_id, Some(first_id));
    assert!(m.applied_index >= 50, "{m:?}");
    stop_node(node, server).await;

    let (node, server) = start_node(dir.path(), RaftSettings::default()).await;
    assert_eq!(node.node_id, first_id);
    assert_eq!(node_count(&node.state), 50);
    write_range(&node, 50..60).await;
    assert_eq!(node_count(&node.state), 60);
    stop_node(node, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_node_restarts_from_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let settings = || RaftSettings { snapshot_logs: 20, max_in_snapshot_log_to_keep: 5, ..Default::default() };
    let (node, server) = start_node(dir.path(), settings()).await;
    write_range(&node, 0..100).await;
    assert_eq!(node_count(&node.state), 100);
    // Wait (bounded) until a snapshot exists and the log before it has been purged.
    let waited = node
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 60) && m.purged.is_some(), "snapshot built")
        .await;
    assert!(waited.is_ok(), "{waited:?}");
    stop_node(node, server).await;

    let (node, server) = start_node(dir.path(), settings()).await;
    assert_eq!(node_count(&node.state), 100);
    let ids: Vec<String> = node.state.read().nodes.keys().cloned().collect();
    assert_eq!(ids.first().map(String::as_str), Some("node-0000"));
    assert_eq!(ids.last().map(String::as_str), Some("node-0099"));
    write_range(&node, 100..110).await;
    assert_eq!(node_count(&node.state), 110);
    stop_node(node, server).await;
}

/// Throughput with 64 concurrent writers through the fsync'd log: printed, not asserted (debug
/// builds on shared CI machines vary too much for a threshold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_node_concurrent_write_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start_node(dir.path(), RaftSettings::default()).await;
    let node = Arc::new(node);
    let per_client = 50;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                node.write(upsert(c * 1000 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    let total = 64 * per_client;
    let rate = total as f64 / elapsed.as_secs_f64();
    eprintln!("raft throughput: {total} writes in {elapsed:?} = {rate:.0}/s");
    assert_eq!(node_count(&node.state), total);
    let node = Arc::try_unwrap(node).ok().unwrap();
    stop_node(node, server).await;
}
