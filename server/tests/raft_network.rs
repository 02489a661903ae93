//! Raft over the gRPC network: a leader brings a fresh learner up to date through
//! InstallSnapshot (its log is purged) and AppendEntries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::v1::Node;
use mlp_server::raft::{open_storage, raft_grpc_service, start, GrpcNetworkFactory, MlpRaft, RaftSettings};
use mlp_server::state::{Command, Request, StateHandle};
use openraft::{BasicNode, Config};
use tokio::net::TcpListener;

fn serve(raft: MlpRaft, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().add_service(raft_grpc_service(raft)).serve_with_incoming(incoming).await;
    })
}

fn upsert(i: usize) -> Request {
    Request {
        now_ms: 1_000 + i as u64,
        command: Command::UpsertNode { node: Node { id: format!("node-{i:04}"), ..Default::default() }, overlay: None, secret_hash: None },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_network_learner_catches_up_over_grpc() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();

    // Leader: a normal single-voter node that snapshots and purges often.
    let listener_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_a = listener_a.local_addr().unwrap().to_string();
    let (state_a, _ev_a) = StateHandle::new();
    let settings = RaftSettings { snapshot_logs: 20, max_in_snapshot_log_to_keep: 5, ..Default::default() };
    let a = tokio::time::timeout(Duration::from_secs(30), start(dir_a.path(), addr_a, settings, state_a)).await.unwrap().unwrap();
    let server_a = serve(a.raft.clone(), listener_a);
    for i in 0..60 {
        a.write(upsert(i)).await.unwrap();
    }
    a.raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.purged.is_some(), "log purged").await.unwrap();

    // Learner: an uninitialized Raft built from the same pieces.
    let listener_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_b = listener_b.local_addr().unwrap().to_string();
    let (state_b, _ev_b) = StateHandle::new();
    let (log_b, sm_b) = open_storage(dir_b.path(), state_b.clone()).unwrap();
    let config = Arc::new(Config { heartbeat_interval: 100, ..Default::default() }.validate().unwrap());
    let b_id = 4242;
    let b = MlpRaft::new(b_id, config, GrpcNetworkFactory::new(), log_b, sm_b).await.unwrap();
    let server_b = serve(b.clone(), listener_b);

    tokio::time::timeout(Duration::from_secs(20), a.raft.add_learner(b_id, BasicNode { addr: addr_b }, true))
        .await
        .expect("add_learner timed out")
        .expect("add_learner failed");
    for i in 60..70 {
        a.write(upsert(i)).await.unwrap();
    }
    let last = a.metrics().applied_index;
    b.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(last), "learner caught up").await.unwrap();

    let ids = |s: &StateHandle| s.read().nodes.keys().cloned().collect::<BTreeSet<String>>();
    assert_eq!(ids(&state_b).len(), 70);
    assert_eq!(ids(&state_b), ids(&a.state));
    assert!(b.metrics().borrow().snapshot.is_some(), "learner should have installed a snapshot");
    assert_eq!(b.metrics().borrow().current_leader, Some(a.node_id));

    b.shutdown().await.unwrap();
    a.shutdown().await;
    server_a.abort();
    server_b.abort();
}
