//! Wiring of one server: Raft node, state, leader loop, gRPC and HTTP listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mlp_proto::v1::{
    agent_service_server::AgentServiceServer, alloc_service_server::AllocServiceServer, eval_service_server::EvalServiceServer,
    event_service_server::EventServiceServer, job_service_server::JobServiceServer, node_service_server::NodeServiceServer,
    status_service_server::StatusServiceServer, system_service_server::SystemServiceServer,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::grpc::GrpcApi;
use crate::leader::{HeartbeatSettings, Heartbeats, Leader};
use crate::metrics::Metrics;
use crate::raft::node::RaftSettings;
use crate::state::StateHandle;

/// Largest gRPC message accepted, both ways.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How to run a server.
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Pre-bound listeners (bind port 0 to let the OS choose).
    pub grpc_listener: std::net::TcpListener,
    pub http_listener: std::net::TcpListener,
    /// The gRPC address other servers and agents reach this one at; default: the listener's.
    pub advertise_addr: Option<String>,
    pub raft: RaftSettings,
    pub heartbeat: HeartbeatSettings,
    /// Scheduler settings (preemption per job type and its priority delta).
    pub scheduler: crate::scheduler::Options,
    /// Garbage collection: interval and age thresholds.
    pub gc: crate::leader::gc::GcSettings,
    /// Events kept for event-stream clients that resume (`events::DEFAULT_BUFFER_EVENTS`).
    pub event_buffer: usize,
    /// Where node subnets are leased from (issue 13 §2); `None` turns the overlay off.
    pub overlay: Option<crate::state::OverlayPool>,
    /// Mutual TLS on both listeners and every outgoing connection (issue 15 §1); `None`:
    /// plaintext, no role checks (`mlp dev`'s default).
    pub tls: Option<Arc<mlp_tls::Tls>>,
    /// ACL tokens and policies (issue 15 §2): `--acl-enabled`. Off: nothing is checked.
    pub acl_enabled: bool,
    /// MLflow artifact blobs (issue 17 §2): where they live, the size limit, GC's grace period.
    pub artifacts: crate::tracking::artifacts::ArtifactSettings,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("raft: {0}")]
    Raft(String),
    #[error("artifact store: {0}")]
    Artifacts(String),
}

/// A running server.
pub struct Server {
    pub api: Arc<Api>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How a server finds its cluster (see `raft::cluster`). The default is a single-voter
/// cluster of this server alone, as `mlp dev` runs.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Bootstrap only once this many servers know each other; 1 = bootstrap alone.
    pub bootstrap_expect: usize,
    /// gRPC addresses of other servers to form or join a cluster with.
    pub join: Vec<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { bootstrap_expect: 1, join: Vec::new() }
    }
}

impl ClusterSettings {
    /// A lone server that bootstraps itself (no peers to wait for).
    fn is_single(&self) -> bool {
        self.bootstrap_expect <= 1 && self.join.is_empty()
    }
}

impl Server {
    /// Starts a single-voter server (see [`Server::start_clustered`]).
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        Self::start_clustered(config, ClusterSettings::default()).await
    }

    /// Starts a server that forms or joins a cluster per `cluster`. The gRPC listener serves
    /// before the server joins anything, so peers can reach it while the cluster forms; a
    /// single-voter server returns once it leads, a clustered one right away (formation goes
    /// on in the background).
    pub async fn start_clustered(config: ServerConfig, cluster: ClusterSettings) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir { path: config.data_dir.clone(), source })?;
        config.grpc_listener.set_nonblocking(true).map_err(ServerError::Listener)?;
        config.http_listener.set_nonblocking(true).map_err(ServerError::Listener)?;
        let grpc_addr = config.grpc_listener.local_addr().map_err(ServerError::Listener)?;
        let http_addr = config.http_listener.local_addr().map_err(ServerError::Listener)?;
        let grpc_listener = tokio::net::TcpListener::from_std(config.grpc_listener).map_err(ServerError::Listener)?;
        let http_listener = tokio::net::TcpListener::from_std(config.http_listener).map_err(ServerError::Listener)?;
        let advertise = config.advertise_addr.unwrap_or_else(|| grpc_addr.to_string());

        let (state, events) = StateHandle::with_event_buffer(config.event_buffer);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Opened without bootstrapping: peers must reach our gRPC listener before we join.
        let tls = config.tls.clone();
        let raft = crate::raft::node::open_with_tls(&config.data_dir, advertise.clone(), config.raft, state.clone(), tls.clone())
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        let raft = Arc::new(raft);

        let metrics = Arc::new(Metrics::default());
        let heartbeats = Arc::new(Heartbeats::default());
        let guard = Arc::new(crate::acl::Guard::new(
            config.acl_enabled,
            crate::acl::audit::Audit::new(Some(config.data_dir.join("audit.log"))),
            state.clone(),
            raft.clone(),
        ));
        let api = Arc::new(Api {
            raft: raft.clone(),
            state: state.clone(),
            metrics: metrics.clone(),
            heartbeats: heartbeats.clone(),
            heartbeat: config.heartbeat,
            overlay: config.overlay.clone(),
            tracking_uri: crate::api::tracking_uri(if tls.is_some() { "https" } else { "http" }, http_addr, &advertise),
            acl: guard.clone(),
        });
        let grpc = GrpcApi { api: api.clone() };
        // MLflow artifact blobs (issue 17 §2): served to the peers over RaftService, to clients
        // over HTTP; unreferenced ones are collected by every server.
        let artifacts = match crate::tracking::artifacts::ArtifactService::new(
            config.data_dir.join("artifacts"),
            config.artifacts.clone(),
            raft.clone(),
            state.clone(),
        ) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                raft.shutdown().await;
                return Err(ServerError::Artifacts(e.to_string()));
            }
        };

        // Every RPC is authorized by the caller's certificate role here, before any service runs
        // (mlp_tls::authz; a pass-through without TLS).
        let router = tonic::transport::Server::builder()
            .layer(mlp_tls::authz::AuthorizeLayer::new(mlp_tls::authz::server_rule, tls.is_some()))
            .layer(crate::acl::AclLayer { guard: guard.clone() })
            .add_service(mlp_proto::v1::acl_service_server::AclServiceServer::new(crate::acl::service::AclApi { api: api.clone() }))
            .add_service(crate::raft::network::raft_grpc_service_with_artifacts(raft.raft.clone(), Some(artifacts.clone())))
            .add_service(crate::raft::cluster::cluster_grpc_service(raft.clone(), cluster.bootstrap_expect))
            .add_service(limits(JobServiceServer::new(grpc.clone())))
            .add_service(limits_alloc(AllocServiceServer::new(grpc.clone())))
            .add_service(NodeServiceServer::new(grpc.clone()))
            .add_service(EvalServiceServer::new(grpc.clone()))
            .add_service(mlp_proto::v1::deployment_service_server::DeploymentServiceServer::new(grpc.clone()))
            .add_service(EventServiceServer::new(grpc.clone()))
            .add_service(StatusServiceServer::new(grpc.clone()))
            .add_service(SystemServiceServer::new(grpc.clone()))
            .add_service(mlp_proto::v1::namespace_service_server::NamespaceServiceServer::new(grpc.clone()))
            .add_service(mlp_proto::v1::service_service_server::ServiceServiceServer::new(grpc.clone()))
            .add_service(mlp_proto::v1::tracking_service_server::TrackingServiceServer::new(crate::tracking::grpc::TrackingGrpc {
                api: api.clone(),
            }))
            .add_service(
                AgentServiceServer::new(grpc.clone())
                    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            );
        // TCP_NODELAY on every accepted connection: without it a response written as two
        // segments (HTTP/2 headers, then data) waits for the client's delayed ACK, 40 ms. With
        // TLS a plaintext caller fails the handshake and is dropped.
        let grpc_incoming = mlp_tls::net::incoming(grpc_listener, tls.clone());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(grpc_incoming, stop).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        if cluster.is_single() {
            let ready = async {
                raft.bootstrap_single().await?;
                raft.wait_until_ready().await
            };
            if let Err(e) = ready.await {
                let _ = shutdown.send(true);
                raft.shutdown().await;
                return Err(ServerError::Raft(e.to_string()));
            }
        } else {
            let (node, stop) = (raft.clone(), shutdown_rx.clone());
            tasks.push(tokio::spawn(crate::raft::cluster::form_cluster(node, cluster.bootstrap_expect, cluster.join, stop)));
        }

        // MLflow's tracking, registry and artifact API (issue 17) beside mlp's own.
        let app = crate::tracking::http::router(api.clone(), artifacts.clone())
            .merge(crate::http::router(api.clone()))
            .route_layer(axum::middleware::from_fn_with_state(guard.clone(), crate::acl::guard::http_middleware));
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            match tls {
                None => {
                    if let Err(e) = axum::serve(http_listener, app).tcp_nodelay(true).with_graceful_shutdown(stop).await {
                        tracing::error!(error = %e, "HTTP server failed");
                    }
                }
                Some(tls) => crate::http::serve_tls(http_listener, app, tls, stop).await,
            }
        }));

        let (a, artifact_gc) = (artifacts.clone(), artifacts.clone().gc_loop());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = a.import_legacy() => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = artifact_gc => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));

        let gc_loop = crate::leader::gc::run(raft.clone(), state.clone(), metrics.clone(), config.gc);
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = gc_loop => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));

        // Periodic jobs' launches (issue 16 §2), while this server leads.
        let periodic_loop = crate::leader::periodic::run(raft.clone(), state.clone());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = periodic_loop => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));

        let leader = Arc::new(Leader {
            raft: raft.clone(),
            state: state.clone(),
            metrics,
            heartbeats,
            settings: config.heartbeat,
            in_flight: std::sync::Mutex::new(Default::default()),
            options: config.scheduler,
        });
        let mut rx = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = leader.run(events.effects) => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));
        tracing::info!(%grpc_addr, %http_addr, data_dir = %config.data_dir.display(), "server started");
        Ok(Server { api, grpc_addr, http_addr, shutdown, tasks })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.api.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

fn limits(s: JobServiceServer<GrpcApi>) -> JobServiceServer<GrpcApi> {
    s.max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES).max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

fn limits_alloc(s: AllocServiceServer<GrpcApi>) -> AllocServiceServer<GrpcApi> {
    s.max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES).max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}
