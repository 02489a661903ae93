//! The command line: every verb and flag, declared with clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// mlp: a cluster orchestrator for machine-learning work.
#[derive(Debug, Parser)]
#[command(name = "mlp", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the CLI finds a server.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// gRPC address of any server.
    #[arg(long, global = true, env = "MLP_ADDR", default_value = "127.0.0.1:7647")]
    pub address: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server (Raft member, scheduler, API).
    Server(ServerArgs),
    /// Run an agent that runs workloads on this machine.
    Agent(AgentArgs),
    /// Run a one-node cluster (server + agent in one process) on embedded storage.
    Dev(DevArgs),
    /// Submit, plan, inspect and stop jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Inspect allocations and read their logs.
    #[command(subcommand)]
    Alloc(AllocCommand),
    /// Inspect nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect evaluations.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Where Raft's log, snapshots and the node id live.
    #[arg(long, default_value = "./mlp-data/server")]
    pub data_dir: PathBuf,
    /// gRPC listen address (API of record, agents, Raft).
    #[arg(long, default_value = "127.0.0.1:7647")]
    pub grpc_addr: String,
    /// HTTP JSON API and metrics listen address.
    #[arg(long, default_value = "127.0.0.1:7646")]
    pub http_addr: String,
    /// gRPC address other servers and agents use to reach this one (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Node heartbeat TTL in seconds: a node silent this long is marked down.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_ttl: f64,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where the agent keeps allocation directories, logs and its node id.
    #[arg(long, default_value = "./mlp-data/agent")]
    pub data_dir: PathBuf,
    /// Server gRPC addresses, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7647")]
    pub servers: Vec<String>,
    /// Node name (default: hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long, default_value = "dc1")]
    pub datacenter: String,
    #[arg(long, default_value = "default")]
    pub node_pool: String,
    /// Listen address of the agent's own gRPC endpoint (logs); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub rpc_addr: String,
    /// Node metadata, repeatable: --meta rack=r1
    #[arg(long, value_parser = parse_kv)]
    pub meta: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the dev cluster keeps everything.
    #[arg(long, default_value = "./mlp-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7647")]
    pub grpc_addr: String,
    #[arg(long, default_value = "127.0.0.1:7646")]
    pub http_addr: String,
    /// Node name of the built-in agent (default: hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Node heartbeat TTL in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_ttl: f64,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Register a job from a spec file and follow its placement.
    Run {
        file: PathBuf,
        /// Return right after registration.
        #[arg(long)]
        detach: bool,
        /// Print the registration result as JSON (implies --detach).
        #[arg(long)]
        json: bool,
    },
    /// Show what registering a job would place where; changes nothing.
    Plan {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a job spec file; talks to no server.
    Validate { file: PathBuf },
    /// Show one job, or list all jobs.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Read from the contacted server without a linearizable read.
        #[arg(long)]
        stale: bool,
    },
    /// Stop a job (its allocations are stopped).
    Stop {
        name: String,
        /// Also remove the job from the state.
        #[arg(long)]
        purge: bool,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Don't wait for the allocations to stop.
        #[arg(long)]
        detach: bool,
    },
    /// Show a job's versions.
    History {
        name: String,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AllocCommand {
    /// Show an allocation: placement, task states and events.
    Status {
        /// Allocation id or unique prefix.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a task's stdout (or stderr).
    Logs {
        /// Allocation id or unique prefix.
        id: String,
        /// Task name (optional when the group has one task).
        task: Option<String>,
        /// Keep following the log.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Show stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Start this many bytes before the end.
        #[arg(long)]
        tail: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes, or show one.
    Status {
        /// Node id, unique prefix or name.
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Show one evaluation, or list them.
    Status {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
