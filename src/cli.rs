//! The command line: every verb and flag, declared with clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// mlp: a cluster orchestrator for machine-learning work.
#[derive(Debug, Parser)]
#[command(name = "mlp", version = crate::VERSION, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

// Where the CLI finds a server.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// gRPC address of any server; several, comma separated, are tried in order.
    #[arg(long, global = true, env = "MLP_ADDR", default_value = "127.0.0.1:7647")]
    pub address: String,
    /// Mutual TLS (docs/security.md): the CA certificate(s) peers must chain to. For the CLI,
    /// default $MLP_CACERT; for `mlp server`, `mlp agent` and `mlp dev`, default the
    /// `--config` file's `tls { ca_file }`.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// This process's certificate (PEM); the CLI's default is $MLP_CLIENT_CERT, a daemon's the
    /// config file's `tls { cert_file }`.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM); the CLI's default is $MLP_CLIENT_KEY, a daemon's
    /// the config file's `tls { key_file }`.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

// Every subcommand enum is `defer = true`: clap builds a subcommand's arguments only when the
// command line goes into it, so a CLI call builds the one path it takes instead of the whole
// tree (every command's arguments, before parsing a single word). Help, completions and
// `debug_assert` still build the whole tree. An `Args` struct therefore carries no doc comment
// of its own (`//`, not `///`): a deferred struct's doc would replace the command's about text.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
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
    /// Follow and steer the rollouts of service jobs (`update` blocks): promote canaries,
    /// pause, resume, fail.
    #[command(subcommand)]
    Deployment(DeploymentCommand),
    /// Inspect services (registered from jobs' `service` blocks) and their health.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// MLflow runs tracked by the cluster (docs/tracking.md).
    #[command(subcommand)]
    Run(RunCommand),
    /// The model registry: registered models, versions and aliases.
    #[command(subcommand)]
    Model(ModelCommand),
    // ---- high availability (issue 5): cluster operations ----
    /// Cluster operations: Raft peers, leadership.
    #[command(subcommand)]
    Operator(OperatorCommand),
    // ---- end high availability ----
    /// Follow the cluster's event stream.
    #[command(subcommand)]
    Event(EventCommand),
    /// Cluster-wide maintenance: garbage collection.
    #[command(subcommand)]
    System(SystemCommand),
    /// ACL tokens and policies (servers started with --acl-enabled). The CLI sends the token
    /// in MLP_TOKEN with every request.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Namespaces and their quotas (docs/namespaces.md).
    #[command(subcommand)]
    Namespace(crate::namespace::NamespaceCommand),
    /// Replay a production trace (openb CSV) against a simulated cluster with the scheduler's
    /// placement policies: GPU allocation ratio, failed pods, placements/s.
    Sim(SimArgs),
    /// Create a cluster CA and certificates for mutual TLS (PEM files in the current directory).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    // ---- high availability (issue 5) ----
    /// Inspect the servers of a cluster (without a subcommand: run a server).
    #[command(subcommand)]
    pub action: Option<ServerAction>,
    /// Bootstrap the cluster only once this many servers know each other (1: bootstrap alone).
    #[arg(long, default_value_t = 1)]
    pub bootstrap_expect: usize,
    /// gRPC addresses of other servers to form or join a cluster with; comma separated or
    /// repeated.
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<String>,
    #[command(flatten)]
    pub raft: RaftTimingArgs,
    // ---- end high availability ----
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
    /// Smallest node heartbeat TTL in seconds: a node silent for its TTL is marked down. The TTL
    /// grows with the cluster: max(this, nodes / --max-heartbeats-per-second).
    #[arg(long, visible_alias = "heartbeat-min-ttl", default_value_t = 10.0)]
    pub heartbeat_ttl: f64,
    /// Heartbeats per second the leader is sized for; the TTL grows past
    /// --heartbeat-min-ttl once nodes / this exceeds it.
    #[arg(long, default_value_t = 50.0)]
    pub max_heartbeats_per_second: f64,
    #[command(flatten)]
    pub overlay: OverlayArgs,
    #[command(flatten)]
    pub preemption: PreemptionArgs,
    #[command(flatten)]
    pub gc: GcArgs,
    #[command(flatten)]
    pub mlflow_artifacts: MlflowArtifactArgs,
    /// Require ACL tokens (docs/acl.md): every API request needs a token whose policies allow
    /// it; agents' and servers' own RPCs are not token-checked. Default: the config file's
    /// `acl { enabled }`, else off; `--acl-enabled=false` overrides the file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub acl_enabled: Option<bool>,
    /// Configuration file (HCL, Nomad's shape; docs/acl.md): `tls { ca_file cert_file key_file }`
    /// and `acl { enabled }`; a `client` block is refused (a server runs no agent). Flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

// Garbage collection (Nomad's core scheduler): how often the leader collects, and how old
// terminal evaluations and allocations, dead jobs and down nodes must be. Durations like
// `90s`, `30m`, `1h`.
#[derive(Debug, Args, Clone)]
pub struct GcArgs {
    /// How often the leader collects garbage (`mlp system gc` collects at once).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub gc_interval: std::time::Duration,
    /// Terminal evaluations and allocations older than this are collected (those the
    /// scheduler still needs never are).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub eval_gc_threshold: std::time::Duration,
    /// Dead jobs (stopped, or batch jobs that finished) whose evaluations and allocations are
    /// all terminal and older than this are collected with them.
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    pub job_gc_threshold: std::time::Duration,
    /// Down nodes without allocations whose last heartbeat is older than this are collected.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub node_gc_threshold: std::time::Duration,
    /// MLflow runs and experiments deleted longer ago than this are purged for good (params,
    /// tags, metric points; an experiment with all its runs). Until then a delete can be
    /// restored.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub tracking_gc_threshold: std::time::Duration,
    /// Events each server keeps so that event-stream clients can resume after a reconnect
    /// (`--index`); a client further behind must read the state again.
    #[arg(long, default_value_t = mlp_server::events::DEFAULT_BUFFER_EVENTS)]
    pub event_buffer: usize,
}

// Where MLflow artifact uploads go (docs/tracking.md, "Artifacts"): the servers' disks,
// replicated to a quorum (default), or an S3-compatible bucket.
#[derive(Debug, Args, Clone)]
pub struct MlflowArtifactArgs {
    /// `disk` (blobs on the servers, each on a majority of them before an upload is
    /// acknowledged) or `s3://BUCKET[/PREFIX]` (credentials from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN).
    #[arg(long, default_value = "disk", value_name = "STORE")]
    pub artifact_store: String,
    /// The S3 endpoint URL, for S3-compatible servers (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region (default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Largest MLflow artifact accepted in one upload, in MiB.
    #[arg(long, default_value_t = 16 * 1024)]
    pub tracking_artifact_max_mib: u64,
    /// How old a blob that no artifact names any more must be before it is deleted.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub artifact_gc_grace: std::time::Duration,
}

impl MlflowArtifactArgs {
    pub fn settings(&self) -> anyhow::Result<mlp_server::tracking::artifacts::ArtifactSettings> {
        use mlp_server::tracking::artifacts::{ArtifactSettings, StoreConfig};
        if self.tracking_artifact_max_mib == 0 {
            anyhow::bail!("--tracking-artifact-max-mib must be at least 1");
        }
        if let Some(e) = &self.s3_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                anyhow::bail!("--s3-endpoint {e:?}: expected an http:// or https:// URL");
            }
        }
        let store =
            StoreConfig::parse(&self.artifact_store, self.s3_endpoint.clone(), self.s3_region.clone()).map_err(anyhow::Error::msg)?;
        if matches!(store, StoreConfig::Disk) && (self.s3_endpoint.is_some() || self.s3_region.is_some()) {
            anyhow::bail!("--s3-endpoint and --s3-region need --artifact-store s3://...");
        }
        Ok(ArtifactSettings {
            store,
            max_bytes: self.tracking_artifact_max_mib.saturating_mul(1024 * 1024),
            gc_grace: self.artifact_gc_grace,
        })
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    mlp_proto::jobspec::parse_duration(s)
}

// Preemption: which job types may evict lower-priority allocations, and the priority gap.
#[derive(Debug, Args, Clone)]
pub struct PreemptionArgs {
    /// Whether batch jobs may preempt lower-priority allocations.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub preempt_batch: bool,
    /// Whether service jobs may preempt lower-priority allocations.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub preempt_service: bool,
    /// A victim's job priority must be at most the preemptor's minus this (1..=99).
    #[arg(long, default_value_t = 10)]
    pub preemption_delta: i32,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TlsCommand {
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(TlsCaCommand),
    /// Certificates signed by the CA.
    #[command(subcommand)]
    Cert(TlsCertCommand),
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TlsCaCommand {
    /// Write a new CA: mlp-ca.pem and mlp-ca-key.pem (refuses to overwrite them).
    Create {
        /// Days the CA is valid.
        #[arg(long, default_value_t = mlp_tls::gen::CA_DAYS)]
        days: u32,
        /// The CA's common name.
        #[arg(long, default_value = "mlp CA")]
        common_name: String,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TlsCertCommand {
    /// Write a certificate and key for one role (mlp-server.pem and mlp-server-key.pem, …;
    /// numbered when taken). Roles: --server (server.mlp: Raft, joins, forwarding; also good for
    /// anything else), --agent (agent.mlp: node registration and streams), --client
    /// (client.mlp: the CLI and API users). Single-dash spellings (-server) work too.
    #[command(group(clap::ArgGroup::new("role").required(true).args(["server", "agent", "client"])))]
    Create {
        #[arg(long)]
        server: bool,
        #[arg(long)]
        agent: bool,
        #[arg(long)]
        client: bool,
        /// The CA certificate.
        #[arg(long = "ca", default_value = "mlp-ca.pem", value_name = "FILE")]
        ca: PathBuf,
        /// The CA's key.
        #[arg(long = "key", default_value = "mlp-ca-key.pem", value_name = "FILE")]
        key: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = mlp_tls::gen::CERT_DAYS)]
        days: u32,
        /// Another DNS name for the certificate; repeatable.
        #[arg(long = "additional-dnsname", value_name = "NAME")]
        additional_dnsname: Vec<String>,
        /// Another IP address for the certificate; repeatable.
        #[arg(long = "additional-ipaddress", value_name = "IP")]
        additional_ipaddress: Vec<std::net::IpAddr>,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where the node secret the servers issue is kept (default: <data-dir>/node-secret).
    /// Whoever holds it can act for this node: keep it private.
    #[arg(long, value_name = "FILE")]
    pub node_secret_file: Option<PathBuf>,
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
    /// JSON file of simulated GPUs this node registers (a device list or a generator; see
    /// README "Simulated GPUs"); they are marked simulated everywhere.
    #[arg(long, value_name = "FILE")]
    pub simulated_gpus: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub exec: ExecIsolationArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub oci: OciArgs,
    #[command(flatten)]
    pub artifacts: ArtifactArgs,
    #[command(flatten)]
    pub tracking: TrackingArgs,
    /// Agent configuration file (HCL, Nomad's `client { ... }` block: drivers, refused users,
    /// host volumes, isolation; and a `tls { ... }` block; docs/acl.md). Flags given on the
    /// command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Offer the `raw_exec` driver (unisolated: tasks run as the agent's user, root). Off
    /// unless this flag or the config file's `drivers { raw_exec { enabled = true } }` says so.
    #[arg(long)]
    pub enable_raw_exec: bool,
}

// The `oci` driver's image store (docs/jobspec.md, "driver = oci").
#[derive(Debug, Args, Clone)]
pub struct OciArgs {
    /// Registry (HOST:PORT) reached over plain HTTP, besides those on loopback; repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    pub oci_insecure_registry: Vec<String>,
    /// Disk budget of the node's image layers, in MiB: unused images beyond it are removed,
    /// least recently used first.
    #[arg(long, default_value_t = 20480)]
    pub oci_image_budget_mib: u64,
    /// Longest an image pull may take, in seconds.
    #[arg(long, default_value_t = 600)]
    pub oci_pull_timeout: u64,
    /// JSON file of registry credentials used when a job gives none:
    /// {"HOST:PORT": {"username": "...", "password": "..."}}.
    #[arg(long, value_name = "FILE")]
    pub oci_auth_file: Option<std::path::PathBuf>,
}

impl OciArgs {
    /// The image store's settings, checked.
    pub fn settings(&self) -> anyhow::Result<mlp_agent::image::ImageSettings> {
        for r in &self.oci_insecure_registry {
            let ok = !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if !ok {
                anyhow::bail!("--oci-insecure-registry {r:?}: must be HOST or HOST:PORT");
            }
        }
        if self.oci_pull_timeout == 0 {
            anyhow::bail!("--oci-pull-timeout must be at least 1 (seconds)");
        }
        let credentials = match &self.oci_auth_file {
            Some(f) => mlp_agent::image::load_credentials(f).map_err(|e| anyhow::anyhow!("--oci-auth-file {e}"))?,
            None => Default::default(),
        };
        Ok(mlp_agent::image::ImageSettings {
            credentials,
            insecure_registries: self.oci_insecure_registry.clone(),
            budget_bytes: self.oci_image_budget_mib.saturating_mul(1024 * 1024),
            pull_timeout: std::time::Duration::from_secs(self.oci_pull_timeout),
            ..Default::default()
        })
    }
}

// Tasks' `artifact` blocks (docs/jobspec.md, "artifact").
#[derive(Debug, Args, Clone)]
pub struct ArtifactArgs {
    /// Directory `file://` artifact sources may name files under; repeatable. Without one,
    /// `file://` sources are refused (a job must not read any file of the node).
    #[arg(long, value_name = "DIR")]
    pub artifact_file_root: Vec<std::path::PathBuf>,
    /// Longest one artifact may take to fetch, all attempts together, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub artifact_timeout: u64,
    /// Largest artifact fetched, in MiB (as downloaded, before unpacking).
    #[arg(long, default_value_t = 20480)]
    pub artifact_max_mib: u64,
}

impl ArtifactArgs {
    pub fn settings(&self) -> anyhow::Result<mlp_agent::artifact::ArtifactSettings> {
        if self.artifact_timeout == 0 || self.artifact_max_mib == 0 {
            anyhow::bail!("--artifact-timeout and --artifact-max-mib must be at least 1");
        }
        for r in &self.artifact_file_root {
            if !r.is_absolute() || !r.is_dir() {
                anyhow::bail!("--artifact-file-root {}: must be an existing directory, given as an absolute path", r.display());
            }
        }
        Ok(mlp_agent::artifact::ArtifactSettings {
            file_roots: self.artifact_file_root.clone(),
            timeout: std::time::Duration::from_secs(self.artifact_timeout),
            max_bytes: self.artifact_max_mib.saturating_mul(1024 * 1024),
        })
    }
}

// MLflow for tasks (docs/tracking.md, "From inside a job").
#[derive(Debug, Args, Clone)]
pub struct TrackingArgs {
    /// MLFLOW_TRACKING_URI given to tasks that set none: an http(s):// URI, or `none` for none.
    /// Default: the URI of the server the agent registered with (its HTTP address).
    #[arg(long, value_name = "URI")]
    pub tracking_uri: Option<String>,
}

impl TrackingArgs {
    pub fn mode(&self) -> anyhow::Result<mlp_agent::tracking::TrackingMode> {
        match &self.tracking_uri {
            None => Ok(mlp_agent::tracking::TrackingMode::FromServers),
            Some(flag) => mlp_agent::tracking::TrackingMode::parse(flag).map_err(|e| anyhow::anyhow!("--tracking-uri: {e}")),
        }
    }
}

// Real GPUs: where NVML and the driver's files are (issue 12).
#[derive(Debug, Args, Clone)]
pub struct GpuArgs {
    /// Look for real GPUs through NVML: auto (when the library is found), nvml (warn when it is
    /// not), none (never). `--simulated-gpus` replaces real ones.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "nvml", "none"])]
    pub gpus: String,
    /// The NVML library to load (default: searched in the loader's paths, the driver root and
    /// common prefixes such as /usr/local/nvidia).
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// A prefix holding the NVIDIA driver's user-space files (e.g. /usr/local/nvidia).
    #[arg(long, value_name = "DIR")]
    pub nvidia_driver_root: Option<PathBuf>,
    /// Where the NVIDIA device nodes are.
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    pub nvidia_dev_dir: PathBuf,
    /// XIDs that do not mark a device unhealthy, besides 13, 31, 43, 45, 68 and 109
    /// (comma separated).
    #[arg(long, value_name = "XIDS", value_delimiter = ',')]
    pub ignore_xids: Vec<u64>,
    /// The MPS control binary (default: nvidia-cuda-mps-control in the driver root or PATH).
    #[arg(long, value_name = "PATH")]
    pub mps_control: Option<PathBuf>,
    /// Where the MPS daemons keep their pipe and log directories (default: /run/mlp/mps/<hash
    /// of the data dir>); every directory above it must be searchable by the tasks' users.
    #[arg(long, value_name = "DIR")]
    pub mps_dir: Option<PathBuf>,
    /// The driver's MIG capability minors file (tests point it at a stand-in).
    #[arg(long, value_name = "FILE", default_value = "/proc/driver/nvidia-caps/mig-minors", hide = true)]
    pub nvidia_mig_minors: PathBuf,
}

impl GpuArgs {
    /// The agent's GPU settings.
    pub fn settings(&self) -> mlp_agent::gpu::GpuSettings {
        use mlp_agent::gpu::GpuMode;
        mlp_agent::gpu::GpuSettings {
            mode: match self.gpus.as_str() {
                "nvml" => GpuMode::Nvml,
                "none" => GpuMode::None,
                _ => GpuMode::Auto,
            },
            nvml_library: self.nvml_library.clone(),
            driver_root: self.nvidia_driver_root.clone(),
            dev_dir: self.nvidia_dev_dir.clone(),
            ignored_xids: self.ignore_xids.clone(),
            mps_control: self.mps_control.clone(),
            mps_dir: self.mps_dir.clone(),
            mig_minors: self.nvidia_mig_minors.clone(),
            health_file: None,
        }
    }
}

// The cluster overlay on the servers (docs/ARCHITECTURE.md, "Network model"): where node
// subnets are leased from.
#[derive(Debug, Args, Clone)]
pub struct OverlayArgs {
    /// The cluster's allocation network: every node leases a subnet of it, and allocations on
    /// different nodes reach each other inside it without NAT. `none` turns the overlay off
    /// (agents then use their own --network-subnet).
    #[arg(long, default_value = "172.26.0.0/16")]
    pub network_cluster_cidr: String,
    /// Prefix length of each node's subnet (24: 253 allocation addresses per node).
    #[arg(long, default_value_t = 24)]
    pub network_node_prefix: u8,
}

impl OverlayArgs {
    pub fn pool(&self) -> anyhow::Result<Option<mlp_server::state::OverlayPool>> {
        if self.network_cluster_cidr == "none" {
            return Ok(None);
        }
        let (pool, _) = mlp_server::state::OverlayPool::parse(&self.network_cluster_cidr, self.network_node_prefix)
            .map_err(|e| anyhow::anyhow!("--network-cluster-cidr/--network-node-prefix: {e}"))?;
        Ok(Some(pool))
    }
}

// Bridge-mode networking of allocations and this node's end of the overlay
// (docs/ARCHITECTURE.md, "Network model").
#[derive(Debug, Args, Clone)]
pub struct NetworkArgs {
    /// The node bridge bridge-mode allocations hang off (created on demand).
    #[arg(long, default_value = "mlp0")]
    pub network_bridge: String,
    /// A fixed allocation subnet for this node, asked of the servers (registration fails when
    /// another node holds an overlapping one). Default: the subnet the servers lease out of
    /// their --network-cluster-cidr, or 172.26.64.0/20 when the overlay is off.
    #[arg(long)]
    pub network_subnet: Option<String>,
    /// MTU of the bridge, the allocations' veth pairs and the VXLAN device: the underlay's
    /// MTU less VXLAN's 50 bytes.
    #[arg(long, default_value_t = 1450)]
    pub network_mtu: u32,
    /// Dynamic host ports the scheduler picks from on this node: LOW-HIGH.
    #[arg(long, default_value = "20000-32000")]
    pub network_port_range: String,
    /// This node's underlay address, where other nodes send its VXLAN packets (default: the
    /// address in --advertise, else the agent's RPC address).
    #[arg(long)]
    pub network_vtep_addr: Option<String>,
    /// VXLAN network identifier of the overlay (the same on every node).
    #[arg(long, default_value_t = 4242)]
    pub network_vni: u32,
    /// UDP port of the overlay's VXLAN packets (the same on every node).
    #[arg(long, default_value_t = 4789)]
    pub network_vxlan_port: u16,
}

impl NetworkArgs {
    pub fn settings(&self) -> anyhow::Result<mlp_agent::network::NetworkSettings> {
        let fixed = match &self.network_subnet {
            Some(s) => Some(mlp_agent::network::Subnet::parse(s).map_err(|e| anyhow::anyhow!("--network-subnet: {e}"))?),
            None => None,
        };
        let (lo, hi) = self
            .network_port_range
            .split_once('-')
            .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("--network-port-range {:?}: write it as LOW-HIGH, e.g. 20000-32000", self.network_port_range))?;
        let vtep = match &self.network_vtep_addr {
            Some(a) => Some(a.parse().map_err(|_| anyhow::anyhow!("--network-vtep-addr {a:?}: not an IPv4 address"))?),
            None => None,
        };
        let defaults = mlp_agent::network::NetworkSettings::default();
        let settings = mlp_agent::network::NetworkSettings {
            bridge: self.network_bridge.clone(),
            subnet: fixed.unwrap_or(defaults.subnet),
            fixed_subnet: fixed.is_some(),
            mtu: self.network_mtu,
            min_dynamic_port: lo,
            max_dynamic_port: hi,
            vtep_addr: vtep,
            vni: self.network_vni,
            vxlan_port: self.network_vxlan_port,
            cluster_cidr: None,
        };
        settings.check().map_err(|e| anyhow::anyhow!("--network-*: {e}"))?;
        Ok(settings)
    }
}

// How the `exec` driver isolates tasks (docs/security.md).
#[derive(Debug, Args, Clone)]
pub struct ExecIsolationArgs {
    /// User an `exec` task runs as when its spec names none [default: nobody].
    #[arg(long)]
    pub exec_default_user: Option<String>,
    /// Users `exec` tasks may not run as, comma separated ("" refuses none) [default: root].
    #[arg(long, value_delimiter = ',')]
    pub exec_refused_users: Option<Vec<String>>,
    /// pids limit of an `exec` task whose resources set none [default: 4096].
    #[arg(long)]
    pub exec_default_pids: Option<u64>,
    /// pids limit of all `exec` tasks of this node together (unset: none).
    #[arg(long)]
    pub exec_pids_max: Option<u64>,
    /// Host path to bind read-only into every task root at the same path; repeatable.
    #[arg(long)]
    pub exec_bind_ro: Vec<PathBuf>,
    /// Host path of the default task root (under /bin /sbin /lib* /usr, /etc/ssl /etc/pki
    /// /etc/ca-certificates /etc/alternatives, or a copied /etc file) to leave out of every
    /// task root; repeatable, e.g. --exec-hide /usr/local.
    #[arg(long)]
    pub exec_hide: Vec<PathBuf>,
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
    /// JSON file of simulated GPUs the built-in agent registers (as `mlp agent --simulated-gpus`).
    #[arg(long, value_name = "FILE")]
    pub simulated_gpus: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub exec: ExecIsolationArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub overlay: OverlayArgs,
    #[command(flatten)]
    pub preemption: PreemptionArgs,
    #[command(flatten)]
    pub gc: GcArgs,
    #[command(flatten)]
    pub mlflow_artifacts: MlflowArtifactArgs,
    #[command(flatten)]
    pub oci: OciArgs,
    #[command(flatten)]
    pub artifacts: ArtifactArgs,
    #[command(flatten)]
    pub tracking: TrackingArgs,
    /// Require ACL tokens (as `mlp server --acl-enabled`; default: the config file's
    /// `acl { enabled }`, else off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub acl_enabled: Option<bool>,
    /// Configuration file: the built-in agent's `client` block (as `mlp agent --config`) and the
    /// `tls` and `acl` blocks (as `mlp server --config`). Flags win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Leave the `raw_exec` driver off. `mlp dev` is a development mode and offers it unless
    /// this flag or the config file (`raw_exec { enabled = false }`) turns it off; `mlp agent`
    /// offers it only when asked.
    #[arg(long)]
    pub disable_raw_exec: bool,
}

// ---- ACLs (issue 15 §2) ----

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum AclCommand {
    /// Create the first management token; works once per cluster. Prints its secret (keep it:
    /// it is shown only now) and accessor id.
    Bootstrap {
        #[arg(long)]
        json: bool,
    },
    /// Manage policies.
    #[command(subcommand)]
    Policy(AclPolicyCommand),
    /// Manage tokens.
    #[command(subcommand)]
    Token(AclTokenCommand),
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum AclPolicyCommand {
    /// Create or replace policy NAME from an HCL file.
    Apply {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List policies.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a policy and its rules.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy (tokens naming it lose what it granted).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum AclTokenCommand {
    /// Create a token with the given policies; prints its secret (shown only now).
    Create {
        /// A policy of the token; repeatable (-policy a -policy b).
        #[arg(long = "policy", required = true, value_name = "NAME")]
        policies: Vec<String>,
        /// Lifetime (`30m`, `1h`, `720h`); none: never expires.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a token by accessor id (none: the caller's own).
    Info {
        accessor_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a token by accessor id.
    Delete { accessor_id: String },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum EventCommand {
    /// Print events as they happen, one JSON batch per line.
    Stream {
        /// Topic to follow: Job, Evaluation, Allocation, Node, Service, Deployment or Namespace, optionally `Topic:key`
        /// (a job, evaluation, allocation or node id, or a service name; an allocation also
        /// matches its job's and node's id). Repeatable; none: every topic.
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Only this namespace (node events always pass); empty: every namespace.
        #[arg(long, default_value = "")]
        namespace: String,
        /// Start after this Raft index (0: from now on).
        #[arg(long, default_value_t = 0)]
        index: u64,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum JobCommand {
    /// Register a job from a spec file and follow its placement.
    Run {
        file: PathBuf,
        /// Return right after registration.
        #[arg(long, conflicts_with = "wait")]
        detach: bool,
        /// Follow the job to its end and exit with its task's exit code (like `srun`).
        #[arg(long)]
        wait: bool,
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
    /// Show a job's versions, each with what changed from the one before.
    History {
        name: String,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Register an older version's spec as the job's next version (no canaries).
    Revert {
        name: String,
        /// The version whose spec to register again.
        #[arg(value_name = "VERSION")]
        to_version: u64,
        /// Refuse unless the job is at this version now.
        #[arg(long)]
        enforce_prior_version: Option<u64>,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Restart a job's allocations, rolling as each group's `update` block says (a new version
    /// whose groups carry a new `mlp.restart` meta value).
    Restart {
        name: String,
        /// Only these groups (repeatable; default: all).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Set a group's count (a new version that replaces nothing).
    Scale {
        name: String,
        group: String,
        count: u32,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Start a child of a parameterized job with a payload and meta.
    Dispatch(crate::jobtypes::DispatchArgs),
    /// Periodic jobs: launch one now.
    #[command(subcommand)]
    Periodic(crate::jobtypes::PeriodicCommand),
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum DeploymentCommand {
    /// List deployments (newest first).
    List {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a deployment: per group progress, and its allocations' health.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Promote the canaries (of the named groups; all groups when none is named).
    Promote {
        id: String,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Pause a running deployment: no more replacements until resumed.
    Pause { id: String },
    /// Resume a paused deployment.
    Resume { id: String },
    /// Fail a deployment (with auto_revert, the job goes back to its latest stable version).
    Fail { id: String },
    /// Mark allocations of a deployment healthy or unhealthy (health_check = "manual").
    AllocHealth {
        id: String,
        #[arg(long = "healthy")]
        healthy: Vec<String>,
        #[arg(long = "unhealthy")]
        unhealthy: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
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
    /// Run a command inside a running task (its namespaces, root, cgroup and user), with
    /// stdin/stdout/stderr streamed; exits with the command's exit code.
    #[command(after_help = "Example: mlp alloc exec -t 3f2a -- /bin/sh")]
    Exec {
        /// Allocate a pseudo-terminal (the local terminal goes into raw mode).
        #[arg(short = 't', long)]
        tty: bool,
        /// Forward stdin to the command (`-i=false` gives it an empty stdin).
        #[arg(short = 'i', long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        interactive: bool,
        /// Task name (optional when the group has one task).
        #[arg(long)]
        task: Option<String>,
        /// Allocation id or unique prefix.
        id: String,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum NodeCommand {
    /// List nodes, or show one.
    Status {
        /// Node id, unique prefix or name.
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Drain a node: mark it ineligible, then move its allocations elsewhere, at most
    /// `migrate { max_parallel }` of a group at a time; the node stays ineligible afterwards.
    Drain {
        /// Node id, unique prefix or name.
        id: String,
        /// Start the drain (the default).
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Cancel a drain; the node becomes eligible again.
        #[arg(long)]
        disable: bool,
        /// Stop whatever is left after this long (e.g. 30m, 1h); 0 = no deadline.
        #[arg(long, default_value = "1h")]
        deadline: String,
        /// Leave system and sysbatch jobs' allocations running on the node (without it the
        /// drain stops them too); the drain is done once everything else has left.
        #[arg(long)]
        ignore_system: bool,
        /// Return once the drain started instead of following it to the end.
        #[arg(long)]
        detach: bool,
    },
    /// Mark a node eligible or ineligible for new placements (running work stays).
    Eligibility {
        /// Node id, unique prefix or name.
        id: String,
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ServiceCommand {
    /// List services with their instance counts.
    List {
        /// Only this namespace (default: every namespace).
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a service's instances: allocation, address, health, last check output.
    Info {
        /// Service name.
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Passing instances only.
        #[arg(long)]
        passing: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum RunCommand {
    /// List runs, newest first.
    List {
        /// Only this experiment (name or id).
        #[arg(long, default_value = "")]
        experiment: String,
        /// MLflow's filter grammar, e.g. "metrics.loss < 0.1 and tags.`mlp.job` = 'train'".
        #[arg(long, default_value = "")]
        filter: String,
        /// At most this many runs.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
        /// The namespace (its MLflow workspace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Show a run: status, params, latest metrics, tags (the mlp.* lineage included).
    Show {
        run_id: String,
        #[arg(long)]
        json: bool,
        /// The namespace (its MLflow workspace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ModelCommand {
    /// List registered models.
    List {
        /// MLflow's filter grammar, e.g. "name LIKE 'resnet%'".
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long)]
        json: bool,
        /// The namespace (its MLflow workspace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Show a model: aliases and versions with the run each came from.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        /// The namespace (its MLflow workspace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Point an alias (e.g. `champion`) at a version.
    Alias {
        name: String,
        alias: String,
        #[arg(value_name = "VERSION")]
        model_version: u64,
        /// The namespace (its MLflow workspace).
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

// The agent's DNS responder (issue 13 §3).
#[derive(Debug, Args, Clone)]
pub struct DnsArgs {
    /// Where the DNS responder forwards names outside service.mlp (IP or IP:PORT, repeatable;
    /// default: the name servers of /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    pub dns_upstreams: Vec<String>,
}

impl DnsArgs {
    pub fn upstreams(&self) -> anyhow::Result<Vec<std::net::SocketAddr>> {
        self.dns_upstreams
            .iter()
            .map(|s| {
                s.parse::<std::net::SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                    .map_err(|_| anyhow::anyhow!("--dns-upstream {s:?}: write it as IP or IP:PORT"))
            })
            .collect()
    }
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum EvalCommand {
    /// Show one evaluation, or list them.
    Status {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum SystemCommand {
    /// Collect garbage now: terminal evaluations and allocations the scheduler no longer
    /// needs, dead jobs with everything of theirs, down nodes without allocations, whatever
    /// their age. Prints what was removed.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

// ---- high availability (issue 5) ----

// Raft timing; shorter timeouts fail over faster but need a responsive network and disks.
//
// An openraft 0.9 follower calls an election only after hearing nothing from the leader for
// the leader lease (= the maximum election timeout) *plus* its own election timeout, so the
// defaults (100 ms heartbeats, 250–500 ms) give 0.75–1 s of silence, seven to ten missed
// heartbeats, before an election: a CLI write is acknowledged about 1 s after the leader dies
// (docs/benchmarks.md), while a short stall stays far from a spurious election. A lost vote
// (split, or a candidate with a shorter log, which also waits 2 × the maximum) costs another
// 250–500 ms. openraft times an AppendEntries out after one heartbeat interval: keep the
// heartbeat above the disk's worst fsync (the multi-host tests run 100 ms on a shared 2-core
// machine; 50 ms was too short there).
#[derive(Debug, Clone, Args)]
pub struct RaftTimingArgs {
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub raft_heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub raft_election_min_ms: u64,
    /// Upper bound of the randomized election timeout in milliseconds (also openraft's leader
    /// lease, which a follower waits out first).
    #[arg(long, default_value_t = 500)]
    pub raft_election_max_ms: u64,
    /// Build a state snapshot (and compact the log) after this many log entries.
    #[arg(long, default_value_t = 5000)]
    pub raft_snapshot_logs: u64,
    /// Log entries kept behind a snapshot, so a slightly lagging follower catches up from the
    /// log; one further behind (or a new server) gets the snapshot.
    #[arg(long, default_value_t = 1000)]
    pub raft_keep_logs: u64,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ServerAction {
    /// List the servers of the cluster: id, address, voter, leader.
    Members {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum OperatorCommand {
    /// Raft membership and leadership.
    #[command(subcommand)]
    Raft(RaftCommand),
    /// Save the cluster state to a file (with a checksum), or check such a file.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum SnapshotCommand {
    /// Save the cluster state, as of a linearizable read on the leader, to FILE.
    Save { file: PathBuf },
    /// Replace the whole cluster state with FILE (disaster recovery). FILE's checksum is
    /// verified first; a corrupt file is refused and nothing changes.
    Restore { file: PathBuf },
    /// Verify FILE's checksum and summarize what it holds; talks to no server.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum RaftCommand {
    /// List the Raft peers with their replication progress.
    ListPeers {
        #[arg(long)]
        json: bool,
    },
    /// Remove a server from the cluster by node id.
    RemovePeer {
        /// The server's Raft node id (see list-peers).
        id: u64,
    },
    /// Make another server the leader.
    TransferLeadership {
        /// Node id of the new leader (default: the most up-to-date other voter).
        id: Option<u64>,
    },
}

// ---- end high availability ----

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

// `mlp sim`: see docs/scheduler.md.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Node list CSV (`sn,cpu_milli,memory_mib,gpu,model`).
    #[arg(long)]
    pub nodes: PathBuf,
    /// Pod list CSV (`name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,…]`).
    #[arg(long)]
    pub pods: PathBuf,
    /// Arrived GPU demand at the end, as a multiple of the cluster's GPUs.
    #[arg(long, default_value_t = 1.3)]
    pub inflate: f64,
    /// How many seeds to run (seeds FIRST..FIRST+N-1).
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Policies to compare: mlp (the server's default), fgd, best-fit, gpu-packing, or all;
    /// comma separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = "mlp")]
    pub policy: Vec<String>,
    /// Also run each workload-aware policy (fgd, mlp) with the server's rule: plan for the
    /// learned workload of the pods arrived so far (no foresight), next to the trace's whole pod
    /// mix known in advance (the paper's method).
    #[arg(long)]
    pub online: bool,
    /// Print JSON (one object per policy and workload rule; an array when several).
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its whole command tree only in debug builds and only for the subcommand
    /// being parsed: a clash (two arguments named alike, e.g. one named `version`) would panic
    /// the first user who types that subcommand. This walks every subcommand.
    #[test]
    fn the_command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Subcommands are deferred, so an `Args` struct's own doc comment would become the about
    /// text of the command it belongs to (`mlp server --help` said "Garbage collection …" once):
    /// no `///` directly above an `Args` derive in the CLI's sources.
    #[test]
    fn no_args_struct_has_a_doc_comment() {
        let sources = [
            ("cli.rs", include_str!("cli.rs")),
            ("jobtypes.rs", include_str!("jobtypes.rs")),
            ("namespace.rs", include_str!("namespace.rs")),
        ];
        let mut found = Vec::new();
        for (name, text) in sources {
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let t = line.trim_start();
                if !(t.starts_with("#[derive(") && t.contains("Args") && !t.contains("Subcommand")) {
                    continue;
                }
                let above = lines[..i].iter().rev().map(|l| l.trim_start()).find(|l| !l.starts_with("#["));
                if above.is_some_and(|l| l.starts_with("///")) {
                    found.push(format!("{name}:{}", i + 1));
                }
            }
        }
        assert!(found.is_empty(), "doc comments on Args structs (use `//`): {found:?}");
        // And the about text the top level declares is what `--help` shows.
        let mut cmd = super::Cli::command();
        cmd.build();
        let server = cmd.find_subcommand("server").and_then(|c| c.get_about()).map(|a| a.to_string());
        assert_eq!(server.as_deref(), Some("Run a server (Raft member, scheduler, API)"));
    }
}
