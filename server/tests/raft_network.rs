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

/// A follower's forwarded writes travel to the leader in batches (`ForwardBatch`), and each
/// writer still gets its own answer: 300 concurrent writes through a learner all commit, each
/// once, in fewer RPCs than writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_concurrent_writes_are_forwarded_in_batches_each_with_its_own_answer() {
    use mlp_server::raft::cluster::cluster_grpc_service;
    use mlp_server::raft::{open, RaftNode};

    fn serve_node(node: Arc<RaftNode>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(raft_grpc_service(node.raft.clone()))
                .add_service(cluster_grpc_service(node, 0))
                .serve_with_incoming(incoming)
                .await;
        })
    }

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_a = listener_a.local_addr().unwrap().to_string();
    let (state_a, _ev_a) = StateHandle::new();
    let settings = RaftSettings { heartbeat_ms: 100, ..Default::default() };
    let a = Arc::new(
        tokio::time::timeout(Duration::from_secs(30), start(dir_a.path(), addr_a, settings.clone(), state_a.clone()))
            .await
            .unwrap()
            .unwrap(),
    );
    let server_a = serve_node(a.clone(), listener_a);

    let listener_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_b = listener_b.local_addr().unwrap().to_string();
    let (state_b, _ev_b) = StateHandle::new();
    let b = Arc::new(open(dir_b.path(), addr_b.clone(), settings, state_b.clone()).await.unwrap());
    let server_b = serve_node(b.clone(), listener_b);
    tokio::time::timeout(Duration::from_secs(20), a.raft.add_learner(b.node_id, BasicNode { addr: addr_b }, true))
        .await
        .expect("add_learner timed out")
        .expect("add_learner failed");
    let leader = a.node_id;
    b.raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(leader), "the learner knows the leader").await.unwrap();
    assert!(!b.is_leader());

    let writes: Vec<_> = (0..300)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.submit(upsert(i)).await })
        })
        .collect();
    let mut indices = BTreeSet::new();
    for w in writes {
        let resp =
            tokio::time::timeout(Duration::from_secs(60), w).await.expect("write timed out").unwrap().expect("forwarded write committed");
        assert!(resp.error.is_none(), "{resp:?}");
        indices.insert(resp.index);
    }
    let stats = b.forward_stats();
    let (requests, rpcs) =
        (stats.requests.load(std::sync::atomic::Ordering::Relaxed), stats.rpcs.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(requests, 300, "every write went through the follower's forwarding queue");
    assert!(rpcs < requests, "forwarded in batches: {rpcs} RPCs for {requests} writes");
    assert!(indices.len() < 300, "writes of one batch share entries: {} distinct indices", indices.len());
    let count = |s: &Arc<StateHandle>| (0..300).filter(|i| s.read().nodes.contains_key(&format!("node-{i:04}"))).count();
    assert_eq!(count(&state_a), 300, "the leader applied every forwarded write");
    let applied = a.raft.metrics().borrow().last_applied;
    b.raft.wait(Some(Duration::from_secs(10))).applied_index(applied.map(|l| l.index), "caught up").await.unwrap();
    assert_eq!(count(&state_b), 300);

    server_a.abort();
    server_b.abort();
}
