//! Starting a Raft node and writing through it.
//!
//! [`start`] gives the data directory a node id (generated once, kept in `<data_dir>/node-id`),
//! opens the sled storage, bootstraps a single-voter cluster the first time, and waits until
//! the node leads and has re-applied its log. [`RaftNode::write`] is the one way the rest of the
//! server changes the cluster state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch};

use super::cluster::PeerClients;
use super::network::GrpcNetworkFactory;
use super::store::{open_storage, StorageError};
use super::{MlpRaft, NodeId, RequestBatch};
use crate::state::{CommandResponse, Request, StateHandle};

/// How long [`start`] waits for leadership and for the log to be re-applied.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`start`] retries opening the sled database while a previous instance in this
/// process (a restart) is still releasing its file lock.
const OPEN_RETRY_FOR: Duration = Duration::from_secs(5);
/// Most requests committed as one log entry.
const MAX_BATCH: usize = 256;
/// Writes queued for the batcher before `write` callers wait for room (back-pressure).
const WRITE_QUEUE: usize = 4096;
/// Raft entries the write batcher has in flight at once.
const WRITES_IN_FLIGHT: usize = 4;

type WriteReply = oneshot::Sender<Result<CommandResponse, WriteError>>;

/// Raft timing and log-compaction settings.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, so slightly lagging followers catch up from the log.
    pub max_in_snapshot_log_to_keep: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 250,
            election_min_ms: 1000,
            election_max_ms: 2000,
            snapshot_logs: 5000,
            max_in_snapshot_log_to_keep: 1000,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftStartError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("invalid node id in {path}: {content:?}")]
    BadNodeId { path: PathBuf, content: String },
    #[error("raft storage: {0}")]
    Storage(#[from] StorageError),
    #[error("raft config: {0}")]
    Config(#[source] Box<openraft::ConfigError>),
    #[error("raft: {0}")]
    Raft(String),
    #[error("no leader after {0:?}")]
    NoLeader(Duration),
}

/// Why a write (or a linearizable read) did not happen. Serializable: a follower receives it
/// from the leader it forwarded a write to.
#[derive(Debug, Clone, thiserror::Error, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WriteError {
    /// This node doesn't lead; `leader_addr` is the leader's Raft address when known.
    #[error("not the leader (leader: {})", leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader { leader_addr: Option<String> },
    /// The state machine refused the command (e.g. stopping an unknown job).
    #[error("{0}")]
    Rejected(String),
    /// Any other Raft failure (no quorum, membership change in progress, ...).
    #[error("raft: {0}")]
    Raft(String),
    /// The leader could not be reached (or did not answer in time).
    #[error("leader unreachable: {0}")]
    Unreachable(String),
    /// The Raft is stopped or failed.
    #[error("raft stopped: {0}")]
    Stopped(String),
}

/// A summary of the node's Raft metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaftMetricsView {
    pub term: u64,
    pub leader_id: Option<NodeId>,
    /// Index of the last log entry (an upper bound of the commit index).
    pub commit_index: u64,
    pub applied_index: u64,
}

/// A running Raft node.
pub struct RaftNode {
    pub raft: MlpRaft,
    pub node_id: NodeId,
    /// The gRPC address this node advertises to its peers.
    pub addr: String,
    pub state: Arc<StateHandle>,
    pub settings: RaftSettings,
    leader_rx: watch::Receiver<bool>,
    writes: mpsc::Sender<(Request, WriteReply)>,
    /// Connections to other servers, for forwarded writes, reads and membership RPCs.
    pub(crate) peers: PeerClients,
    /// Serializes membership changes made by this node while it leads (joins, removals).
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// This node's batched queues of writes forwarded to the leader.
    pub(crate) forwarders: super::forward::Forwarders,
}

/// Starts the Raft node stored in `data_dir` as a single-voter cluster (bootstrapping it the
/// first time) and waits until it leads and has re-applied its log. `advertise_addr` is the
/// host:port of the gRPC listener that serves [`super::raft_grpc_service`].
pub async fn start(
    data_dir: &Path,
    advertise_addr: String,
    settings: RaftSettings,
    state: Arc<StateHandle>,
) -> Result<RaftNode, RaftStartError> {
    let node = open(data_dir, advertise_addr, settings, state).await?;
    node.bootstrap_single().await?;
    node.wait_until_ready().await?;
    Ok(node)
}

/// Opens the Raft node stored in `data_dir` without bootstrapping anything: a fresh node waits
/// to be initialized or joined (see [`super::cluster`]), an existing one rejoins its cluster
/// with the membership in its log.
pub async fn open(
    data_dir: &Path,
    advertise_addr: String,
    settings: RaftSettings,
    state: Arc<StateHandle>,
) -> Result<RaftNode, RaftStartError> {
    open_with_tls(data_dir, advertise_addr, settings, state, None).await
}

/// [`open`], dialling the other servers over mutual TLS with `tls` (the server role) when given.
pub async fn open_with_tls(
    data_dir: &Path,
    advertise_addr: String,
    settings: RaftSettings,
    state: Arc<StateHandle>,
    tls: Option<Arc<mlp_tls::Tls>>,
) -> Result<RaftNode, RaftStartError> {
    std::fs::create_dir_all(data_dir).map_err(|source| RaftStartError::Io {
        what: "creating data dir",
        path: data_dir.to_path_buf(),
        source,
    })?;
    let node_id = load_or_create_node_id(data_dir)?;
    let (log_store, sm) = open_storage_retrying(data_dir, state.clone()).await?;

    let config = Config {
        cluster_name: "mlp".to_string(),
        heartbeat_interval: settings.heartbeat_ms,
        election_timeout_min: settings.election_min_ms,
        election_timeout_max: settings.election_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_logs),
        max_in_snapshot_log_to_keep: settings.max_in_snapshot_log_to_keep,
        // Entries are batches of up to MAX_BATCH requests; this bounds a replication message
        // while keeping a follower's catch-up to few appends (fsyncs). openraft 0.9 times an
        // AppendEntries out after one heartbeat interval, so short heartbeats get smaller
        // messages, or a lagging follower would time out on every catch-up message forever.
        max_payload_entries: (settings.heartbeat_ms / 8).clamp(4, 128),
        // Purging in batches saves sled work; never wait for more than half a snapshot interval.
        purge_batch_size: (settings.snapshot_logs / 2).clamp(1, 256),
        ..Default::default()
    }
    .validate()
    .map_err(|e| RaftStartError::Config(Box::new(e)))?;

    // Retry a dead peer about once per heartbeat, so a restarted server hears from the leader
    // well within its election timeout (see `GrpcNetworkFactory::with_backoff`).
    let network = GrpcNetworkFactory::with_backoff(Duration::from_millis(settings.heartbeat_ms.max(10))).with_tls(tls.clone());
    let raft = MlpRaft::new(node_id, Arc::new(config), network, log_store, sm).await.map_err(|e| RaftStartError::Raft(e.to_string()))?;

    let leader_rx = spawn_leader_watch(&raft, node_id);
    let writes = spawn_write_batcher(raft.clone());
    tracing::info!(node_id, addr = %advertise_addr, "raft node opened");
    Ok(RaftNode {
        raft,
        node_id,
        addr: advertise_addr,
        state,
        settings,
        leader_rx,
        writes,
        peers: PeerClients::new(tls),
        membership_lock: tokio::sync::Mutex::new(()),
        forwarders: Default::default(),
    })
}

/// Group commit: takes everything queued (up to [`MAX_BATCH`]) and commits it as one entry, so
/// concurrent writers share one append and one fsync. Up to [`WRITES_IN_FLIGHT`] entries are in
/// flight at once (handed to openraft in order, so the log keeps the submission order): a write
/// that arrives while another entry is being fsync'd goes out at once instead of waiting for
/// that entry's commit and apply. Ends when the [`RaftNode`] (the last sender) is dropped.
fn spawn_write_batcher(raft: MlpRaft) -> mpsc::Sender<(Request, WriteReply)> {
    let (tx, mut rx) = mpsc::channel::<(Request, WriteReply)>(WRITE_QUEUE);
    tokio::spawn(async move {
        let window = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
        let mut queued = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut queued, MAX_BATCH).await > 0 {
            let Ok(permit) = window.clone().acquire_owned().await else { return };
            // Everything that queued while waiting for a slot goes in this entry too.
            while queued.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => queued.push(w),
                    Err(_) => break,
                }
            }
            let (requests, replies): (Vec<Request>, Vec<WriteReply>) = queued.drain(..).unzip();
            let n = requests.len();
            // Sent to openraft's core here, in order; the answer is awaited on its own task.
            let sent = raft.client_write_ff(RequestBatch::new(requests)).await;
            tokio::spawn(async move {
                let _permit = permit;
                let result: Result<Vec<CommandResponse>, WriteError> = match sent {
                    Err(fatal) => Err(WriteError::Stopped(fatal.to_string())),
                    Ok(rx) => match rx.await {
                        Err(_) => Err(WriteError::Stopped("the raft core stopped before answering".into())),
                        Ok(Err(e)) => Err(map_write_error(RaftError::APIError(e))),
                        Ok(Ok(resp)) => Ok(resp.data.0),
                    },
                };
                match result {
                    Ok(responses) => {
                        let mut responses = responses.into_iter();
                        for reply in replies {
                            let result = match responses.next() {
                                Some(CommandResponse { error: Some(e), .. }) => Err(WriteError::Rejected(e)),
                                Some(r) => Ok(r),
                                // Can't happen: apply answers every request of a batch.
                                None => Err(WriteError::Raft(format!("no response for a request of a batch of {n}"))),
                            };
                            // The caller may have given up waiting; nothing to do then.
                            let _ = reply.send(result);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, batch = n, "raft write failed");
                        super::forward::fail_all(replies, &err);
                    }
                }
            });
        }
    });
    tx
}

fn map_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader { leader_addr: f.leader_node.map(|n| n.addr) },
        RaftError::APIError(e) => WriteError::Raft(e.to_string()),
        RaftError::Fatal(e) => WriteError::Stopped(e.to_string()),
    }
}

/// Publishes "this node leads" on a watch channel, following the Raft metrics.
fn spawn_leader_watch(raft: &MlpRaft, node_id: NodeId) -> watch::Receiver<bool> {
    let mut metrics = raft.metrics();
    let leads = move |m: &openraft::RaftMetrics<NodeId, BasicNode>| m.current_leader == Some(node_id) && m.state == ServerState::Leader;
    let (tx, rx) = watch::channel(leads(&metrics.borrow()));
    tokio::spawn(async move {
        // Ends when the Raft shuts down (metrics sender dropped) or nobody listens any more.
        while metrics.changed().await.is_ok() {
            let now = leads(&metrics.borrow_and_update());
            tx.send_if_modified(|cur| std::mem::replace(cur, now) != now);
            if tx.is_closed() {
                break;
            }
        }
        tx.send_replace(false);
    });
    rx
}

/// Opens the storage, retrying for a while if the sled database is still locked (by a Raft of
/// this process that is shutting down).
async fn open_storage_retrying(
    data_dir: &Path,
    state: Arc<StateHandle>,
) -> Result<(super::LogStore, super::StateMachineStore), RaftStartError> {
    let deadline = tokio::time::Instant::now() + OPEN_RETRY_FOR;
    loop {
        match open_storage(data_dir, state.clone()) {
            Ok(s) => return Ok(s),
            Err(StorageError::Open { source: sled::Error::Io(io), path })
                if is_lock_error(&io) && tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(%path, error = %io, "raft database locked, retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// sled reports a held file lock as a custom io error wrapping `WouldBlock`.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Reads `<data_dir>/node-id`, or generates a random id and stores it there.
fn load_or_create_node_id(data_dir: &Path) -> Result<NodeId, RaftStartError> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(content) => content.trim().parse::<NodeId>().map_err(|_| RaftStartError::BadNodeId { path: path.clone(), content }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = random_node_id();
            // Durably, before the Raft storage records anything under this id: a server that
            // came back from a power loss with its log but an empty or missing id file would
            // not start, or would start as a stranger to its own cluster.
            mlp_proto::durable::replace_file(&path, format!("{id}\n").as_bytes(), 0o644).map_err(|source| RaftStartError::Io {
                what: "writing",
                path: path.clone(),
                source,
            })?;
            tracing::info!(node_id = id, "generated raft node id");
            Ok(id)
        }
        Err(source) => Err(RaftStartError::Io { what: "reading", path, source }),
    }
}

fn random_node_id() -> NodeId {
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    // Zero reads as "no node" in logs and metrics; avoid it.
    (hi ^ lo).max(1)
}

impl RaftNode {
    /// Bootstraps a single-voter cluster of this node unless the node is initialized already
    /// (a restart, or a node that joined a cluster).
    pub async fn bootstrap_single(&self) -> Result<(), RaftStartError> {
        let initialized = self.raft.is_initialized().await.map_err(|e| RaftStartError::Raft(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        tracing::info!(node_id = self.node_id, addr = %self.addr, "initializing single-voter raft cluster");
        let members = BTreeMap::from([(self.node_id, BasicNode { addr: self.addr.clone() })]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Raced with something that already initialized it: nothing to do.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(RaftStartError::Raft(e.to_string())),
        }
    }

    /// Waits for a leader (this node, when it is the only voter) and for the state machine to
    /// have applied the whole log, so callers see the restored state when it returns.
    pub async fn wait_until_ready(&self) -> Result<(), RaftStartError> {
        let (raft, node_id) = (&self.raft, self.node_id);
        let sole_voter = {
            let m = raft.metrics().borrow().clone();
            let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
            voters == BTreeSet::from([node_id])
        };
        let leader = raft
            .wait(Some(START_TIMEOUT))
            .metrics(|m| if sole_voter { m.current_leader == Some(node_id) } else { m.current_leader.is_some() }, "leader elected")
            .await;
        if let Err(e) = leader {
            if sole_voter {
                return Err(RaftStartError::NoLeader(START_TIMEOUT));
            }
            // With peers, a missing leader is the cluster's state, not a start-up failure.
            tracing::warn!(error = %e, "no raft leader yet");
            return Ok(());
        }
        let caught_up = raft
            .wait(Some(START_TIMEOUT))
            .metrics(|m| m.current_leader != Some(node_id) || m.last_applied.map(|l| l.index) >= m.last_log_index, "log applied")
            .await;
        if let Err(e) = caught_up {
            tracing::warn!(error = %e, "raft log not fully applied yet");
        }
        Ok(())
    }

    /// Commits `req` through this node's Raft (batched with concurrent writes) and returns what
    /// applying it produced; a command the state machine refuses comes back as
    /// [`WriteError::Rejected`]. Fails with [`WriteError::NotLeader`] on a follower: the leader's
    /// own work (plans, node status) uses this; API writes use [`Self::submit`], which forwards.
    pub async fn write(&self, req: Request) -> Result<CommandResponse, WriteError> {
        self.queue_write(req).await.await
    }

    /// Queues `req` for the write batcher (waiting only for room in its queue) and returns the
    /// future of its result: requests queued one after another keep their order in the log.
    pub(crate) async fn queue_write(&self, req: Request) -> impl std::future::Future<Output = Result<CommandResponse, WriteError>> {
        let (tx, rx) = oneshot::channel();
        let closed = || WriteError::Stopped("write batcher stopped".to_string());
        let sent = self.writes.send((req, tx)).await.map_err(|_| closed());
        async move {
            sent?;
            rx.await.map_err(|_| closed())?
        }
    }

    /// Returns once this node is confirmed leader by a quorum and has applied everything
    /// committed before the call. Fails with [`WriteError::NotLeader`] on a follower;
    /// [`Self::linearizable_read`] also works there.
    pub async fn local_read_barrier(&self) -> Result<(), WriteError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader { leader_addr: f.leader_node.map(|n| n.addr) })
            }
            Err(RaftError::APIError(e)) => Err(WriteError::Raft(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WriteError::Stopped(e.to_string())),
        }
    }

    /// How many writes this node forwarded to a leader, and in how many RPCs.
    pub fn forward_stats(&self) -> &super::forward::ForwardStats {
        self.forwarders.stats()
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// The current leader's Raft address, when a leader is known.
    pub fn leader_addr(&self) -> Option<String> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    pub fn metrics(&self) -> RaftMetricsView {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        RaftMetricsView {
            term: m.current_term,
            leader_id: m.current_leader,
            commit_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        }
    }

    /// `true` while this node is leader; changes when leadership is gained or lost.
    pub fn leader_watch(&self) -> watch::Receiver<bool> {
        self.leader_rx.clone()
    }

    /// Stops the Raft (its storage is released once its tasks have finished).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
