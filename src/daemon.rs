//! Long-running modes: `mlp server`, `mlp agent` and `mlp dev` (both in one process).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use mlp_agent::config_file::{FileConfig, Reader};
use mlp_agent::{Agent, AgentConfig};
use mlp_server::leader::HeartbeatSettings;
use mlp_server::raft::node::RaftSettings;
use mlp_server::{ClusterSettings, Server, ServerConfig};

use crate::cli::{AgentArgs, DevArgs, ExecIsolationArgs, RaftTimingArgs, ServerArgs};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn"));
    // Colour codes only on a terminal: a log file or journal would keep them as noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    tracing::info!(version = crate::VERSION, allocator = crate::allocator::describe(), "mlp starting");
}

fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("cannot listen on {what} address {addr}"))
}

/// `(--heartbeat-ttl a.k.a. --heartbeat-min-ttl, --max-heartbeats-per-second)`.
fn heartbeat((ttl_secs, per_second): (f64, f64)) -> anyhow::Result<HeartbeatSettings> {
    if !(ttl_secs.is_finite() && (0.5..=3600.0).contains(&ttl_secs)) {
        anyhow::bail!("--heartbeat-ttl must be between 0.5 and 3600 seconds, got {ttl_secs}");
    }
    if !(per_second.is_finite() && (0.1..=100_000.0).contains(&per_second)) {
        anyhow::bail!("--max-heartbeats-per-second must be between 0.1 and 100000, got {per_second}");
    }
    let ttl = Duration::from_secs_f64(ttl_secs);
    Ok(HeartbeatSettings { ttl, failover_grace: ttl, max_heartbeats_per_second: per_second })
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

// One flag group per parameter; a settings struct would only repeat them.
#[allow(clippy::too_many_arguments)]
async fn start_server(
    data_dir: &Path,
    grpc: &str,
    http: &str,
    advertise: Option<String>,
    ttl: (f64, f64),
    raft: RaftSettings,
    cluster: ClusterSettings,
    preemption: &crate::cli::PreemptionArgs,
    gc: &crate::cli::GcArgs,
    overlay: &crate::cli::OverlayArgs,
    tls: Option<std::sync::Arc<mlp_tls::Tls>>,
    acl_enabled: bool,
    artifacts: &crate::cli::MlflowArtifactArgs,
) -> anyhow::Result<Server> {
    let config = ServerConfig {
        data_dir: data_dir.to_path_buf(),
        grpc_listener: bind(grpc, "gRPC")?,
        http_listener: bind(http, "HTTP")?,
        advertise_addr: advertise,
        raft,
        heartbeat: heartbeat(ttl)?,
        scheduler: scheduler_options(preemption)?,
        gc: gc_settings(gc)?,
        event_buffer: event_buffer(gc.event_buffer)?,
        overlay: overlay.pool()?,
        tls,
        acl_enabled,
        artifacts: artifacts.settings()?,
    };
    Server::start_clustered(config, cluster).await.context("starting the server")
}

/// Preemption settings from the flags (`--preempt-batch`, `--preempt-service`, `--preemption-delta`).
fn scheduler_options(p: &crate::cli::PreemptionArgs) -> anyhow::Result<mlp_server::scheduler::Options> {
    if !(1..=99).contains(&p.preemption_delta) {
        anyhow::bail!("--preemption-delta must be between 1 and 99, got {}", p.preemption_delta);
    }
    Ok(mlp_server::scheduler::Options {
        preemption: mlp_server::scheduler::Preemption { batch: p.preempt_batch, service: p.preempt_service, delta: p.preemption_delta },
    })
}

/// Garbage collection from the flags: an interval between a second and 30 days; thresholds of
/// any age (0 collects terminal objects as soon as the next collection runs).
fn gc_settings(g: &crate::cli::GcArgs) -> anyhow::Result<mlp_server::leader::gc::GcSettings> {
    if g.gc_interval < Duration::from_secs(1) || g.gc_interval > Duration::from_secs(30 * 24 * 3600) {
        anyhow::bail!("--gc-interval must be between 1s and 720h, got {:?}", g.gc_interval);
    }
    Ok(mlp_server::leader::gc::GcSettings {
        interval: g.gc_interval,
        thresholds: mlp_server::leader::gc::GcThresholds {
            eval: g.eval_gc_threshold,
            job: g.job_gc_threshold,
            node: g.node_gc_threshold,
            tracking: g.tracking_gc_threshold,
        },
    })
}

fn event_buffer(n: usize) -> anyhow::Result<usize> {
    if !(1..=1_000_000).contains(&n) {
        anyhow::bail!("--event-buffer must be between 1 and 1000000 events, got {n}");
    }
    Ok(n)
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
    if t.raft_snapshot_logs == 0 {
        anyhow::bail!("--raft-snapshot-logs must be at least 1");
    }
    Ok(RaftSettings {
        heartbeat_ms: t.raft_heartbeat_ms,
        election_min_ms: t.raft_election_min_ms,
        election_max_ms: t.raft_election_max_ms,
        snapshot_logs: t.raft_snapshot_logs,
        max_in_snapshot_log_to_keep: t.raft_keep_logs,
    })
}

pub async fn server(args: ServerArgs, conn: &crate::cli::Conn) -> anyhow::Result<ExitCode> {
    init_logging();
    let file = config_file(args.config.as_deref(), Reader::Server)?;
    let tls = crate::tls::daemon(conn, mlp_tls::Role::Server, "mlp server", file.tls.as_ref())?;
    let acl_enabled = args.acl_enabled.or(file.acl_enabled).unwrap_or(false);
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
    let server = start_server(
        &args.data_dir,
        &args.grpc_addr,
        &args.http_addr,
        args.advertise,
        (args.heartbeat_ttl, args.max_heartbeats_per_second),
        raft,
        cluster,
        &args.preemption,
        &args.gc,
        &args.overlay,
        tls.clone(),
        acl_enabled,
        &args.mlflow_artifacts,
    )
    .await?;
    crate::tls::reload_on_sighup(tls.iter().cloned().collect())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("==> mlp server running{}", if tls.is_some() { " (mutual TLS)" } else { "" });
    println!("    node id:  {}", server.api.raft.node_id);
    println!("    gRPC:     {}", server.grpc_addr());
    println!("    HTTP:     {scheme}://{}", server.http_addr());
    println!("    data dir: {}", args.data_dir.display());
    if acl_enabled {
        println!("    ACLs:     enabled (mlp acl bootstrap; audit log in the data dir)");
    }
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// The configuration file (`--config`) as `reader` reads it, checked; none: everything at its
/// default.
fn config_file(path: Option<&Path>, reader: Reader) -> anyhow::Result<FileConfig> {
    match path {
        None => Ok(FileConfig::default()),
        Some(p) => mlp_agent::config_file::load_for(p, reader).map_err(|e| anyhow::anyhow!("--config:\n{e}")),
    }
}

/// The `exec` driver's isolation settings from the flags, else the config file, else the
/// defaults, checked: every bound path absolute and present, user names well-formed, pids
/// limits positive.
fn isolation_settings(a: &ExecIsolationArgs, file: &FileConfig) -> anyhow::Result<mlp_agent::isolation::IsolationSettings> {
    let user_ok = |u: &str| !u.is_empty() && u.len() <= 32 && u.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let defaults = mlp_agent::isolation::IsolationSettings::default();
    let default_user = a.exec_default_user.clone().or_else(|| file.default_user.clone()).unwrap_or(defaults.default_user.clone());
    if !user_ok(&default_user) {
        anyhow::bail!("--exec-default-user: {default_user:?} is not a user name");
    }
    let refused_in = a.exec_refused_users.clone().or_else(|| file.refused_users.clone()).unwrap_or(defaults.refused_users.clone());
    let refused: Vec<String> = refused_in.iter().map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    if let Some(bad) = refused.iter().find(|u| !user_ok(u)) {
        anyhow::bail!("--exec-refused-users: {bad:?} is not a user name");
    }
    if refused.contains(&default_user) {
        anyhow::bail!("--exec-default-user {default_user} is also in --exec-refused-users (or the config file's refused_users)");
    }
    let default_pids = a.exec_default_pids.or(file.default_pids).unwrap_or(defaults.default_pids);
    if default_pids == 0 {
        anyhow::bail!("--exec-default-pids must be at least 1");
    }
    let pids_max = a.exec_pids_max.or(file.pids_max);
    if pids_max == Some(0) {
        anyhow::bail!("--exec-pids-max must be at least 1");
    }
    let bind_ro = if a.exec_bind_ro.is_empty() { file.bind_read_only.clone().unwrap_or_default() } else { a.exec_bind_ro.clone() };
    for p in &bind_ro {
        if !p.is_absolute() {
            anyhow::bail!("--exec-bind-ro {}: must be an absolute path", p.display());
        }
        if !p.exists() {
            anyhow::bail!("--exec-bind-ro {}: no such file or directory on this host", p.display());
        }
    }
    let hide = if a.exec_hide.is_empty() { file.hide.clone().unwrap_or_default() } else { a.exec_hide.clone() };
    let mut hidden = Vec::new();
    for p in &hide {
        hidden.push(mlp_agent::isolation::check_hidden_path(p).map_err(|e| anyhow::anyhow!("--exec-hide {e}"))?);
    }
    Ok(mlp_agent::isolation::IsolationSettings {
        hidden_paths: hidden,
        default_user,
        refused_users: refused,
        default_pids,
        agent_pids_max: pids_max,
        extra_ro_paths: bind_ro,
        ..Default::default()
    })
}

/// The drivers an agent offers: the config file's choice over the defaults (`raw_exec` on by
/// default only when `raw_exec_default`), then the `raw_exec` flag's over both.
fn drivers(file: &FileConfig, raw_exec: Option<bool>, raw_exec_default: bool) -> Vec<String> {
    let mut drivers = file.drivers_enabled(raw_exec_default);
    let raw = mlp_proto::consts::driver::RAW_EXEC;
    match raw_exec {
        Some(true) if !drivers.iter().any(|d| d == raw) => drivers.push(raw.to_string()),
        Some(false) => drivers.retain(|d| d != raw),
        _ => {}
    }
    if drivers.iter().any(|d| d == raw) {
        tracing::warn!("the raw_exec driver is enabled: its tasks run unisolated, as the agent's user");
    }
    drivers
}

fn agent_config(
    data_dir: &Path,
    servers: Vec<String>,
    node_name: Option<String>,
    rpc_addr: &str,
    exec: &ExecIsolationArgs,
    file: &FileConfig,
    drivers_enabled: Vec<String>,
) -> anyhow::Result<AgentConfig> {
    let mut config = AgentConfig {
        isolation: isolation_settings(exec, file)?,
        data_dir: data_dir.to_path_buf(),
        servers,
        rpc_listener: Some(bind(rpc_addr, "agent RPC")?),
        drivers_enabled,
        host_volumes: file.host_volumes.clone(),
        ..AgentConfig::default()
    };
    if let Some(n) = node_name {
        config.node_name = n;
    }
    Ok(config)
}

/// The devices of `--simulated-gpus FILE`, checked (none without the flag).
fn simulated_gpus(file: Option<&Path>) -> anyhow::Result<Vec<mlp_proto::v1::GpuDevice>> {
    match file {
        None => Ok(Vec::new()),
        Some(f) => mlp_agent::gpu::simulated::load(f).map_err(|e| anyhow::anyhow!("--simulated-gpus:\n{e}")),
    }
}

pub async fn agent(args: AgentArgs, conn: &crate::cli::Conn) -> anyhow::Result<ExitCode> {
    init_logging();
    let file = config_file(args.config.as_deref(), Reader::Agent)?;
    let tls = crate::tls::daemon(conn, mlp_tls::Role::Agent, "mlp agent", file.tls.as_ref())?;
    if tls.is_none() {
        if let Some(s) = args.servers.iter().find(|s| s.trim().starts_with("https://")) {
            anyhow::bail!(
                "--servers {s}: an https:// server needs mutual TLS: --ca-file, --cert-file and --key-file (an agent certificate), or the config file's tls block"
            );
        }
    }
    if args.servers.is_empty() || args.servers.iter().any(|s| s.trim().is_empty()) {
        anyhow::bail!("--servers needs at least one server address");
    }
    // A bad GPU file fails before anything is bound or written.
    let gpus = simulated_gpus(args.simulated_gpus.as_deref())?;
    let drivers = drivers(&file, args.enable_raw_exec.then_some(true), false);
    let mut config = agent_config(&args.data_dir, args.servers, args.node_name, &args.rpc_addr, &args.exec, &file, drivers)?;
    config.simulated_gpus = gpus;
    config.gpu = args.gpu.settings();
    config.network = args.network.settings()?;
    config.dns_upstreams = args.dns.upstreams()?;
    config.images = args.oci.settings()?;
    config.artifacts = args.artifacts.settings()?;
    config.tracking = args.tracking.mode()?;
    config.datacenter = args.datacenter;
    config.node_pool = args.node_pool;
    config.meta = args.meta.into_iter().collect::<BTreeMap<_, _>>();
    config.tls = tls.clone();
    config.node_secret_file = args.node_secret_file;
    let agent = Agent::start(config).await.context("starting the agent")?;
    crate::tls::reload_on_sighup(tls.into_iter().collect())?;
    println!("==> mlp agent running");
    println!("    node:     {}", agent.node_id());
    println!("    RPC:      {}", agent.rpc_addr());
    println!("    data dir: {}", args.data_dir.display());
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down; tasks keep running");
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn dev(args: DevArgs, conn: &crate::cli::Conn) -> anyhow::Result<ExitCode> {
    init_logging();
    // A bad config file, certificates, isolation flags or GPU file fail before anything starts.
    let file = config_file(args.config.as_deref(), Reader::Dev)?;
    // One identity for both halves: a server certificate (good for the agent role too).
    let tls = crate::tls::daemon(conn, mlp_tls::Role::Server, "mlp dev (server and agent in one)", file.tls.as_ref())?;
    let acl_enabled = args.acl_enabled.or(file.acl_enabled).unwrap_or(false);
    isolation_settings(&args.exec, &file)?;
    let network = args.network.settings()?;
    let dns_upstreams = args.dns.upstreams()?;
    let gpus = simulated_gpus(args.simulated_gpus.as_deref())?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let server = start_server(
        &args.data_dir.join("server"),
        &args.grpc_addr,
        &args.http_addr,
        None,
        (args.heartbeat_ttl, mlp_server::leader::DEFAULT_MAX_HEARTBEATS_PER_SECOND),
        RaftSettings::default(),
        ClusterSettings::default(),
        &args.preemption,
        &args.gc,
        &args.overlay,
        tls.clone(),
        acl_enabled,
        &args.mlflow_artifacts,
    )
    .await?;
    // `mlp dev` is a development mode: raw_exec stays on unless turned off (README).
    let drivers = drivers(&file, args.disable_raw_exec.then_some(false), true);
    let mut config = agent_config(
        &args.data_dir.join("agent"),
        vec![server.grpc_addr().to_string()],
        args.node_name,
        "127.0.0.1:0",
        &args.exec,
        &file,
        drivers,
    )?;
    config.simulated_gpus = gpus;
    config.gpu = args.gpu.settings();
    config.network = network;
    config.dns_upstreams = dns_upstreams;
    config.images = args.oci.settings()?;
    config.artifacts = args.artifacts.settings()?;
    config.tracking = args.tracking.mode()?;
    config.tls = tls.clone();
    let agent = Agent::start(config).await.context("starting the agent")?;
    crate::tls::reload_on_sighup(tls.iter().cloned().collect())?;
    let grpc = server.grpc_addr();
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("==> mlp dev cluster running (one server, one agent, embedded storage{})", if tls.is_some() { ", mutual TLS" } else { "" });
    println!("    gRPC:     {grpc}");
    println!("    HTTP:     {scheme}://{}", server.http_addr());
    println!("    metrics:  {scheme}://{}/v1/metrics", server.http_addr());
    println!("    node:     {}", agent.node_id());
    println!("    data dir: {}", args.data_dir.display());
    if acl_enabled {
        println!("    ACLs:     enabled (mlp acl bootstrap, then MLP_TOKEN=<secret>)");
    }
    let addr_hint = match &tls {
        Some(t) => format!(
            "MLP_ADDR=https://{grpc} MLP_CACERT={} MLP_CLIENT_CERT=<a client certificate> MLP_CLIENT_KEY=<its key> ",
            t.files().ca_file.display()
        ),
        None if grpc.to_string() == "127.0.0.1:7647" => String::new(),
        None => format!("MLP_ADDR={grpc} "),
    };
    // The agent registers on its own task: announce the cluster once its node can take work,
    // so that a job submitted right after "try:" finds it (bounded; a slow registration is
    // logged by the agent and the node shows up later).
    let registered = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            let ready =
                server.api.state.read().nodes.get(agent.node_id()).is_some_and(|n| n.status == mlp_proto::consts::node_status::READY);
            if ready {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    if registered.is_err() {
        tracing::warn!(node = agent.node_id(), "the agent has not registered within 15 s; the node will show up once it does");
    }
    println!("==> try: {addr_hint}mlp job run examples/train.hcl");
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down; tasks keep running");
    agent.shutdown().await;
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
