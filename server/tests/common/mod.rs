//! Shared by the server's integration tests that drive a real `Server` in process: one way to
//! start it (single voter, heartbeats that never expire during a test) and one node shape.

#![allow(dead_code, clippy::expect_used)]

use std::time::Duration;

use mlp_proto::v1::{GpuDevice, Node, NodeResources};
use mlp_server::leader::HeartbeatSettings;
use mlp_server::raft::node::RaftSettings;
use mlp_server::{Server, ServerConfig};

/// A single-voter server on loopback ports chosen by the OS, its data in `dir`. Heartbeat TTL
/// and failover grace are a minute, so registered nodes stay ready for the whole test.
pub async fn start(dir: &std::path::Path) -> Server {
    let config = ServerConfig {
        data_dir: dir.to_path_buf(),
        grpc_listener: std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        http_listener: std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        advertise_addr: None,
        raft: RaftSettings::default(),
        heartbeat: HeartbeatSettings { ttl: Duration::from_secs(60), failover_grace: Duration::from_secs(60), ..Default::default() },
        scheduler: Default::default(),
        gc: Default::default(),
        event_buffer: mlp_server::events::DEFAULT_BUFFER_EVENTS,
        overlay: None,
        tls: None,
        acl_enabled: false,
        artifacts: Default::default(),
    };
    Server::start(config).await.expect("server starts")
}

/// A one-core `exec` node with `mhz` of CPU and plenty of memory and disk, no GPUs.
pub fn node(id: &str, mhz: u64) -> Node {
    node_with_gpus(id, mhz, Vec::new())
}

/// [`node`] with these GPU devices.
pub fn node_with_gpus(id: &str, mhz: u64, gpus: Vec<GpuDevice>) -> Node {
    Node {
        id: id.into(),
        name: id.into(),
        drivers: vec!["exec".into()],
        resources: Some(NodeResources {
            cpu_cores: 1,
            cpu_mhz_per_core: mhz,
            cpu_total_mhz: mhz,
            memory_mib: 100_000,
            disk_mib: 100_000,
            gpus,
            ..Default::default()
        }),
        ..Default::default()
    }
}
