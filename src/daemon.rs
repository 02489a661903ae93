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
use mlp_server::{Server, ServerConfig};

use crate::cli::{AgentArgs, DevArgs, ServerArgs};

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

async fn start_server(data_dir: &Path, grpc: &str, http: &str, advertise: Option<String>, ttl: f64) -> anyhow::Result<Server> {
    let config = ServerConfig {
        data_dir: data_dir.to_path_buf(),
        grpc_listener: bind(grpc, "gRPC")?,
        http_listener: bind(http, "HTTP")?,
        advertise_addr: advertise,
        raft: RaftSettings::default(),
        heartbeat: heartbeat(ttl)?,
    };
    Server::start(config).await.context("starting the server")
}

pub async fn server(args: ServerArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let server = start_server(&args.data_dir, &args.grpc_addr, &args.http_addr, args.advertise, args.heartbeat_ttl).await?;
    println!("==> mlp server running");
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
    let server = start_server(&args.data_dir.join("server"), &args.grpc_addr, &args.http_addr, None, args.heartbeat_ttl).await?;
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
