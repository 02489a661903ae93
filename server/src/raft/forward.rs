//! Forwarded writes, batched: a follower sends the writes it has to forward to the leader
//! together, as one `ForwardBatch` RPC, instead of one `Forward` RPC each.
//!
//! Under load most writes arrive at followers (clients spread over the servers), and each
//! forwarded write used to be an h2 stream of its own on both sides: headers, hpack, the tower
//! stack and the gRPC framing, twice. With 500 clients spread over three servers that was about
//! 10% of the cluster's throughput against clients that all talk to the leader (`bench-ha.sh
//! regs`, both alternated in one sitting). etcd's followers batch forwarded proposals the same
//! way (raft `MsgProp` messages carry many entries).
//!
//! Per leader address, one task takes everything queued (up to [`MAX_BATCH`] requests and
//! about [`MAX_BATCH_BYTES`]) and sends it; up to [`IN_FLIGHT`] batches are outstanding at once,
//! so a write that arrives while a batch waits for its commit goes out at once instead of
//! waiting for that commit. An idle follower therefore sends a lone write at once, alone.
//!
//! A leader of an older version answers `Unimplemented` (`PermissionDenied` with ACLs on): the
//! batch, and every later one to that address for [`SINGLES_FOR`], goes out as single `Forward`
//! RPCs (a rolling upgrade keeps its writes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlp_proto::v1::cluster_service_client::ClusterServiceClient;
use mlp_proto::v1::{ForwardBatchRequest, ForwardRequest};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;

use super::node::WriteError;
use crate::state::CommandResponse;

/// Most requests in one `ForwardBatch` (the leader's write batcher takes as many into one entry).
pub const MAX_BATCH: usize = 256;
/// A batch stops growing past this many bytes of requests (a single larger request still goes,
/// alone), well under the servers' 16 MiB gRPC message limit.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches one follower has outstanding to the leader at once.
pub const IN_FLIGHT: usize = 8;
/// Requests queued per leader address before forwarding callers wait for room.
const QUEUE: usize = 4096;

/// The result of one forwarded write, as the leader encodes it.
pub type ForwardResult = Result<CommandResponse, WriteError>;
type Reply = oneshot::Sender<ForwardResult>;
/// A forwarded write waiting in its leader's queue: the serialized request and its caller.
type Queued = (Vec<u8>, Reply);

/// How long a leader that refused a batch gets single `Forward`s before it is asked again (it
/// may have been upgraded in place by then).
const SINGLES_FOR: Duration = Duration::from_secs(60);

/// What a follower knows of whether the leader at an address serves `ForwardBatch`.
#[derive(Debug)]
struct Support {
    /// How long a refusal sends it single `Forward`s ([`SINGLES_FOR`]; shorter in tests).
    singles_for: Duration,
    /// It answered a batch, so batches need no copy of their requests for a fallback.
    confirmed: AtomicBool,
    /// Until when (ms since the epoch) it gets single `Forward`s: it refused a batch.
    singles_until_ms: AtomicU64,
}

/// How a leader of the version before `ForwardBatch` answers one: `Unimplemented`, or with ACLs
/// on `PermissionDenied` (its ACL table denies a method it does not know before tonic could
/// answer). This version's leaders never deny `ForwardBatch`: it needs no token.
fn refused(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unimplemented | tonic::Code::PermissionDenied)
}

/// Forwarding statistics of a follower (for tests and diagnostics).
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Forwarded requests handed to the network.
    pub requests: AtomicU64,
    /// RPCs that carried them (`ForwardBatch` and single `Forward` calls together).
    pub rpcs: AtomicU64,
}

/// The per-leader-address forwarding queues of one server.
pub struct Forwarders {
    queues: Mutex<HashMap<String, mpsc::Sender<Queued>>>,
    stats: Arc<ForwardStats>,
    singles_for: Duration,
}

impl Default for Forwarders {
    fn default() -> Self {
        Forwarders { queues: Mutex::default(), stats: Arc::default(), singles_for: SINGLES_FOR }
    }
}

impl Forwarders {
    /// Forwards `request` (a serialized `state::Request`) to the leader at `addr` through
    /// `client` and waits for its result. The caller retries on `NotLeader`/`Unreachable`.
    pub async fn forward(
        &self,
        addr: &str,
        client: impl FnOnce() -> Result<ClusterServiceClient<Channel>, WriteError>,
        request: Vec<u8>,
        timeout: Duration,
    ) -> ForwardResult {
        let queue = {
            let mut queues = self.queues.lock().map_err(|_| WriteError::Raft("forward queues poisoned".into()))?;
            match queues.get(addr) {
                Some(q) if !q.is_closed() => q.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(run(addr.to_string(), client()?, rx, timeout, self.stats.clone(), self.singles_for));
                    queues.insert(addr.to_string(), tx.clone());
                    tx
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        let stopped = || WriteError::Stopped("the forwarding queue stopped".into());
        queue.send((request, tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.stats
    }
}

/// The forwarding task of one leader address: ends when its queue's sender is dropped (with
/// the server's `RaftNode`).
async fn run(
    addr: String,
    client: ClusterServiceClient<Channel>,
    mut rx: mpsc::Receiver<Queued>,
    timeout: Duration,
    stats: Arc<ForwardStats>,
    singles_for: Duration,
) {
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let support = Arc::new(Support { singles_for, confirmed: AtomicBool::new(false), singles_until_ms: AtomicU64::new(0) });
    let addr: Arc<str> = addr.into();
    let mut queued: Vec<Queued> = Vec::new();
    loop {
        if queued.is_empty() && rx.recv_many(&mut queued, MAX_BATCH).await == 0 {
            return;
        }
        let Ok(permit) = window.clone().acquire_owned().await else { return };
        // Everything that queued while waiting for a slot goes in this batch too.
        while queued.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => queued.push(w),
                Err(_) => break,
            }
        }
        let mut take = 0;
        let mut bytes = 0;
        for (request, _) in &queued {
            if take > 0 && bytes + request.len() > MAX_BATCH_BYTES {
                break;
            }
            bytes += request.len();
            take += 1;
        }
        let batch: Vec<Queued> = queued.drain(..take).collect();
        let (client, addr, support, stats) = (client.clone(), addr.clone(), support.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            send(&addr, client, batch, timeout, &support, &stats).await;
        });
    }
}

async fn send(
    addr: &str,
    mut client: ClusterServiceClient<Channel>,
    batch: Vec<Queued>,
    timeout: Duration,
    support: &Support,
    stats: &ForwardStats,
) {
    let (requests, replies): (Vec<Vec<u8>>, Vec<Reply>) = batch.into_iter().unzip();
    stats.requests.fetch_add(requests.len() as u64, Ordering::Relaxed);
    let now = crate::leader::now_ms();
    if support.singles_until_ms.load(Ordering::Relaxed) <= now {
        // Until the leader has answered a batch, keep the requests to send them singly.
        let kept = (!support.confirmed.load(Ordering::Relaxed)).then(|| requests.clone());
        stats.rpcs.fetch_add(1, Ordering::Relaxed);
        match client.forward_batch(with_timeout(ForwardBatchRequest { requests }, timeout)).await {
            Ok(resp) => {
                support.confirmed.store(true, Ordering::Relaxed);
                let results = resp.into_inner().results;
                if results.len() != replies.len() {
                    let e = WriteError::Raft(format!(
                        "{addr} answered {} results to a batch of {} forwarded writes",
                        results.len(),
                        replies.len()
                    ));
                    fail_all(replies, &e);
                    return;
                }
                for (result, reply) in results.iter().zip(replies) {
                    let _ = reply.send(decode(addr, result));
                }
                return;
            }
            Err(s) if refused(&s) => {
                tracing::info!(leader = %addr, status = %s, "the leader does not take batched forwards; forwarding writes one by one");
                support.confirmed.store(false, Ordering::Relaxed);
                support.singles_until_ms.store(now + support.singles_for.as_millis() as u64, Ordering::Relaxed);
                match kept {
                    Some(kept) => single_all(addr, client, kept, replies, timeout, stats).await,
                    // A leader that took batches before (replaced by an older version at the
                    // same address): nothing was applied, the writers retry, one by one now.
                    None => {
                        let e = WriteError::Unreachable(format!("{addr} refused a batch of forwarded writes: {}", s.message()));
                        fail_all(replies, &e);
                    }
                }
                return;
            }
            Err(s) => {
                fail_all(replies, &status_to_write_error(addr, s));
                return;
            }
        }
    }
    single_all(addr, client, requests, replies, timeout, stats).await;
}

/// Each request as a `Forward` RPC of its own (a leader without `ForwardBatch`), concurrently.
async fn single_all(
    addr: &str,
    client: ClusterServiceClient<Channel>,
    requests: Vec<Vec<u8>>,
    replies: Vec<Reply>,
    timeout: Duration,
    stats: &ForwardStats,
) {
    let calls = requests.into_iter().zip(replies).map(|(request, reply)| {
        let mut client = client.clone();
        stats.rpcs.fetch_add(1, Ordering::Relaxed);
        async move {
            let result = match client.forward(with_timeout(ForwardRequest { request }, timeout)).await {
                Ok(r) => decode(addr, &r.into_inner().result),
                Err(s) => Err(status_to_write_error(addr, s)),
            };
            let _ = reply.send(result);
        }
    });
    futures::future::join_all(calls).await;
}

/// Answers every waiting writer with the same error (callers that gave up are skipped).
pub(super) fn fail_all(replies: Vec<Reply>, e: &WriteError) {
    for reply in replies {
        let _ = reply.send(Err(e.clone()));
    }
}

fn decode(addr: &str, result: &[u8]) -> ForwardResult {
    serde_json::from_slice::<ForwardResult>(result).map_err(|e| WriteError::Raft(format!("decoding forwarded reply from {addr}: {e}")))?
}

pub(super) fn status_to_write_error(addr: &str, s: tonic::Status) -> WriteError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            WriteError::Unreachable(format!("{addr}: {}", s.message()))
        }
        _ => WriteError::Raft(format!("{addr}: {}", s.message())),
    }
}

pub(super) fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use mlp_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
    use mlp_proto::v1::*;
    use std::sync::atomic::AtomicUsize;

    /// A leader of the version before `ForwardBatch`: it answers single forwards with the
    /// request's `now_ms` as the index, and knows nothing else.
    #[derive(Default, Clone)]
    struct OldLeader {
        singles: Arc<AtomicUsize>,
        /// With ACLs on, an older leader's ACL table denies a method it does not know.
        acls: bool,
        /// Upgraded in place (serves `ForwardBatch`) while set; `batches` counts those served.
        upgraded: Arc<AtomicBool>,
        batches: Arc<AtomicUsize>,
    }

    type R<T> = Result<tonic::Response<T>, tonic::Status>;
    #[allow(clippy::result_large_err)] // tonic's handlers return `tonic::Status`
    fn no<T>() -> R<T> {
        Err(tonic::Status::unimplemented("not in this version"))
    }

    #[tonic::async_trait]
    impl ClusterService for OldLeader {
        async fn info(&self, _: tonic::Request<ServerInfoRequest>) -> R<ServerInfoResponse> {
            no()
        }
        async fn join(&self, _: tonic::Request<JoinRequest>) -> R<JoinResponse> {
            no()
        }
        async fn forward(&self, req: tonic::Request<ForwardRequest>) -> R<ForwardResponse> {
            self.singles.fetch_add(1, Ordering::SeqCst);
            let request: crate::state::Request = serde_json::from_slice(&req.into_inner().request).unwrap();
            let result: ForwardResult = Ok(CommandResponse { index: request.now_ms, ..Default::default() });
            Ok(tonic::Response::new(ForwardResponse { result: serde_json::to_vec(&result).unwrap() }))
        }
        async fn forward_batch(&self, req: tonic::Request<ForwardBatchRequest>) -> R<ForwardBatchResponse> {
            if self.upgraded.load(Ordering::SeqCst) {
                self.batches.fetch_add(1, Ordering::SeqCst);
                let results = req
                    .into_inner()
                    .requests
                    .iter()
                    .map(|r| {
                        let request: crate::state::Request = serde_json::from_slice(r).unwrap();
                        let result: ForwardResult = Ok(CommandResponse { index: request.now_ms, ..Default::default() });
                        serde_json::to_vec(&result).unwrap()
                    })
                    .collect();
                return Ok(tonic::Response::new(ForwardBatchResponse { results }));
            }
            if self.acls {
                // The older version's ACL guard, for a method not in its table.
                return Err(tonic::Status::permission_denied("/mlp.v1.ClusterService/ForwardBatch is not an API endpoint that ACLs allow"));
            }
            // What tonic answers for a method the server does not know.
            no()
        }
        async fn read_index(&self, _: tonic::Request<ReadIndexRequest>) -> R<ReadIndexResponse> {
            no()
        }
        async fn list_peers(&self, _: tonic::Request<ListPeersRequest>) -> R<ListPeersResponse> {
            no()
        }
        async fn remove_peer(&self, _: tonic::Request<RemovePeerRequest>) -> R<RemovePeerResponse> {
            no()
        }
        async fn transfer_leadership(&self, _: tonic::Request<TransferLeadershipRequest>) -> R<TransferLeadershipResponse> {
            no()
        }
        type SnapshotSaveStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<SnapshotSaveResponse, tonic::Status>> + Send>>;
        async fn snapshot_save(&self, _: tonic::Request<SnapshotSaveRequest>) -> R<Self::SnapshotSaveStream> {
            no()
        }
        async fn snapshot_restore(&self, _: tonic::Request<tonic::Streaming<SnapshotRestoreRequest>>) -> R<SnapshotRestoreResponse> {
            no()
        }
        async fn trigger_elect(&self, _: tonic::Request<TriggerElectRequest>) -> R<TriggerElectResponse> {
            no()
        }
    }

    fn request(i: u64) -> Vec<u8> {
        serde_json::to_vec(&crate::state::Request { now_ms: i, command: crate::state::Command::UpsertEvals { evals: vec![] } }).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_to_a_leader_without_batches_go_one_by_one_and_keep_their_results() {
        for acls in [false, true] {
            writes_to_an_old_leader(acls).await;
        }
    }

    async fn writes_to_an_old_leader(acls: bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let old = OldLeader { acls, ..Default::default() };
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder().add_service(ClusterServiceServer::new(old.clone())).serve_with_incoming(incoming),
        );
        let client = || Ok(ClusterServiceClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy()));
        let forwarders = Arc::new(Forwarders::default());
        let calls = (1..=40u64).map(|i| {
            let (forwarders, addr) = (forwarders.clone(), addr.clone());
            tokio::spawn(async move { (i, forwarders.forward(&addr, client_for(&addr), request(i), Duration::from_secs(5)).await) })
        });
        for call in calls {
            let (i, result) = call.await.unwrap();
            assert_eq!(result.expect("forwarded").index, i, "each write gets its own result (acls: {acls})");
        }
        assert_eq!(old.singles.load(Ordering::SeqCst), 40, "every write reached the old leader once");
        // Once known, the leader gets no more batches: one more write is one single RPC.
        let rpcs = forwarders.stats().rpcs.load(Ordering::Relaxed);
        assert_eq!(forwarders.forward(&addr, client, request(99), Duration::from_secs(5)).await.unwrap().index, 99);
        assert_eq!(forwarders.stats().rpcs.load(Ordering::Relaxed), rpcs + 1);
        assert_eq!(old.singles.load(Ordering::SeqCst), 41);
        server.abort();
    }

    /// A leader that refused batches is asked again once the singles period is over (upgraded in
    /// place: batches from then on); one that took batches and then refuses one (replaced by an
    /// older version) sends its writers back to retry, with nothing applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusing_leader_is_asked_again_later_and_one_that_stops_taking_batches_gets_retries() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let leader = OldLeader::default();
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder().add_service(ClusterServiceServer::new(leader.clone())).serve_with_incoming(incoming),
        );
        let singles_for = Duration::from_secs(2);
        let forwarders = Forwarders { singles_for, ..Default::default() };
        let forward = |i: u64| forwarders.forward(&addr, client_for(&addr), request(i), Duration::from_secs(5));
        // Refused: the write goes singly, and so does the next one within the period.
        assert_eq!(forward(1).await.unwrap().index, 1);
        leader.upgraded.store(true, Ordering::SeqCst);
        assert_eq!(forward(2).await.unwrap().index, 2);
        assert_eq!((leader.singles.load(Ordering::SeqCst), leader.batches.load(Ordering::SeqCst)), (2, 0));
        // After it, a batch again, which the upgraded leader takes.
        tokio::time::sleep(singles_for + Duration::from_millis(200)).await;
        assert_eq!(forward(3).await.unwrap().index, 3);
        assert_eq!((leader.singles.load(Ordering::SeqCst), leader.batches.load(Ordering::SeqCst)), (2, 1));
        // Replaced by the older version: the writer is told to retry (`submit` does, one by one).
        leader.upgraded.store(false, Ordering::SeqCst);
        match forward(4).await {
            Err(WriteError::Unreachable(m)) => assert!(m.contains("refused a batch"), "{m}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert_eq!(leader.singles.load(Ordering::SeqCst), 2, "nothing was sent singly for it");
        // Its retry goes singly and is applied once.
        assert_eq!(forward(4).await.unwrap().index, 4);
        assert_eq!(leader.singles.load(Ordering::SeqCst), 3);
        server.abort();
    }

    fn client_for(addr: &str) -> impl FnOnce() -> Result<ClusterServiceClient<Channel>, WriteError> {
        let uri = format!("http://{addr}");
        move || Ok(ClusterServiceClient::new(Channel::from_shared(uri).unwrap().connect_lazy()))
    }
}
