//! A cluster of servers: forming it, forwarding to the leader, and the operator RPCs.
//!
//! * Formation ([`form_cluster`]): a fresh server with `--bootstrap-expect N` asks every
//!   `--join` address for its id (`ClusterService.Info`). Once it knows N servers and none of
//!   them belongs to a cluster yet, the one with the lowest node id among the N lowest
//!   initializes Raft with all N as voters; the others are brought in by the leader's
//!   replication. A server that finds a peer already in a cluster asks it to `Join` (forwarded
//!   to the leader, which adds it as a learner, waits until it caught up, then promotes it to
//!   voter). A restart on an existing data dir is initialized already and does none of this.
//! * Forwarding ([`RaftNode::submit`], [`RaftNode::linearizable_read`]): any server accepts any
//!   request. Followers forward writes to the leader in batches (`ForwardBatch`, carrying
//!   serialized `state::Request`s; see [`super::forward`]) and ask it for a read index
//!   (`ReadIndex`) before reading locally. Both retry across leader changes until
//!   [`FORWARD_DEADLINE`].
//! * Operator RPCs: list peers, remove a peer, transfer leadership, save a state snapshot. openraft 0.9 has no
//!   leadership-transfer API; the leader pauses its heartbeats so the followers' leader leases
//!   expire and has the target call an election (`TriggerElect`) until someone else leads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::v1::cluster_service_client::ClusterServiceClient;
use mlp_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use mlp_proto::v1::*;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::forward::{status_to_write_error, with_timeout};
use super::node::{RaftNode, WriteError};
use super::NodeId;
use crate::state::{CommandResponse, Request};

/// How long a forwarded write or read keeps retrying across leader changes.
pub const FORWARD_DEADLINE: Duration = Duration::from_secs(15);
/// One forwarded RPC attempt.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// A join waits for the learner to catch up: allow it a while.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between attempts while no leader is known or it is unreachable.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Pause between formation rounds.
const FORM_PAUSE: Duration = Duration::from_millis(300);

/// Cached gRPC connections to other servers, by address.
#[derive(Default)]
pub struct PeerClients {
    clients: std::sync::Mutex<HashMap<String, ClusterServiceClient<Channel>>>,
    /// Mutual TLS to the other servers (which must hold the server role), when configured.
    tls: Option<Arc<mlp_tls::Tls>>,
}

impl PeerClients {
    /// Connections dialled over mutual TLS with `tls` when given.
    pub fn new(tls: Option<Arc<mlp_tls::Tls>>) -> Self {
        PeerClients { clients: Default::default(), tls }
    }

    /// This server's TLS identity, if any (for its other outgoing connections).
    pub fn tls(&self) -> Option<&Arc<mlp_tls::Tls>> {
        self.tls.as_ref()
    }

    /// A client for `addr` (connected lazily, so an unreachable peer costs nothing here).
    pub fn get(&self, addr: &str) -> Result<ClusterServiceClient<Channel>, WriteError> {
        let mut map = self.clients.lock().map_err(|_| WriteError::Raft("peer client cache poisoned".into()))?;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(mlp_tls::net::uri_for(addr, self.tls.is_some()))
            .map_err(|e| WriteError::Unreachable(format!("invalid server address {addr:?}: {e}")))?
            .connect_timeout(RPC_TIMEOUT);
        let client = ClusterServiceClient::new(mlp_tls::net::channel_lazy(endpoint, self.tls.as_ref(), mlp_tls::Role::Server))
            .max_decoding_message_size(crate::server::MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(crate::server::MAX_GRPC_MESSAGE_BYTES);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

/// Where a request should go now.
enum Target {
    Local,
    Remote(String),
    Unknown,
}

impl RaftNode {
    fn target(&self) -> Target {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        match m.current_leader {
            Some(l) if l == self.node_id => Target::Local,
            Some(l) => match m.membership_config.membership().get_node(&l) {
                Some(n) => Target::Remote(n.addr.clone()),
                None => Target::Unknown,
            },
            None => Target::Unknown,
        }
    }

    /// Commits `req` through the leader, wherever it is: locally when this node leads, else
    /// forwarded. Retries while there is no leader, the leader is unreachable or it changed,
    /// up to [`FORWARD_DEADLINE`].
    ///
    /// A retry after an attempt whose outcome is unknown (the leader died after committing but
    /// before answering) can apply a request twice; the API's writes are idempotent by key
    /// (job registrations by job id, node upserts by node id), so this shows as a second
    /// evaluation at most, never as a second job.
    pub async fn submit(&self, req: Request) -> Result<CommandResponse, WriteError> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match self.target() {
                // A leader cut off from its quorum never commits: give up at the deadline (the
                // entry may still commit later if it regains the quorum; it was not acknowledged).
                Target::Local => match tokio::time::timeout(remaining, self.write(req.clone())).await {
                    Ok(r) => r,
                    Err(_) => return Err(WriteError::Unreachable(format!("not committed within {FORWARD_DEADLINE:?}"))),
                },
                Target::Remote(addr) => self.forward_write(&addr, &req).await,
                Target::Unknown => Err(WriteError::NotLeader { leader_addr: None }),
            };
            match result {
                Err(e @ (WriteError::NotLeader { .. } | WriteError::Unreachable(_))) => {
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "write not committed yet; retrying on the current leader");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Hands `req` to the batched forwarding queue of the leader at `addr` (see [`super::forward`]).
    async fn forward_write(&self, addr: &str, req: &Request) -> Result<CommandResponse, WriteError> {
        let request =
            mlp_proto::compact::encode(|| serde_json::to_vec(req)).map_err(|e| WriteError::Raft(format!("encoding request: {e}")))?;
        self.forwarders.forward(addr, || self.peers.get(addr), request, RPC_TIMEOUT).await
    }

    /// Returns once this node has applied everything committed before the call, confirmed by
    /// the leader: reads of the state after it are linearizable. On the leader it is openraft's
    /// `ensure_linearizable`; on a follower it asks the leader for its read index and waits
    /// until it has applied that far.
    pub async fn linearizable_read(&self) -> Result<(), WriteError> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match self.target() {
                Target::Local => match tokio::time::timeout(RPC_TIMEOUT.min(remaining), self.local_read_barrier()).await {
                    Ok(r) => r,
                    Err(_) => Err(WriteError::Unreachable("no quorum confirmed the leader in time".into())),
                },
                Target::Remote(addr) => self.remote_read_barrier(&addr, remaining).await,
                Target::Unknown => Err(WriteError::NotLeader { leader_addr: None }),
            };
            match result {
                Err(e @ (WriteError::NotLeader { .. } | WriteError::Unreachable(_))) => {
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    async fn remote_read_barrier(&self, addr: &str, remaining: Duration) -> Result<(), WriteError> {
        let mut client = self.peers.get(addr)?;
        let index = client
            .read_index(with_timeout(ReadIndexRequest {}, RPC_TIMEOUT.min(remaining)))
            .await
            .map_err(|s| status_to_write_error(addr, s))?
            .into_inner()
            .index;
        self.raft
            .wait(Some(remaining.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "read index applied")
            .await
            .map(|_| ())
            .map_err(|e| WriteError::Unreachable(format!("waiting to apply read index {index}: {e}")))
    }

    /// The members as this node sees them (the leader's view includes replication progress).
    pub fn peers_view(&self) -> ListPeersResponse {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched: BTreeMap<NodeId, u64> =
            m.replication.as_ref().map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0))).collect()).unwrap_or_default();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let peers = membership
            .nodes()
            .map(|(id, node)| {
                let leader = m.current_leader == Some(*id);
                RaftPeer {
                    id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                    leader,
                    matched_index: if *id == self.node_id { m.last_log_index.unwrap_or(0) } else { matched.get(id).copied().unwrap_or(0) },
                    last_contact_ms: if leader && *id == self.node_id { m.millis_since_quorum_ack } else { None },
                }
            })
            .collect();
        ListPeersResponse {
            peers,
            term: m.current_term,
            commit_index: m.last_log_index.unwrap_or(0),
            applied_index: applied,
            answered_by: self.node_id,
        }
    }

    /// Adds `id` at `addr` as a learner (waiting until it caught up) and promotes it to voter.
    /// Idempotent: a server that is a voter at that address already is left alone.
    async fn add_voter(&self, id: NodeId, addr: String) -> Result<(), WriteError> {
        let _guard = self.membership_lock.lock().await;
        let (is_voter, known_addr) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            let mem = m.membership_config.membership();
            (mem.voter_ids().any(|v| v == id), mem.get_node(&id).map(|n| n.addr.clone()))
        };
        if is_voter && known_addr.as_deref() == Some(addr.as_str()) {
            return Ok(());
        }
        tracing::info!(node_id = id, %addr, "adding server as learner");
        self.raft.add_learner(id, BasicNode { addr: addr.clone() }, true).await.map_err(map_membership_error)?;
        tracing::info!(node_id = id, %addr, "promoting server to voter");
        self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.map_err(map_membership_error)?;
        Ok(())
    }

    /// Removes `id` from the cluster (a voter is demoted and removed in one change).
    async fn remove_member(&self, id: NodeId) -> Result<(), WriteError> {
        let _guard = self.membership_lock.lock().await;
        let (is_voter, known) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            let mem = m.membership_config.membership();
            (mem.voter_ids().any(|v| v == id), mem.get_node(&id).is_some())
        };
        if !known {
            return Err(WriteError::Rejected(format!("server {id} is not a member")));
        }
        let change =
            if is_voter { ChangeMembers::RemoveVoters(BTreeSet::from([id])) } else { ChangeMembers::RemoveNodes(BTreeSet::from([id])) };
        self.raft.change_membership(change, false).await.map_err(map_membership_error)?;
        tracing::info!(node_id = id, "server removed from the cluster");
        Ok(())
    }

    /// Hands leadership to `target` (or any other voter): see the module docs for how.
    async fn transfer_leadership(&self, target: NodeId) -> Result<NodeId, WriteError> {
        let target = if target == 0 {
            let view = self.peers_view();
            view.peers
                .iter()
                .filter(|p| p.voter && p.id != self.node_id)
                .max_by_key(|p| p.matched_index)
                .map(|p| p.id)
                .ok_or_else(|| WriteError::Rejected("no other voter to transfer leadership to".into()))?
        } else {
            target
        };
        if target == self.node_id {
            return Ok(target);
        }
        let addr = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            let mem = m.membership_config.membership();
            if !mem.voter_ids().any(|v| v == target) {
                return Err(WriteError::Rejected(format!("server {target} is not a voter")));
            }
            mem.get_node(&target).map(|n| n.addr.clone()).unwrap_or_default()
        };
        let mut client = self.peers.get(&addr)?;
        let bound = Duration::from_millis(self.settings.election_max_ms * 4 + 2000);
        let deadline = Instant::now() + bound;
        tracing::info!(target, "transferring leadership: pausing heartbeats");
        self.raft.runtime_config().heartbeat(false);
        let result = loop {
            let leader = self.raft.metrics().borrow().current_leader;
            if let Some(l) = leader {
                if l != self.node_id {
                    break Ok(l);
                }
            }
            if Instant::now() >= deadline {
                break Err(WriteError::Unreachable(format!("server {target} did not take over within {bound:?}")));
            }
            if let Err(s) = client.trigger_elect(with_timeout(TriggerElectRequest {}, RPC_TIMEOUT)).await {
                tracing::debug!(target, error = %s, "trigger elect failed");
            }
            tokio::time::sleep(Duration::from_millis(self.settings.heartbeat_ms.clamp(20, 200))).await;
        };
        self.raft.runtime_config().heartbeat(true);
        result
    }
}

fn map_membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader { leader_addr: f.leader_node.map(|n| n.addr) },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(e))) => {
            WriteError::Unreachable(format!("another membership change is in progress: {e}"))
        }
        RaftError::APIError(e) => WriteError::Raft(e.to_string()),
        RaftError::Fatal(e) => WriteError::Stopped(e.to_string()),
    }
}

/// Brings a fresh server into a cluster (see the module docs); returns once this node belongs
/// to one, or when `stop` fires. Retries forever otherwise: a server waiting for its peers is
/// the expected state while a cluster is being started.
pub async fn form_cluster(node: Arc<RaftNode>, bootstrap_expect: usize, join: Vec<String>, mut stop: watch::Receiver<bool>) {
    let mut logged_waiting = false;
    loop {
        match node.raft.is_initialized().await {
            Ok(true) => {
                tracing::info!(node_id = node.node_id, "server is a cluster member");
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "raft stopped while forming the cluster");
                return;
            }
        }
        if let Some(done) = formation_round(&node, bootstrap_expect, &join, &mut logged_waiting).await {
            if done {
                tracing::info!(node_id = node.node_id, "server is a cluster member");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FORM_PAUSE) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One round of formation. `Some(true)` when this node initialized the cluster or joined it.
async fn formation_round(node: &RaftNode, expect: usize, join: &[String], logged_waiting: &mut bool) -> Option<bool> {
    let mut known: BTreeMap<NodeId, String> = BTreeMap::from([(node.node_id, node.addr.clone())]);
    let mut initialized_peer = None;
    for addr in join.iter().filter(|a| **a != node.addr) {
        let Ok(mut client) = node.peers.get(addr) else { continue };
        match client.info(with_timeout(ServerInfoRequest {}, Duration::from_secs(1))).await {
            Ok(r) => {
                let info = r.into_inner();
                if info.id == node.node_id {
                    continue;
                }
                if info.initialized {
                    initialized_peer = Some(addr.clone());
                }
                known.insert(info.id, info.addr);
            }
            Err(s) => tracing::debug!(%addr, error = %s.message(), "join target not reachable yet"),
        }
    }
    if let Some(addr) = initialized_peer {
        let Ok(mut client) = node.peers.get(&addr) else { return None };
        tracing::info!(%addr, node_id = node.node_id, "joining existing cluster");
        return match client.join(with_timeout(JoinRequest { id: node.node_id, addr: node.addr.clone() }, JOIN_TIMEOUT)).await {
            Ok(_) => Some(true),
            Err(s) => {
                tracing::info!(%addr, error = %s.message(), "join failed; retrying");
                None
            }
        };
    }
    if expect <= 1 || known.len() < expect {
        if !*logged_waiting {
            tracing::info!(known = known.len(), expect, "waiting for servers before bootstrapping");
            *logged_waiting = true;
        }
        return None;
    }
    // Everybody computes the same initializer from the same lowest ids, so exactly one
    // bootstraps; the others learn the membership from its replication.
    let members: BTreeMap<NodeId, BasicNode> = known.into_iter().take(expect).map(|(id, addr)| (id, BasicNode { addr })).collect();
    if members.keys().next() != Some(&node.node_id) {
        return None;
    }
    tracing::info!(node_id = node.node_id, members = ?members.keys().collect::<Vec<_>>(), "bootstrapping the cluster");
    match node.raft.initialize(members).await {
        Ok(()) => Some(true),
        Err(e) => {
            tracing::warn!(error = %e, "bootstrap failed; retrying");
            None
        }
    }
}

/// The `ClusterService` gRPC service.
#[derive(Clone)]
pub struct ClusterGrpc {
    pub node: Arc<RaftNode>,
    pub bootstrap_expect: usize,
}

/// Largest saved snapshot a restore accepts (state and metric points together). The server
/// that takes the upload holds it whole in memory while it checks and commits it (a follower
/// passes it on to the leader, which holds it too); ten million points are about 210 MB in the
/// points section, so this leaves room for more than twice that next to a large state.
pub const MAX_SNAPSHOT_BYTES: usize = 512 * 1024 * 1024;

/// Largest state (its JSON) a restore accepts: it travels as one Raft entry (whose transport
/// allows 256 MiB, and JSON escaping grows it).
pub const MAX_STATE_BYTES: usize = 96 * 1024 * 1024;

/// Most bytes of the points section one `Command::RestorePoints` carries (some 20,000 points: a
/// chunk ends before a point of the longest possible series could take it over). Base64 makes
/// the entry at most about 700 KiB, which every server applies (decodes and writes to its points
/// tree) in a fraction of a second, holding one async worker meanwhile.
pub const RESTORE_POINTS_CHUNK_BYTES: usize = 512 * 1024;

/// The service to mount on a server's gRPC listener.
pub fn cluster_grpc_service(node: Arc<RaftNode>, bootstrap_expect: usize) -> ClusterServiceServer<ClusterGrpc> {
    ClusterServiceServer::new(ClusterGrpc { node, bootstrap_expect })
        .max_decoding_message_size(crate::server::MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_GRPC_MESSAGE_BYTES)
}

fn to_status(e: WriteError) -> tonic::Status {
    match e {
        WriteError::Rejected(m) => tonic::Status::invalid_argument(m),
        WriteError::Raft(m) => tonic::Status::internal(m),
        other => tonic::Status::unavailable(other.to_string()),
    }
}

type GrpcResult<T> = Result<tonic::Response<T>, tonic::Status>;

impl ClusterGrpc {
    /// The leader's client, when this node is not the leader; `None` when it is.
    // `tonic::Status` is what the handlers return; boxing it here buys nothing.
    #[allow(clippy::result_large_err)]
    fn leader_client(&self) -> Result<Option<ClusterServiceClient<Channel>>, tonic::Status> {
        match self.node.target() {
            Target::Local => Ok(None),
            Target::Remote(addr) => self.node.peers.get(&addr).map(Some).map_err(to_status),
            Target::Unknown => Err(tonic::Status::unavailable("no leader is known")),
        }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    async fn info(&self, _req: tonic::Request<ServerInfoRequest>) -> GrpcResult<ServerInfoResponse> {
        let initialized = self.node.raft.is_initialized().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(tonic::Response::new(ServerInfoResponse {
            id: self.node.node_id,
            addr: self.node.addr.clone(),
            initialized,
            bootstrap_expect: self.bootstrap_expect as u64,
        }))
    }

    async fn join(&self, req: tonic::Request<JoinRequest>) -> GrpcResult<JoinResponse> {
        let req = req.into_inner();
        if req.id == 0 || req.addr.is_empty() {
            return Err(tonic::Status::invalid_argument("join needs a node id and an address"));
        }
        if let Some(mut leader) = self.leader_client()? {
            return leader.join(with_timeout(req, JOIN_TIMEOUT)).await;
        }
        self.node.add_voter(req.id, req.addr).await.map_err(to_status)?;
        Ok(tonic::Response::new(JoinResponse { leader_id: self.node.node_id }))
    }

    async fn forward(&self, req: tonic::Request<ForwardRequest>) -> GrpcResult<ForwardResponse> {
        let request: Request = serde_json::from_slice(&req.into_inner().request)
            .map_err(|e| tonic::Status::invalid_argument(format!("decoding forwarded request: {e}")))?;
        // Only ever committed here: a deposed leader answers NotLeader and the sender retries,
        // so a forwarded write never travels more than one hop.
        let result = self.node.write(request).await;
        let result = serde_json::to_vec(&result).map_err(|e| tonic::Status::internal(format!("encoding reply: {e}")))?;
        Ok(tonic::Response::new(ForwardResponse { result }))
    }

    async fn forward_batch(&self, req: tonic::Request<ForwardBatchRequest>) -> GrpcResult<ForwardBatchResponse> {
        let requests = req.into_inner().requests;
        if requests.len() > super::forward::MAX_BATCH {
            return Err(tonic::Status::invalid_argument(format!(
                "a forwarded batch holds at most {} writes, found {}",
                super::forward::MAX_BATCH,
                requests.len()
            )));
        }
        // All are queued before any is awaited, in order, so they can share one Raft entry.
        let mut pending = Vec::with_capacity(requests.len());
        for (i, bytes) in requests.iter().enumerate() {
            pending.push(match serde_json::from_slice::<Request>(bytes) {
                Ok(request) => Ok(self.node.queue_write(request).await),
                Err(e) => Err(WriteError::Rejected(format!("decoding forwarded request {i}: {e}"))),
            });
        }
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            let result = match p {
                Ok(queued) => queued.await,
                Err(e) => Err(e),
            };
            results.push(serde_json::to_vec(&result).map_err(|e| tonic::Status::internal(format!("encoding reply: {e}")))?);
        }
        Ok(tonic::Response::new(ForwardBatchResponse { results }))
    }

    async fn read_index(&self, _req: tonic::Request<ReadIndexRequest>) -> GrpcResult<ReadIndexResponse> {
        let read = tokio::time::timeout(RPC_TIMEOUT, self.node.raft.ensure_linearizable())
            .await
            .map_err(|_| tonic::Status::unavailable("no quorum confirmed the leader in time"))?;
        match read {
            Ok(log_id) => Ok(tonic::Response::new(ReadIndexResponse { index: log_id.map(|l| l.index).unwrap_or(0) })),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    }

    async fn list_peers(&self, req: tonic::Request<ListPeersRequest>) -> GrpcResult<ListPeersResponse> {
        // The leader knows replication progress; fall back to the local view without one.
        if let Ok(Some(mut leader)) = self.leader_client() {
            if let Ok(r) = leader.list_peers(with_timeout(req.into_inner(), RPC_TIMEOUT)).await {
                return Ok(r);
            }
        }
        Ok(tonic::Response::new(self.node.peers_view()))
    }

    async fn remove_peer(&self, req: tonic::Request<RemovePeerRequest>) -> GrpcResult<RemovePeerResponse> {
        let req = req.into_inner();
        if let Some(mut leader) = self.leader_client()? {
            return leader.remove_peer(with_timeout(req, JOIN_TIMEOUT)).await;
        }
        self.node.remove_member(req.id).await.map_err(to_status)?;
        Ok(tonic::Response::new(RemovePeerResponse {}))
    }

    async fn transfer_leadership(&self, req: tonic::Request<TransferLeadershipRequest>) -> GrpcResult<TransferLeadershipResponse> {
        let req = req.into_inner();
        if let Some(mut leader) = self.leader_client()? {
            return leader.transfer_leadership(with_timeout(req, JOIN_TIMEOUT)).await;
        }
        let leader_id = self.node.transfer_leadership(req.target_id).await.map_err(to_status)?;
        Ok(tonic::Response::new(TransferLeadershipResponse { leader_id }))
    }

    type SnapshotSaveStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<SnapshotSaveResponse, tonic::Status>> + Send>>;

    /// Streams the state and every metric point (`mlp_proto::snapshot`: the bytes of a Raft
    /// snapshot) in chunks, so a snapshot larger than one gRPC message saves.
    async fn snapshot_save(&self, req: tonic::Request<SnapshotSaveRequest>) -> GrpcResult<Self::SnapshotSaveStream> {
        if let Some(mut leader) = self.leader_client()? {
            let stream = leader.snapshot_save(with_timeout(req.into_inner(), JOIN_TIMEOUT)).await?.into_inner();
            return Ok(tonic::Response::new(Box::pin(stream)));
        }
        // Everything acknowledged before the call is in the saved snapshot.
        self.node.linearizable_read().await.map_err(to_status)?;
        let handle = self.node.state.clone();
        // Encoding millions of points takes a while: not on the async workers.
        let (saved, index) = tokio::task::spawn_blocking(move || handle.to_snapshot_bytes_at())
            .await
            .map_err(|e| tonic::Status::internal(format!("serializing the state: {e}")))?
            .map_err(|e| tonic::Status::internal(format!("serializing the state: {e}")))?;
        tracing::info!(index, bytes = saved.len(), "state snapshot saved for an operator");
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(mlp_proto::snapshot::save_chunks(saved, index).map(Ok)))))
    }

    /// Disaster recovery: collects the streamed snapshot (at most [`MAX_SNAPSHOT_BYTES`]) and
    /// checks all of it (checksum, the state decodes, the points section decodes) before it
    /// changes anything; a follower passes the chunks on to the leader. Then it commits the state
    /// (`RestoreState`, which clears the metric points when the snapshot carries them) and the
    /// points in chunks of at most [`RESTORE_POINTS_CHUNK_BYTES`] (`RestorePoints`), each through
    /// Raft, so every server converges and no entry is huge. A restore that stops half-way (this
    /// server dies; a leader change the forwarding does not ride out) leaves the state restored
    /// with part of the points; running it again starts over and is safe.
    async fn snapshot_restore(&self, req: tonic::Request<tonic::Streaming<SnapshotRestoreRequest>>) -> GrpcResult<SnapshotRestoreResponse> {
        let mut stream = req.into_inner();
        let mut saved = Vec::new();
        let mut crc32 = None;
        while let Some(chunk) = stream.message().await? {
            crc32.get_or_insert(chunk.crc32);
            if saved.len() + chunk.state.len() > MAX_SNAPSHOT_BYTES {
                return Err(tonic::Status::invalid_argument(format!(
                    "snapshot is larger than {MAX_SNAPSHOT_BYTES} bytes; nothing was changed"
                )));
            }
            saved.extend_from_slice(&chunk.state);
        }
        let expected = crc32.unwrap_or(0);
        let actual = crc32fast::hash(&saved);
        if actual != expected {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot state is corrupt: crc32 {actual:08x}, expected {expected:08x}; nothing was changed"
            )));
        }
        if let Some(mut leader) = self.leader_client()? {
            return leader.snapshot_restore(futures::stream::iter(mlp_proto::snapshot::restore_chunks(saved, expected))).await;
        }
        let checked = tokio::task::spawn_blocking(move || check_saved(saved))
            .await
            .map_err(|e| tonic::Status::internal(format!("checking the snapshot: {e}")))?
            .map_err(tonic::Status::invalid_argument)?;
        self.commit_restore(checked).await
    }

    async fn trigger_elect(&self, _req: tonic::Request<TriggerElectRequest>) -> GrpcResult<TriggerElectResponse> {
        self.node.raft.trigger().elect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(tonic::Response::new(TriggerElectResponse {}))
    }
}

/// A saved snapshot that passed every check, ready to commit.
struct CheckedRestore {
    /// The state's JSON.
    state: String,
    /// The whole saved snapshot and where its points section starts; `None` for the older format
    /// (the state's JSON alone).
    points: Option<(Vec<u8>, usize)>,
    /// Its points and the `RestorePoints` chunks they take.
    point_count: u64,
    chunks: u32,
}

fn refused(what: impl std::fmt::Display) -> String {
    format!("{what}; nothing was changed")
}

/// Everything a restore checks before it changes anything: the format, the state (size, UTF-8,
/// decodes as a `ClusterState`) and, when there is one, the whole points section (it decodes,
/// chunk by chunk as it will be committed). The error says why the snapshot was refused.
fn check_saved(saved: Vec<u8>) -> Result<CheckedRestore, String> {
    let (state, section) = mlp_proto::snapshot::split(&saved).map_err(refused)?;
    if state.len() > MAX_STATE_BYTES {
        return Err(refused(format!("the snapshot's state is larger than {MAX_STATE_BYTES} bytes")));
    }
    let text = std::str::from_utf8(state).map_err(|e| refused(format!("snapshot state is not UTF-8 JSON: {e}")))?.to_string();
    if let Err(e) = serde_json::from_str::<crate::state::ClusterState>(&text) {
        return Err(refused(format!("snapshot state does not decode as a cluster state: {e}")));
    }
    let Some(section) = section else {
        return Ok(CheckedRestore { state: text, points: None, point_count: 0, chunks: 0 });
    };
    let (mut point_count, mut chunks) = (0u64, 0u32);
    for chunk in crate::tracking::points::section_chunks(section, RESTORE_POINTS_CHUNK_BYTES) {
        let chunk = chunk.map_err(|e| refused(format!("the snapshot's metric points do not decode (after {point_count} points): {e}")))?;
        point_count += chunk.points;
        chunks = chunks.checked_add(1).ok_or_else(|| refused("the snapshot has too many metric points"))?;
    }
    let start = saved.len() - section.len();
    Ok(CheckedRestore { state: text, points: Some((saved, start)), point_count, chunks })
}

impl ClusterGrpc {
    /// Commits a checked restore: the state, then its points chunk by chunk (see
    /// [`ClusterService::snapshot_restore`]).
    async fn commit_restore(&self, checked: CheckedRestore) -> GrpcResult<SnapshotRestoreResponse> {
        let CheckedRestore { state, points, point_count, chunks } = checked;
        let id = uuid::Uuid::new_v4().to_string();
        let restore = points.as_ref().map(|_| crate::tracking::points::PointsRestore {
            id: id.clone(),
            points: point_count,
            chunks,
            loaded_chunks: 0,
            loaded_points: 0,
        });
        let bytes = state.len();
        let command = crate::state::Command::RestoreState { state, points: restore };
        let resp = self.node.write(Request { now_ms: crate::leader::now_ms(), command }).await.map_err(to_status)?;
        if let Some(e) = resp.error {
            return Err(tonic::Status::invalid_argument(format!("the state was not restored: {e}")));
        }
        tracing::warn!(index = resp.index, bytes, points = point_count, chunks, "cluster state replaced from an operator's snapshot");
        let mut index = resp.index;
        let Some((saved, start)) = points else {
            return Ok(tonic::Response::new(SnapshotRestoreResponse { index, points: 0 }));
        };
        // Re-encoded as in `check_saved`, off the async workers (a chunk ahead of the commits):
        // a long restore must not keep the servers from answering the clients' pings.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tokio::task::spawn_blocking(move || {
            for chunk in crate::tracking::points::section_chunks(&saved[start..], RESTORE_POINTS_CHUNK_BYTES) {
                let chunk = chunk.map(|c| crate::tracking::points::base64_encode(&c.bytes));
                let failed = chunk.is_err();
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        let mut next = 0u32;
        let failed = |next: u32, index: u64, code: tonic::Code, why: String| {
            tonic::Status::new(
                code,
                format!(
                    "the state was restored (index {index}) but only {next} of {chunks} chunks of its metric points were loaded: \
                     {why}; run the restore again (it starts over)"
                ),
            )
        };
        while let Some(chunk) = rx.recv().await {
            let points = chunk.map_err(|e| failed(next, index, tonic::Code::Internal, e.to_string()))?;
            let command = crate::state::Command::RestorePoints { id: id.clone(), chunk: next, points };
            // Forwarded to the new leader if this server loses the lead half-way.
            match self.node.submit(Request { now_ms: crate::leader::now_ms(), command }).await {
                Ok(r) => match r.error {
                    None => index = r.index,
                    Some(e) => return Err(failed(next, index, tonic::Code::Aborted, e)),
                },
                Err(e) => return Err(failed(next, index, tonic::Code::Unavailable, e.to_string())),
            }
            next += 1;
        }
        if next != chunks {
            return Err(failed(next, index, tonic::Code::Internal, "the encoder stopped early".into()));
        }
        tracing::warn!(index, points = point_count, chunks, "metric points restored from an operator's snapshot");
        Ok(tonic::Response::new(SnapshotRestoreResponse { index, points: point_count }))
    }
}
