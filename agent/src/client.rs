//! The agent's side of `AgentService`: a failover pool of server connections, the
//! register/heartbeat loop, the WatchAllocations loop and the coalescing UpdateAllocs sender.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::consts::node_status;
use mlp_proto::v1::agent_service_client::AgentServiceClient;
use mlp_proto::v1::{AllocClientUpdate, HeartbeatRequest, Node, RegisterNodeRequest, UpdateAllocsRequest, WatchAllocationsRequest};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::{sleep, timeout, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::alloc::manager::AllocManager;
use crate::AgentError;

/// Timeout of each unary RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Exponential backoff between retries.
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { cur: min, min, max }
    }
    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        d
    }
    /// Back to the minimum.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// The node secret (issue 15 §3): made by the agent and kept in a file (0600) before the node
/// id is first registered, which claims the id with it (servers also issue one to an agent that
/// registers without), so that a restarted agent keeps its identity; sent on every agent RPC as
/// `x-mlp-node-secret` (the interceptor of every [`AgentClient`]).
#[derive(Clone, Debug)]
pub struct NodeSecret {
    path: std::path::PathBuf,
    value: Arc<std::sync::RwLock<Option<tonic::metadata::AsciiMetadataValue>>>,
}

impl NodeSecret {
    /// The secret kept in `path`, if there is one (a missing file: none yet).
    pub fn load(path: &std::path::Path) -> Result<NodeSecret, AgentError> {
        let value = match std::fs::read_to_string(path) {
            Ok(s) => {
                let s = s.trim();
                if !mlp_tls::secret::well_formed(s) {
                    return Err(AgentError::Config(format!("{}: not a node secret (64 hex digits expected)", path.display())));
                }
                Some(s.parse().map_err(|_| AgentError::Config(format!("{}: not a node secret", path.display())))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(AgentError::io(format!("reading {}", path.display()))(e)),
        };
        Ok(NodeSecret { path: path.to_path_buf(), value: Arc::new(std::sync::RwLock::new(value)) })
    }

    /// The secret kept in `path`; when there is none yet, a fresh one, written there before this
    /// returns. Made before the first registration, not taken from its answer: an agent killed
    /// between the servers' commit of its claim and the write of an issued secret would be
    /// refused its node id for good (seen as a test that failed once in CI).
    pub fn load_or_create(path: &std::path::Path) -> Result<NodeSecret, AgentError> {
        let secret = NodeSecret::load(path)?;
        if !secret.is_set() {
            let fresh = mlp_tls::secret::generate().map_err(|e| AgentError::Config(format!("making a node secret: {e}")))?;
            secret.set(&fresh)?;
            tracing::info!(file = %path.display(), "node secret made and kept");
        }
        Ok(secret)
    }

    /// A secret that lives in memory only (tests).
    pub fn in_memory() -> NodeSecret {
        NodeSecret { path: std::path::PathBuf::new(), value: Arc::new(std::sync::RwLock::new(None)) }
    }

    pub fn is_set(&self) -> bool {
        self.value.read().map(|v| v.is_some()).unwrap_or(false)
    }

    /// Takes a secret (made here, or issued by the servers) and writes it to the file (temp
    /// file, 0600, fsync, rename, fsync of the directory).
    pub fn set(&self, secret: &str) -> Result<(), AgentError> {
        if !mlp_tls::secret::well_formed(secret) {
            return Err(AgentError::Config("a malformed node secret (64 hex digits expected)".into()));
        }
        let v: tonic::metadata::AsciiMetadataValue =
            secret.parse().map_err(|_| AgentError::Config("a malformed node secret (64 hex digits expected)".into()))?;
        if let Ok(mut g) = self.value.write() {
            *g = Some(v);
        }
        if self.path.as_os_str().is_empty() {
            return Ok(());
        }
        mlp_proto::durable::replace_file(&self.path, format!("{secret}\n").as_bytes(), 0o600)
            .map_err(AgentError::io(format!("writing {}", self.path.display())))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl tonic::service::Interceptor for NodeSecret {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Ok(g) = self.value.read() {
            if let Some(v) = g.as_ref() {
                req.metadata_mut().insert(mlp_tls::secret::METADATA_KEY, v.clone());
            }
        }
        Ok(req)
    }
}

/// A client of one server's `AgentService`, carrying the node secret.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, NodeSecret>>;

/// Connections to the servers, used in order; a failing one hands over to the next.
pub struct ServerPool {
    servers: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    secret: NodeSecret,
}

impl ServerPool {
    /// Lazily connecting channels to every server: over mutual TLS with `tls` (the servers must
    /// hold the server role) when given; every call carries `secret`.
    pub fn new(servers: &[String], tls: Option<&Arc<mlp_tls::Tls>>, secret: NodeSecret) -> Result<Self, AgentError> {
        let mut channels = Vec::new();
        for s in servers {
            let ep = Endpoint::from_shared(mlp_tls::net::uri_for(s, tls.is_some()))
                .map_err(|e| AgentError::Config(format!("bad server address {s:?}: {e}")))?
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10));
            channels.push(mlp_tls::net::channel_lazy(ep, tls, mlp_tls::Role::Server));
        }
        Ok(ServerPool { servers: servers.to_vec(), channels, current: AtomicUsize::new(0), secret })
    }

    /// The node secret the pool's calls carry.
    pub fn secret(&self) -> &NodeSecret {
        &self.secret
    }

    /// Whether there is any server to talk to.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The current server's index and a client for it.
    pub fn client(&self) -> Option<(usize, AgentClient)> {
        if self.channels.is_empty() {
            return None;
        }
        let idx = self.current.load(Ordering::Relaxed) % self.channels.len();
        Some((idx, AgentServiceClient::with_interceptor(self.channels[idx].clone(), self.secret.clone())))
    }

    /// Server `idx` failed: move on to the next one (unless someone already did).
    pub fn failover(&self, idx: usize) {
        if self.channels.len() > 1 {
            let next = (idx + 1) % self.channels.len();
            if self.current.compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                tracing::info!(
                    from = %self.servers[idx],
                    to = %self.servers[next],
                    "failing over to the next server"
                );
            }
        }
    }
}

async fn unary<T, F, Fut>(pool: &ServerPool, f: F) -> Result<T, tonic::Status>
where
    F: FnOnce(AgentClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let Some((idx, client)) = pool.client() else {
        return Err(tonic::Status::unavailable("no servers configured"));
    };
    let res = match timeout(RPC_TIMEOUT, f(client)).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("rpc timed out")),
    };
    if let Err(st) = &res {
        if !matches!(st.code(), Code::NotFound | Code::InvalidArgument | Code::PermissionDenied) {
            pool.failover(idx);
        }
    }
    res
}

/// How long to wait before the next heartbeat: about half the TTL the server gave (which grows
/// with the cluster's size), less up to 30 % jitter so that nodes spread out.
fn heartbeat_interval(ttl: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = f64::from(nanos % 1000) / 1000.0; // 0..1
    ttl.mul_f64(0.5 - 0.15 * jitter)
}

/// Registers the node, then heartbeats at about ttl/2 (with jitter); registers again when a server no longer
/// knows the node. Sets `registered` after each successful registration.
/// Registers the node (again whenever its fingerprint in `node` changes: a GPU became
/// unhealthy) and heartbeats, carrying the GPUs' latest measurements (`gpu_stats`).
pub async fn node_loop(
    pool: Arc<ServerPool>,
    mut node_rx: watch::Receiver<Node>,
    registered: watch::Sender<bool>,
    gpu_stats: watch::Receiver<Vec<mlp_proto::v1::GpuStats>>,
    network: Option<Arc<crate::network::NetworkManager>>,
    tracking: crate::tracking::TrackingUri,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut node = node_rx.borrow_and_update().clone();
        node.status = node_status::READY.into();
        let ttl = loop {
            let req = RegisterNodeRequest { node: Some(node.clone()) };
            match unary(&pool, |mut c| async move { c.register(req).await }).await {
                Ok(resp) => {
                    if !resp.node_secret.is_empty() {
                        // A claim of the node id: from now on every call carries this secret.
                        match pool.secret().set(&resp.node_secret) {
                            Ok(()) => tracing::info!(file = %pool.secret().path().display(), "node secret issued and kept"),
                            Err(e) => {
                                tracing::error!(error = %e, "node secret issued but not kept: a restarted agent cannot act for this node")
                            }
                        }
                    }
                    // The leased subnet is in place before any allocation arrives (the
                    // allocation stream starts once `registered` is set).
                    if let Some(net) = &network {
                        let parse = |s: &str| if s.is_empty() { None } else { crate::network::Subnet::parse(s).ok() };
                        net.apply_lease(parse(&resp.overlay_subnet), parse(&resp.overlay_cluster_cidr));
                    }
                    tracking.learn(&resp.tracking_uri);
                    break resp.heartbeat_ttl_ms;
                }
                Err(st) if st.code() == Code::PermissionDenied => {
                    let d = backoff.next_delay();
                    tracing::error!(error = %st.message(), retry_in = ?d, "node registration refused");
                    sleep(d).await;
                }
                Err(st) => {
                    let d = backoff.next_delay();
                    tracing::warn!(code = ?st.code(), error = %st.message(), retry_in = ?d, "node registration failed");
                    sleep(d).await;
                }
            }
        };
        backoff.reset();
        tracing::info!(node_id = %node.id, ttl_ms = ttl, "node registered");
        let _ = registered.send(true);
        let mut ttl = Duration::from_millis(if ttl == 0 { 10_000 } else { ttl });
        let mut next = Instant::now() + heartbeat_interval(ttl);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                changed = node_rx.changed() => {
                    if changed.is_ok() {
                        tracing::info!("node fingerprint changed; registering again");
                        break;
                    }
                    // The agent is going away; heartbeat on until it cancels this loop.
                    tokio::time::sleep_until(next).await;
                }
            }
            let req = HeartbeatRequest { node_id: node.id.clone(), gpu_stats: gpu_stats.borrow().clone() };
            match unary(&pool, |mut c| async move { c.heartbeat(req).await }).await {
                Ok(resp) => {
                    if resp.heartbeat_ttl_ms > 0 {
                        ttl = Duration::from_millis(resp.heartbeat_ttl_ms);
                    }
                    backoff.reset();
                    next = Instant::now() + heartbeat_interval(ttl);
                }
                Err(st) if st.code() == Code::NotFound => {
                    tracing::warn!("server does not know this node; registering again");
                    break;
                }
                Err(st) if st.code() == Code::PermissionDenied => {
                    tracing::warn!(error = %st.message(), "heartbeat refused; registering again");
                    sleep(backoff.next_delay().min(ttl / 3)).await;
                    break;
                }
                Err(st) => {
                    let d = backoff.next_delay().min(ttl / 3);
                    tracing::warn!(code = ?st.code(), error = %st.message(), retry_in = ?d, "heartbeat failed");
                    next = Instant::now() + d;
                }
            }
        }
    }
}

/// Follows one server-streaming `AgentService` RPC for as long as the pool has servers: opens it
/// with `open`, hands every message to `handle`, and on an error or the stream's end reconnects
/// with backoff, failing over to the next server unless the server only did not know the node
/// yet (`NotFound`: the node loop is registering it). Servers that lack the RPC
/// (`Unimplemented`) end the loop. `what` names the stream in logs.
pub async fn follow_stream<M, O, OF, H, HF>(pool: &ServerPool, what: &str, mut open: O, mut handle: H)
where
    O: FnMut(AgentClient) -> OF,
    OF: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>>,
    H: FnMut(M) -> HF,
    HF: std::future::Future<Output = ()>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let Some((idx, client)) = pool.client() else {
            return;
        };
        match timeout(RPC_TIMEOUT, open(client)).await {
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            backoff.reset();
                            handle(msg).await;
                        }
                        Ok(None) => {
                            tracing::info!(stream = what, "stream ended; reconnecting");
                            break;
                        }
                        Err(st) => {
                            tracing::warn!(stream = what, code = ?st.code(), error = %st.message(), "stream failed; reconnecting");
                            if !matches!(st.code(), Code::NotFound | Code::PermissionDenied) {
                                pool.failover(idx);
                            }
                            break;
                        }
                    }
                }
            }
            Ok(Err(st)) if st.code() == Code::Unimplemented => {
                tracing::info!(stream = what, "the servers do not offer this stream; not following it");
                return;
            }
            Ok(Err(st)) => {
                tracing::warn!(stream = what, code = ?st.code(), error = %st.message(), "opening the stream failed");
                if !matches!(st.code(), Code::NotFound | Code::PermissionDenied) {
                    pool.failover(idx);
                }
            }
            Err(_) => {
                tracing::warn!(stream = what, "opening the stream timed out");
                pool.failover(idx);
            }
        }
        sleep(backoff.next_delay()).await;
    }
}

/// Follows the node's overlay peers (issue 13 §2) and hands every set to the network manager.
pub async fn overlay_loop(
    pool: Arc<ServerPool>,
    node_id: String,
    mut registered: watch::Receiver<bool>,
    network: Arc<crate::network::NetworkManager>,
) {
    if registered.wait_for(|r| *r).await.is_err() {
        return;
    }
    let open = |mut c: AgentClient| {
        let req = mlp_proto::v1::WatchOverlayRequest { node_id: node_id.clone() };
        async move { c.watch_overlay(req).await }
    };
    follow_stream(&pool, "overlay", open, |msg: mlp_proto::v1::OverlayPeers| {
        let network = network.clone();
        async move {
            let peers = msg.peers.iter().filter_map(crate::network::overlay::Peer::from_proto).collect();
            network.set_peers(peers).await;
        }
    })
    .await;
}

/// Watches the node's allocations and hands every set (whole or the changes) to the manager.
pub async fn watch_loop(pool: Arc<ServerPool>, node_id: String, mut registered: watch::Receiver<bool>, manager: Arc<Mutex<AllocManager>>) {
    if registered.wait_for(|r| *r).await.is_err() {
        return;
    }
    let open = |mut c: AgentClient| {
        let req = WatchAllocationsRequest { node_id: node_id.clone() };
        async move { c.watch_allocations(req).await }
    };
    follow_stream(&pool, "allocations", open, |msg: mlp_proto::v1::NodeAllocations| {
        let manager = manager.clone();
        async move {
            let received = crate::isolation::phases::mono_ns();
            tracing::debug!(count = msg.allocations.len(), index = msg.index, "allocations received");
            let mut m = manager.lock().await;
            m.received_at(received);
            if msg.partial {
                m.sync_partial(msg.allocations);
            } else {
                m.sync(msg.allocations);
            }
        }
    })
    .await;
}

/// How long a batch of reports none of which is an allocation's end waits for more: a task that
/// ends within it (a short batch task: `/bin/true` ends a millisecond or two after its start is
/// reported) sends its start and its end in one UpdateAllocs, one Raft entry instead of two.
/// 305 sequential CLI submits of such jobs: 4.5 → 3.5 Raft entries per job; 500 CLI calls 10%
/// less time (docs/benchmarks.md, runs 45–48). An end is never held back.
pub const START_REPORT_WINDOW: Duration = Duration::from_millis(3);

/// Sends alloc status changes as they come, keeping only the latest state per alloc, and
/// retries until sent. An allocation's end goes at once (it reaches the servers, and `job run
/// --wait`, without waiting for company: a fixed 5 ms batching window used to delay every report
/// by that much); other reports wait up to [`START_REPORT_WINDOW`] for company (see
/// [`gather`]), and whatever arrives while an UpdateAllocs is in flight goes in the next one, so
/// a busy agent still sends one RPC per round trip.
pub async fn update_loop(pool: Arc<ServerPool>, node_id: String, mut rx: mpsc::UnboundedReceiver<AllocClientUpdate>) {
    let mut pending: BTreeMap<String, AllocClientUpdate> = BTreeMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut open = true;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(u) => {
                    pending.insert(u.key().to_string(), u);
                }
                None => return,
            }
        }
        gather(&mut rx, &mut pending, &mut open, START_REPORT_WINDOW, alloc_ends).await;
        let req = UpdateAllocsRequest { node_id: node_id.clone(), updates: pending.values().cloned().collect() };
        match unary(&pool, |mut c| async move { c.update_allocs(req).await }).await {
            Ok(_) => {
                pending.clear();
                backoff.reset();
            }
            Err(st) => {
                let d = backoff.next_delay();
                tracing::warn!(code = ?st.code(), error = %st.message(), count = pending.len(), retry_in = ?d, "sending alloc updates failed");
                // Keep collecting (latest state per alloc wins) while waiting to retry.
                collect_until(&mut rx, &mut pending, &mut open, Instant::now() + d).await;
            }
        }
        if !open && pending.is_empty() {
            return;
        }
    }
}

/// A report that a batching sender keeps only the latest of, per key (an allocation's id).
pub(crate) trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for AllocClientUpdate {
    fn key(&self) -> &str {
        &self.alloc_id
    }
}

/// An allocation's end: never held back for company.
fn alloc_ends(u: &AllocClientUpdate) -> bool {
    mlp_proto::consts::alloc_client::is_terminal(&u.client_status)
}

/// Adds to `pending` (the latest report per key) what `rx` has: when no pending report is
/// `urgent`, what arrives within `window` (stopping at the first urgent one), then what
/// queued up meanwhile (during the last RPC). Clears `open` when `rx` is closed.
pub(crate) async fn gather<T: Keyed>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    pending: &mut BTreeMap<String, T>,
    open: &mut bool,
    window: Duration,
    urgent: impl Fn(&T) -> bool,
) {
    if !pending.values().any(&urgent) {
        let until = Instant::now() + window;
        while *open {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(u)) => {
                    let now = urgent(&u);
                    pending.insert(u.key().to_string(), u);
                    if now {
                        break;
                    }
                }
                Ok(None) => *open = false,
                Err(_) => break,
            }
        }
    }
    while *open {
        match rx.try_recv() {
            Ok(u) => {
                pending.insert(u.key().to_string(), u);
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => *open = false,
        }
    }
}

/// Waits until `deadline` (a retry's backoff), adding what `rx` brings to `pending` meanwhile;
/// a closed `rx` (`open` cleared) still waits the whole time, so that a sender whose RPCs fail
/// while it shuts down keeps its backoff instead of retrying in a tight loop.
pub(crate) async fn collect_until<T: Keyed>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    pending: &mut BTreeMap<String, T>,
    open: &mut bool,
    deadline: Instant,
) {
    loop {
        tokio::select! {
            u = rx.recv(), if *open => match u {
                Some(u) => { pending.insert(u.key().to_string(), u); }
                None => *open = false,
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(id: &str, status: &str) -> AllocClientUpdate {
        AllocClientUpdate { alloc_id: id.into(), client_status: status.into(), ..Default::default() }
    }

    /// A start report waits for the allocation's end, which goes at once with it (one RPC);
    /// an end alone does not wait; a start alone goes once the window has passed.
    #[tokio::test]
    async fn a_start_report_waits_briefly_for_company_and_an_end_never_waits() {
        use mlp_proto::consts::alloc_client::{COMPLETE, RUNNING};
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut open = true;

        // Start, then the end 20 ms later: one batch with the end, long before a 30 s window.
        let mut pending = BTreeMap::from([("a".to_string(), update("a", RUNNING))]);
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = later.send(update("a", COMPLETE));
        });
        let t0 = Instant::now();
        gather(&mut rx, &mut pending, &mut open, Duration::from_secs(30), alloc_ends).await;
        assert!(t0.elapsed() < Duration::from_secs(10), "waited {:?}", t0.elapsed());
        assert_eq!(pending.len(), 1);
        assert_eq!(pending["a"].client_status, COMPLETE);

        // An end pending: nothing waits, and what already queued goes along.
        let mut pending = BTreeMap::from([("b".to_string(), update("b", COMPLETE))]);
        let _ = tx.send(update("c", RUNNING));
        let t0 = Instant::now();
        gather(&mut rx, &mut pending, &mut open, Duration::from_secs(30), alloc_ends).await;
        assert!(t0.elapsed() < Duration::from_secs(10), "waited {:?}", t0.elapsed());
        assert_eq!(pending.keys().collect::<Vec<_>>(), ["b", "c"]);

        // A start alone goes after the window.
        let mut pending = BTreeMap::from([("d".to_string(), update("d", RUNNING))]);
        let t0 = Instant::now();
        gather(&mut rx, &mut pending, &mut open, Duration::from_millis(50), alloc_ends).await;
        assert!(t0.elapsed() >= Duration::from_millis(45), "left after {:?}", t0.elapsed());
        assert_eq!(pending.len(), 1);
        assert!(open);

        // A closed channel ends the wait and says so.
        drop(tx);
        let mut pending = BTreeMap::from([("e".to_string(), update("e", RUNNING))]);
        gather(&mut rx, &mut pending, &mut open, Duration::from_secs(30), alloc_ends).await;
        assert!(!open);
    }

    /// A retry's wait takes in what arrives (latest per allocation) and lasts its whole time,
    /// also once the channel is closed: a closed channel must not turn the backoff into a
    /// tight retry loop.
    #[tokio::test]
    async fn a_retry_wait_collects_and_lasts_even_on_a_closed_channel() {
        use mlp_proto::consts::alloc_client::{COMPLETE, RUNNING};
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (mut pending, mut open) = (BTreeMap::new(), true);
        let _ = tx.send(update("a", RUNNING));
        let _ = tx.send(update("a", COMPLETE));
        let _ = tx.send(update("b", RUNNING));
        let t0 = Instant::now();
        collect_until(&mut rx, &mut pending, &mut open, t0 + Duration::from_millis(40)).await;
        assert!(t0.elapsed() >= Duration::from_millis(35), "left after {:?}", t0.elapsed());
        assert_eq!(pending.len(), 2);
        assert_eq!(pending["a"].client_status, COMPLETE);
        assert!(open);
        drop(tx);
        let t0 = Instant::now();
        collect_until(&mut rx, &mut pending, &mut open, t0 + Duration::from_millis(60)).await;
        assert!(!open, "the closed channel is noticed");
        assert!(t0.elapsed() >= Duration::from_millis(55), "a closed channel cut the wait short: {:?}", t0.elapsed());
    }
}
