//! mlp agent: fingerprints the node, registers and heartbeats with the servers, runs the
//! allocations the servers assign (alloc and task runners over drivers), reports their status,
//! and serves task logs (`ClientService`) on its own gRPC address.
//!
//! Layering (a folder uses only the folders below it, never one above; check with
//! `grep -rn "use crate::" agent/src`):
//!
//! ```text
//! lib.rs, client.rs, fingerprint.rs, rpc/   wiring, servers' streams, node facts, ClientService
//! alloc/      allocations: manager, runner, state registry        uses task, driver, gpu, isolation
//! task/       one task: runner, restart, supervisor process       uses driver, gpu, isolation
//! driver/     Driver/TaskHandle, raw_exec, exec, wasm, oci,        uses isolation, gpu, image
//!             supervisor launch, task log files
//! image/      OCI images: registry pulls, layer store, unpack, GC  uses nothing of the crate
//! isolation/  namespaces, rootfs, devices, init, cgroups/, phases uses nothing of the crate
//! gpu/        GpuSource, simulated GPUs, task GPUs, driver files  uses nothing of the crate
//! services/   service checks, registrations, the DNS responder       uses alloc (state), network
//! network/    bridge mode: netns, veth, addresses, nftables ports uses nothing of the crate
//! paths.rs    checks of names that become paths                  uses nothing of the crate
//! ```
//!
//! A driver starts the task's supervisor as a separate process (`mlp __mlp-supervise`, code in
//! `task::supervisor`) and talks to it only through files and pipes (`driver::supervised`), so
//! the driver never imports the task layer; isolation knows nothing of drivers or tasks.

pub mod alloc;
pub mod artifact;
pub mod client;
pub mod config_file;
pub mod driver;
pub mod fingerprint;
pub mod gpu;
pub mod image;
pub mod isolation;
pub mod network;
pub mod paths;
pub mod rpc;
pub mod services;
pub mod task;
pub mod tracking;
pub mod volumes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mlp_proto::v1::client_service_server::ClientServiceServer;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alloc::manager::AllocManager;
use crate::alloc::runner::RunnerEnv;
use crate::alloc::state::AllocRegistry;
use crate::client::ServerPool;

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid agent configuration: {0}")]
    Config(String),
}

impl AgentError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}

/// Agent configuration.
#[derive(Debug)]
pub struct AgentConfig {
    /// Everything the agent owns lives here.
    pub data_dir: PathBuf,
    /// Server gRPC addresses "host:port"; used in order, failing over.
    pub servers: Vec<String>,
    /// Node name (default: hostname).
    pub node_name: String,
    /// Datacenter (default "dc1").
    pub datacenter: String,
    /// Node pool (default "default").
    pub node_pool: String,
    /// Node metadata.
    pub meta: BTreeMap<String, String>,
    /// Pre-bound listener for ClientService; None binds 127.0.0.1:0.
    pub rpc_listener: Option<std::net::TcpListener>,
    /// Address put in `Node.rpc_addr`; default: the listener's local address.
    pub advertise_addr: Option<String>,
    /// Rotate a task log file at this size (default 10 MiB).
    pub log_max_file_bytes: u64,
    /// Log files kept per task stream (default 5).
    pub log_max_files: u32,
    /// Enabled drivers (default exec, wasm, oci: `raw_exec`, which runs tasks unisolated as
    /// the agent's user, only when the configuration enables it; issue 15 §4).
    pub drivers_enabled: Vec<String>,
    /// Host directories offered by name (`host_volume` blocks of the configuration file),
    /// advertised as node attributes `host_volume.NAME` = `ro` | `rw`.
    pub host_volumes: BTreeMap<String, config_file::HostVolume>,
    /// Isolation of `exec` tasks (default user, refused users, default pids limit, ...).
    pub isolation: isolation::IsolationSettings,
    /// Simulated GPUs this node registers (`gpu::simulated::load`); empty = real ones, if any.
    pub simulated_gpus: Vec<mlp_proto::v1::GpuDevice>,
    /// How real GPUs are found, isolated and shared.
    pub gpu: gpu::GpuSettings,
    /// Bridge-mode networking: bridge, subnet, MTU, dynamic port range.
    pub network: network::NetworkSettings,
    /// Where the DNS responder forwards names outside `service.mlp` (empty: the host's
    /// `/etc/resolv.conf` name servers).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// The `oci` driver's image store: insecure registries, disk budget, pull timeout.
    pub images: image::ImageSettings,
    /// Where tasks' `artifact` blocks may fetch from, and the limits.
    pub artifacts: artifact::ArtifactSettings,
    /// Where tasks' `MLFLOW_TRACKING_URI` comes from (default: the servers).
    pub tracking: tracking::TrackingMode,
    /// Mutual TLS (issue 15 §1): to the servers (which must hold the server role) and on the
    /// agent's own listener (which serves servers only). `None`: plaintext.
    pub tls: Option<Arc<mlp_tls::Tls>>,
    /// Where the node secret is kept (issue 15 §3); default `<data_dir>/node-secret`.
    pub node_secret_file: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/mlp/agent"),
            servers: vec!["127.0.0.1:4647".to_string()],
            node_name: fingerprint::default_node_name(),
            datacenter: "dc1".into(),
            node_pool: "default".into(),
            meta: BTreeMap::new(),
            rpc_listener: None,
            advertise_addr: None,
            log_max_file_bytes: 10 * 1024 * 1024,
            log_max_files: 5,
            drivers_enabled: vec![
                mlp_proto::consts::driver::EXEC.to_string(),
                mlp_proto::consts::driver::WASM.to_string(),
                mlp_proto::consts::driver::OCI.to_string(),
            ],
            host_volumes: BTreeMap::new(),
            isolation: isolation::IsolationSettings::default(),
            simulated_gpus: Vec::new(),
            gpu: gpu::GpuSettings::default(),
            network: network::NetworkSettings::default(),
            dns_upstreams: Vec::new(),
            images: image::ImageSettings::default(),
            artifacts: artifact::ArtifactSettings::default(),
            tracking: tracking::TrackingMode::default(),
            tls: None,
            node_secret_file: None,
        }
    }
}

impl AgentConfig {
    /// This node's GPUs: the simulated ones, or NVML's, or none (opened anew on each call;
    /// the agent opens them once).
    pub fn gpu_backend(&self) -> gpu::Backend {
        gpu::Backend::open(&self.simulated_gpus, &self.gpu)
    }
}

/// Reads the node id from `data_dir/node-id`, creating it on first start.
pub fn load_or_create_node_id(data_dir: &Path) -> Result<String, AgentError> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("reading {}", path.display()))(e)),
    }
    let id = new_id();
    // Durably: an id lost in a power loss after the first registration makes the node a new
    // one (its secret claims a fresh id), and the old node lingers until it is collected.
    mlp_proto::durable::replace_file(&path, format!("{id}\n").as_bytes(), 0o644)
        .map_err(AgentError::io(format!("writing {}", path.display())))?;
    Ok(id)
}

/// A random v4 UUID string from the kernel; falls back to 32 hex chars from std's random
/// hasher keys.
fn new_id() -> String {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        let s = s.trim();
        if s.len() == 36 {
            return s.to_string();
        }
    }
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// A running agent.
pub struct Agent {
    node_id: String,
    rpc_addr: SocketAddr,
    cancel: CancellationToken,
    loops: Vec<JoinHandle<()>>,
    manager: Arc<Mutex<AllocManager>>,
}

impl Agent {
    /// Fingerprints the node, restores what a previous run left, binds the ClientService
    /// listener and spawns the background loops (registration may still be retrying).
    pub async fn start(mut config: AgentConfig) -> Result<Agent, AgentError> {
        if config.gpu.health_file.is_none() {
            config.gpu.health_file = Some(config.data_dir.join("gpu-health.json"));
        }
        let gpu = config.gpu_backend();
        // Simulated devices are configuration: bad ones refuse the start. Real ones that NVML
        // cannot describe leave the node without GPUs (the reason is in its attributes).
        if let gpu::Backend::Simulated(_) = &gpu {
            gpu.devices().map_err(|e| AgentError::Config(e.to_string()))?;
        }
        std::fs::create_dir_all(config.data_dir.join("allocs"))
            .map_err(AgentError::io(format!("creating {}", config.data_dir.display())))?;
        // Isolated tasks start in their own directories and read their config by path, so every
        // path the agent hands out must be absolute (`--data-dir ./mlp-data` is the default).
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(AgentError::io(format!("resolving {}", config.data_dir.display())))?;
        let data_dir = config.data_dir.clone();
        let node_id = load_or_create_node_id(&data_dir)?;

        let std_listener = match config.rpc_listener.take() {
            Some(l) => l,
            None => std::net::TcpListener::bind("127.0.0.1:0").map_err(AgentError::io("binding the rpc listener"))?,
        };
        std_listener.set_nonblocking(true).map_err(AgentError::io("configuring the rpc listener"))?;
        let rpc_addr = std_listener.local_addr().map_err(AgentError::io("reading the rpc listener address"))?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(AgentError::io("registering the rpc listener"))?;

        let mut node = fingerprint::fingerprint(&config, &gpu);
        if let Some(mhz) = node.attributes.get("cpu.frequency").and_then(|v| v.parse().ok()) {
            config.isolation.mhz_per_core = mhz;
        }
        node.id = node_id.clone();
        node.rpc_addr = config.advertise_addr.clone().unwrap_or_else(|| rpc_addr.to_string());
        let images = Arc::new(image::ImageStore::new(data_dir.join("oci"), config.images.clone()));
        if config.drivers_enabled.iter().any(|d| d == mlp_proto::consts::driver::OCI) {
            // The images on this node when the agent started (`mlp node status`).
            node.attributes.insert("driver.oci.images".into(), images.list().len().to_string());
        }

        // GPU health: devices NVML reports unhealthy, for the tasks using them.
        let (health_tx, health_rx) = watch::channel(BTreeMap::<String, String>::new());
        let secret_file = config.node_secret_file.clone().unwrap_or_else(|| data_dir.join("node-secret"));
        let pool = Arc::new(ServerPool::new(&config.servers, config.tls.as_ref(), client::NodeSecret::load_or_create(&secret_file)?)?);
        let registry = AllocRegistry::default();
        let mps = Arc::new(gpu::mps::MpsManager::new(&config.gpu, &data_dir));
        config.network.check().map_err(|e| AgentError::Config(e.to_string()))?;
        let node_address = mlp_proto::node_address(&node.rpc_addr);
        // The overlay: this node's underlay address (a loopback one cannot be reached from other
        // nodes, so such a node takes no part) and the fixed subnet it asks for, if any.
        if config.network.vtep_addr.is_none() {
            config.network.vtep_addr = node_address.parse::<std::net::Ipv4Addr>().ok().filter(|a| !a.is_loopback() && !a.is_unspecified());
        }
        node.overlay = Some(mlp_proto::v1::OverlayLease {
            subnet: if config.network.fixed_subnet { config.network.subnet.to_string() } else { String::new() },
            vtep_addr: config.network.vtep_addr.map(|a| a.to_string()).unwrap_or_default(),
        });
        let network = Arc::new(network::NetworkManager::new(config.network.clone(), &data_dir));
        let tracking = tracking::TrackingUri::new(config.tracking.clone());
        let env = RunnerEnv {
            alloc_root: data_dir.join("allocs"),
            drivers: driver::drivers_with_images(
                &config.drivers_enabled,
                &config.isolation,
                &config.gpu,
                Some(&data_dir.join("wasm-cache")),
                Some(images.clone()),
            ),
            log_max_file_bytes: config.log_max_file_bytes,
            log_max_files: config.log_max_files,
            registry: registry.clone(),
            gpus: node.resources.as_ref().map(|r| r.gpus.clone()).unwrap_or_default(),
            nvml: gpu.nvml().cloned(),
            gpu_health: health_rx,
            mps: Some(mps.clone()),
            network: Some(network.clone()),
            node_address,
            node_id: node_id.clone(),
            artifacts: Arc::new(config.artifacts.clone()),
            tracking: tracking.clone(),
            host_volumes: Arc::new(config.host_volumes.clone()),
        };
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        // Service discovery sees every allocation update too (services/mod.rs).
        let (updates_rx, service_updates) = services::tee(updates_rx);
        let services_env = Arc::new(services::ServicesEnv {
            alloc_root: env.alloc_root.clone(),
            node_address: env.node_address.clone(),
            network: Some(network.clone()),
            registry: registry.clone(),
        });
        let mut manager = AllocManager::new(env, updates_tx);
        manager.restore();
        // MPS daemons of the previous run: kept for the reattached share tasks, stopped otherwise.
        mps.recover(&manager.attached_gpu_shares()).await;
        // Networks of allocations that are gone (ended or GC'd while the agent was down).
        network.remove_leftovers(&manager.unfinished()).await;
        let manager = Arc::new(Mutex::new(manager));

        let cancel = CancellationToken::new();
        let mut loops = Vec::new();
        let svc = ClientServiceServer::new(rpc::ClientRpc::new(registry));
        // TCP_NODELAY, as on the servers: no 40 ms delayed-ACK stalls on small responses. With
        // TLS only servers may call (they proxy logs and exec sessions): mlp_tls::authz.
        let incoming = mlp_tls::net::incoming(listener, config.tls.clone());
        let authz = mlp_tls::authz::AuthorizeLayer::new(mlp_tls::authz::agent_rule, config.tls.is_some());
        let server_cancel = cancel.clone();
        loops.push(tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .layer(authz)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, server_cancel.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "agent rpc server failed");
            }
        }));

        let (reg_tx, reg_rx) = watch::channel(false);
        let (node_tx, node_rx) = watch::channel(node);
        if let Some(nvml) = gpu.nvml() {
            loops.push(spawn_cancellable(&cancel, gpu_health_loop(nvml.clone(), gpu.clone(), node_tx, health_tx)));
        }
        // GPU measurements are taken apart from the heartbeats, which send the latest: a GPU
        // whose NVML calls hang must not stop the node's heartbeats.
        let (stats_tx, stats_rx) = watch::channel(Vec::new());
        if let Some(nvml) = gpu.nvml() {
            loops.push(spawn_cancellable(&cancel, gpu_stats_loop(nvml.clone(), stats_tx)));
        }
        loops.push(spawn_cancellable(&cancel, client::node_loop(pool.clone(), node_rx, reg_tx, stats_rx, Some(network.clone()), tracking)));
        loops.push(spawn_cancellable(&cancel, client::overlay_loop(pool.clone(), node_id.clone(), reg_rx.clone(), network.clone())));
        let services_registered = reg_rx.clone();
        loops.push(spawn_cancellable(&cancel, client::watch_loop(pool.clone(), node_id.clone(), reg_rx, manager.clone())));
        loops.push(spawn_cancellable(&cancel, client::update_loop(pool.clone(), node_id.clone(), updates_rx)));
        let services_wiring =
            ServicesWiring { env: services_env, updates: service_updates, registered: services_registered, network: network.clone() };
        start_services(&cancel, &mut loops, &config, services_wiring, pool, &node_id);
        let reap_manager = manager.clone();
        loops.push(spawn_cancellable(&cancel, async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                reap_manager.lock().await.reap();
            }
        }));
        tracing::info!(node_id = %node_id, rpc_addr = %rpc_addr, "agent started");
        Ok(Agent { node_id, rpc_addr, cancel, loops, manager })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The address ClientService listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// Stops the loops. Running tasks are left running (a later version reattaches to them).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.manager.lock().await.abort_all();
        for l in self.loops {
            if tokio::time::timeout(Duration::from_secs(5), l).await.is_err() {
                tracing::warn!("an agent loop did not stop in time");
            }
        }
        tracing::info!(node_id = %self.node_id, "agent stopped");
    }
}

/// Follows NVML's health events: each device that becomes unhealthy is published to the tasks
/// (`health`) and the node's fingerprint is taken again and re-registered (`node`), so the
/// scheduler stops placing on it.
/// Service discovery's loops: the check watchers' manager, the registrations' sender, the
/// cluster's passing instances, and the DNS responder on the bridge's gateway.
struct ServicesWiring {
    env: Arc<services::ServicesEnv>,
    updates: mpsc::UnboundedReceiver<mlp_proto::v1::AllocClientUpdate>,
    /// Set on every registration (the leased subnet, and so the DNS address, is known then).
    registered: watch::Receiver<bool>,
    network: Arc<network::NetworkManager>,
}

fn start_services(
    cancel: &CancellationToken,
    loops: &mut Vec<JoinHandle<()>>,
    config: &AgentConfig,
    w: ServicesWiring,
    pool: Arc<ServerPool>,
    node_id: &str,
) {
    let (regs_tx, regs_rx) = mpsc::unbounded_channel();
    loops.push(spawn_cancellable(cancel, services::manager_loop(w.env, w.updates, regs_tx, cancel.child_token())));
    loops.push(spawn_cancellable(cancel, services::send_loop(pool.clone(), node_id.to_string(), regs_rx)));
    let (table_tx, table_rx) = watch::channel(Arc::new(services::dns::DnsTable::default()));
    loops.push(spawn_cancellable(cancel, services::watch_loop(pool, node_id.to_string(), table_tx)));
    let upstreams = if config.dns_upstreams.is_empty() {
        services::dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        config.dns_upstreams.clone()
    };
    let responder = Arc::new(services::dns::Responder { table: table_rx, upstreams });
    loops.push(spawn_cancellable(cancel, services::dns_loop(w.network, w.registered, responder)));
}

async fn gpu_health_loop(
    nvml: gpu::nvml::NvmlGpus,
    backend: gpu::Backend,
    node: watch::Sender<mlp_proto::v1::Node>,
    health: watch::Sender<BTreeMap<String, String>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Err(e) = nvml.spawn_health_watcher(tx) {
        tracing::warn!(error = %e, "cannot start the GPU health watcher");
        return;
    }
    while let Some(ev) = rx.recv().await {
        health.send_modify(|m| {
            m.insert(ev.device.clone(), ev.reason.clone());
        });
        let b = backend.clone();
        let devices = tokio::task::spawn_blocking(move || b.devices().map(|d| (b.attributes(&d), d)))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match devices {
            Ok((attrs, devices)) => node.send_modify(|n| {
                n.attributes.retain(|k, _| !k.starts_with("gpu."));
                n.attributes.extend(attrs);
                if let Some(r) = n.resources.as_mut() {
                    r.gpus = devices;
                }
            }),
            Err(e) => {
                // NVML cannot describe the devices any more: mark the one that failed (and its
                // MIG instances) in the node as registered, so the scheduler still stops.
                tracing::warn!(error = %e, "fingerprinting the GPUs after a health event failed; marking the device in the last fingerprint");
                node.send_modify(|n| {
                    for d in n.resources.iter_mut().flat_map(|r| r.gpus.iter_mut()) {
                        if d.id == ev.device || d.parent_id == ev.device {
                            d.unhealthy = true;
                            d.health = ev.reason.clone();
                        }
                    }
                    let bad = n.resources.as_ref().map_or(0, |r| r.gpus.iter().filter(|d| d.unhealthy).count());
                    n.attributes.insert("gpu.unhealthy".into(), bad.to_string());
                });
            }
        }
    }
}

/// How often the GPUs are measured for the heartbeats.
const GPU_STATS_INTERVAL: Duration = Duration::from_secs(5);
/// A measurement that takes longer is abandoned (its thread finishes on its own).
const GPU_STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Measures the GPUs every few seconds on a blocking thread, publishing the latest for the
/// heartbeats; a measurement that hangs (a wedged GPU) is given up after a while, and the
/// heartbeats carry the previous one meanwhile.
async fn gpu_stats_loop(nvml: gpu::nvml::NvmlGpus, out: watch::Sender<Vec<mlp_proto::v1::GpuStats>>) {
    let mut tick = tokio::time::interval(GPU_STATS_INTERVAL);
    loop {
        tick.tick().await;
        let n = nvml.clone();
        match tokio::time::timeout(GPU_STATS_TIMEOUT, tokio::task::spawn_blocking(move || n.sample())).await {
            Ok(Ok(stats)) => {
                let _ = out.send(stats);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "measuring the GPUs failed"),
            Err(_) => tracing::warn!(timeout = ?GPU_STATS_TIMEOUT, "measuring the GPUs hangs; heartbeats carry the last measurement"),
        }
    }
}

fn spawn_cancellable<F>(cancel: &CancellationToken, fut: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = fut => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_persists() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let a = load_or_create_node_id(dir.path())?;
        let b = load_or_create_node_id(dir.path())?;
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        Ok(())
    }
}
