//! Long-running modes: `mlp server`, `mlp agent` and `mlp dev` (both in one process).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use mlp_agent::{Agent, AgentConfig};
use mlp_server::leader::HeartbeatSettings;
use mlp_server::raft::node::RaftSettings;
use mlp_server::{ClusterSettings, Server, ServerConfig};

use crate::cli::{AgentArgs, DevArgs, RaftTimingArgs, ServerArgs};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("cannot listen on {what} address {addr}"))
}

fn heartbeat(ttl_secs: f64) -> anyhow::Result<HeartbeatSettings> {
    if !(ttl_secs.is_finite() && (0.5..=3600.0).contains(&ttl_secs)) {
        anyhow::bail!("--heartbeat-ttl must be between 0.5 and 3600 seconds, got {ttl_secs}");
    }
    let ttl = Duration::from_secs_f64(ttl_secs);
    Ok(HeartbeatSettings { ttl, failover_grace: ttl })
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn start_server(
    data_dir: &Path,
    grpc: &str,
    http: &str,
    advertise: Option<String>,
    ttl: f64,
    raft: RaftSettings,
    cluster: ClusterSettings,
) -> anyhow::Result<Server> {
    let config = ServerConfig {
        data_dir: data_dir.to_path_buf(),
        grpc_listener: bind(grpc, "gRPC")?,
        http_listener: bind(http, "HTTP")?,
        advertise_addr: advertise,
        raft,
        heartbeat: heartbeat(ttl)?,
    };
    Server::start_clustered(config, cluster).await.context("starting the server")
}

/// Raft timing from the flags, checked so that elections can work at all.
fn raft_settings(t: &RaftTimingArgs) -> anyhow::Result<RaftSettings> {
    if t.raft_heartbeat_ms == 0 || t.raft_election_min_ms <= t.raft_heartbeat_ms || t.raft_election_max_ms <= t.raft_election_min_ms {
        anyhow::bail!(
            "raft timing needs 0 < --raft-heartbeat-ms < --raft-election-min-ms < --raft-election-max-ms, got {} < {} < {}",
            t.raft_heartbeat_ms,
            t.raft_election_min_ms,
            t.raft_election_max_ms
        );
    }
    Ok(RaftSettings {
        heartbeat_ms: t.raft_heartbeat_ms,
        election_min_ms: t.raft_election_min_ms,
        election_max_ms: t.raft_election_max_ms,
        ..RaftSettings::default()
    })
}

pub async fn server(args: ServerArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    if args.bootstrap_expect == 0 {
        anyhow::bail!("--bootstrap-expect must be at least 1");
    }
    if args.join.iter().any(|j| j.trim().is_empty()) {
        anyhow::bail!("--join needs server addresses (host:port), got an empty one");
    }
    if args.bootstrap_expect > 1 && args.join.is_empty() {
        anyhow::bail!("--bootstrap-expect {} needs --join with the other servers' addresses", args.bootstrap_expect);
    }
    let cluster = ClusterSettings { bootstrap_expect: args.bootstrap_expect, join: args.join.clone() };
    let raft = raft_settings(&args.raft)?;
    let server =
        start_server(&args.data_dir, &args.grpc_addr, &args.http_addr, args.advertise, args.heartbeat_ttl, raft, cluster).await?;
    println!("==> mlp server running");
    println!("    node id:  {}", server.api.raft.node_id);
    println!("    gRPC:     {}", server.grpc_addr());
    println!("    HTTP:     http://{}", server.http_addr());
    println!("    data dir: {}", args.data_dir.display());
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn agent_config(data_dir: &Path, servers: Vec<String>, node_name: Option<String>, rpc_addr: &str) -> anyhow::Result<AgentConfig> {
    let mut config = AgentConfig {
        data_dir: data_dir.to_path_buf(),
        servers,
        rpc_listener: Some(bind(rpc_addr, "agent RPC")?),
        ..AgentConfig::default()
    };
    if let Some(n) = node_name {
        config.node_name = n;
    }
    Ok(config)
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    if args.servers.is_empty() || args.servers.iter().any(|s| s.trim().is_empty()) {
        anyhow::bail!("--servers needs at least one server address");
    }
    let mut config = agent_config(&args.data_dir, args.servers, args.node_name, &args.rpc_addr)?;
    config.datacenter = args.datacenter;
    config.node_pool = args.node_pool;
    config.meta = args.meta.into_iter().collect::<BTreeMap<_, _>>();
    let agent = Agent::start(config).await.context("starting the agent")?;
    println!("==> mlp agent running");
    println!("    node:     {}", agent.node_id());
    println!("    RPC:      {}", agent.rpc_addr());
    println!("    data dir: {}", args.data_dir.display());
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down; tasks keep running");
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let server = start_server(
        &args.data_dir.join("server"),
        &args.grpc_addr,
        &args.http_addr,
        None,
        args.heartbeat_ttl,
        RaftSettings::default(),
        ClusterSettings::default(),
    )
    .await?;
    let config = agent_config(&args.data_dir.join("agent"), vec![server.grpc_addr().to_string()], args.node_name, "127.0.0.1:0")?;
    let agent = Agent::start(config).await.context("starting the agent")?;
    let grpc = server.grpc_addr();
    println!("==> mlp dev cluster running (one server, one agent, embedded storage)");
    println!("    gRPC:     {grpc}");
    println!("    HTTP:     http://{}", server.http_addr());
    println!("    metrics:  http://{}/v1/metrics", server.http_addr());
    println!("    node:     {}", agent.node_id());
    println!("    data dir: {}", args.data_dir.display());
    let addr_hint = if grpc.to_string() == "127.0.0.1:7647" { String::new() } else { format!("MLP_ADDR={grpc} ") };
    println!("==> try: {addr_hint}mlp job run examples/train.hcl");
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down; tasks keep running");
    agent.shutdown().await;
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
