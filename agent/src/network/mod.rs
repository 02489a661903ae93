//! Bridge-mode networking of allocations (issue 13 §1): every allocation of a group with
//! `network { mode = "bridge" }` gets its own network namespace, shared by its tasks, on a veth
//! pair to the node's bridge, an address out of the node's subnet, a default route through the
//! bridge, and its ports mapped host → allocation by nftables DNAT; egress is masqueraded.
//!
//! * `netns.rs`: persistent namespaces (a bind mount of the namespace's nsfs file under
//!   `<data-dir>/netns/`), created on a dedicated thread that never returns to a pool.
//! * `links.rs`: the bridge, veth pairs, addresses and routes over netlink (`rtnetlink`).
//! * `nft.rs`: the one nftables table the agent owns (`ip mlp`), through the `nftables` crate.
//!
//! What an allocation got is persisted in `<data-dir>/network/<alloc>.json` *before* anything
//! is created, so a crash half-way leaves a record that the next start removes; a restarted
//! agent finds the record of a running allocation and reattaches to its namespace untouched.
//! Everything is removed when the allocation ends ([`NetworkManager::teardown`], also on the
//! garbage collection of its directory) and, on agent start, for every record, namespace, veth
//! on the bridge or port mapping whose allocation is not running any more
//! ([`NetworkManager::remove_leftovers`]). The bridge, its address and the table's base chains
//! stay (they are shared by all allocations and cost nothing idle).
//!
//! The subnet is the one the servers leased to the node (`apply_lease`, at registration), or
//! `--network-subnet` when they run no overlay; `overlay.rs` routes to the other nodes' subnets
//! through a VXLAN device (issue 13 §2). The resolver
//! written into `/etc/resolv.conf` is the agent's DNS responder on the bridge's gateway (§3,
//! `services/dns.rs`), which forwards names outside `service.mlp` to the host's resolvers.

pub mod links;
pub mod netns;
pub mod nft;
pub mod overlay;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use mlp_proto::v1::{AllocatedPort, GangRendezvous};
use serde::{Deserialize, Serialize};

/// Errors setting up or removing an allocation's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A netlink request failed.
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// An nftables request failed.
    #[error("nftables: {what}: {message}")]
    Nft {
        /// What was being done.
        what: String,
        /// What `nft` said.
        message: String,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The node's subnet has no free address left.
    #[error("no free address left in {0}")]
    SubnetFull(String),
    /// A setting is unusable.
    #[error("invalid network setting: {0}")]
    Setting(String),
}

impl NetworkError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
        let what = what.into();
        move |source| NetworkError::Io { what, source }
    }
}

/// An IPv4 subnet: its network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Subnet {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// Prefix length, 8..=30.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N` (host bits must be zero; N in 8..=30, so there are hosts to hand out).
    pub fn parse(s: &str) -> Result<Subnet, NetworkError> {
        let bad = |why: &str| NetworkError::Setting(format!("subnet {s:?}: {why}; write it as 172.26.64.0/20"));
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("missing /prefix"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("the prefix is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("the prefix must be between 8 and 30"));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The bridge's address: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses handed to allocations: every host but the gateway, lowest first.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !self.mask();
        (first..broadcast).map(Ipv4Addr::from)
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The agent's network settings (`mlp agent --network-*` flags).
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// The node bridge (created on demand).
    pub bridge: String,
    /// The node's allocation subnet; the bridge gets its first host. Replaced by the subnet
    /// the servers lease when they run the overlay.
    pub subnet: Subnet,
    /// `subnet` was given (`--network-subnet`): the node asks the servers for exactly it.
    pub fixed_subnet: bool,
    /// MTU of the bridge, the veth pairs and the VXLAN device.
    pub mtu: u32,
    /// The range the scheduler picks dynamic host ports from (reported in `NodeResources`).
    pub min_dynamic_port: u32,
    /// Inclusive upper end of that range.
    pub max_dynamic_port: u32,
    /// The node's underlay address for VXLAN; `None`: the node's advertised address.
    pub vtep_addr: Option<Ipv4Addr>,
    /// The overlay's VXLAN network identifier.
    pub vni: u32,
    /// The overlay's UDP port.
    pub vxlan_port: u16,
    /// The servers' cluster CIDR, once registered with servers that run the overlay.
    pub cluster_cidr: Option<Subnet>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            bridge: "mlp0".into(),
            subnet: Subnet { network: Ipv4Addr::new(172, 26, 64, 0), prefix: 20 },
            fixed_subnet: false,
            mtu: 1450,
            min_dynamic_port: 20_000,
            max_dynamic_port: 32_000,
            vtep_addr: None,
            vni: 4242,
            vxlan_port: 4789,
            cluster_cidr: None,
        }
    }
}

impl NetworkSettings {
    /// The nftables table this agent owns: `mlp` for the default bridge, `mlp_<bridge>` for
    /// another (so that several agents on one machine, as in tests, never share a table).
    pub fn table(&self) -> String {
        if self.bridge == "mlp0" {
            "mlp".into()
        } else {
            format!("mlp_{}", self.bridge.replace(['-', '.'], "_"))
        }
    }

    /// The overlay's VXLAN device: the bridge's name (at most 13 bytes of it) and `vx`.
    pub fn vxlan(&self) -> String {
        let b: String = self.bridge.chars().take(13).collect();
        format!("{b}vx")
    }

    /// Checks the settings (the bridge name is an interface name, the MTU and ports sane).
    pub fn check(&self) -> Result<(), NetworkError> {
        if self.vni == 0 || self.vni >= 1 << 24 {
            return Err(NetworkError::Setting(format!("vni {} must be between 1 and 16777215", self.vni)));
        }
        if self.vxlan_port == 0 {
            return Err(NetworkError::Setting("the VXLAN port must not be 0".into()));
        }
        let b = &self.bridge;
        if b.is_empty() || b.len() > 15 || !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.') {
            return Err(NetworkError::Setting(format!("bridge name {b:?}: 1-15 characters of A-Z, a-z, 0-9, - _ .")));
        }
        if !(576..=65_535).contains(&self.mtu) {
            return Err(NetworkError::Setting(format!("mtu {} must be between 576 and 65535", self.mtu)));
        }
        if self.min_dynamic_port == 0 || self.max_dynamic_port > 65_535 || self.min_dynamic_port > self.max_dynamic_port {
            return Err(NetworkError::Setting(format!(
                "dynamic port range {}-{} must lie within 1-65535, lowest first",
                self.min_dynamic_port, self.max_dynamic_port
            )));
        }
        Ok(())
    }
}

/// One allocation's network, as persisted (`<data-dir>/network/<alloc>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocNetwork {
    /// The allocation.
    pub alloc_id: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The bridge's address, its default route.
    pub gateway: Ipv4Addr,
    /// The host end of its veth pair (the other end is `eth0` inside).
    pub host_veth: String,
    /// Its namespace's bind mount.
    pub netns: PathBuf,
    /// Host port → allocation port mappings.
    pub ports: Vec<AllocatedPort>,
    /// The allocation's namespace (its traffic's isolation tag, `nft::namespace_tag`).
    #[serde(default)]
    pub namespace: String,
}

/// What a task of a bridge-mode allocation needs from its network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskNetwork {
    /// The allocation's namespace, joined by the task (exec: its init; raw_exec: its supervisor).
    pub netns: PathBuf,
    /// The task root's `/etc/hosts`.
    pub hosts: String,
    /// The task root's `/etc/resolv.conf`.
    pub resolv_conf: String,
}

impl AllocNetwork {
    /// The task's view: namespace, `/etc/hosts` (its hostname on its address), and the agent's
    /// DNS responder on the gateway as its resolver.
    pub fn task_network(&self, hostname: &str) -> TaskNetwork {
        TaskNetwork {
            netns: self.netns.clone(),
            hosts: format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{hostname}\n", self.ip),
            resolv_conf: dns_resolv_conf(self.gateway),
        }
    }
}

/// A bridge-mode task's `/etc/resolv.conf`: the agent's DNS responder on the bridge's gateway
/// (services/dns.rs), which answers `*.service.mlp` and forwards every other name.
pub fn dns_resolv_conf(gateway: Ipv4Addr) -> String {
    format!("nameserver {gateway}\nsearch service.mlp\noptions ndots:1\n")
}

/// The environment a task gets from its allocation's ports (`MLP_IP_<label>`,
/// `MLP_PORT_<label>`, `MLP_HOST_PORT_<label>`, `MLP_ADDR_<label>`): in bridge mode the
/// allocation's address and the port inside it, in host mode the node's address and the host
/// port (they are the same port there).
pub fn port_env(ports: &[AllocatedPort], ip: &str, bridge: bool) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for p in ports {
        let inside = if bridge { p.to } else { p.host_port };
        env.insert(format!("MLP_IP_{}", p.label), ip.to_string());
        env.insert(format!("MLP_PORT_{}", p.label), inside.to_string());
        env.insert(format!("MLP_HOST_PORT_{}", p.label), p.host_port.to_string());
        env.insert(format!("MLP_ADDR_{}", p.label), format!("{ip}:{inside}"));
    }
    env
}

/// The rendezvous environment of a gang member (issue 13 §4), PyTorch's `env://` included.
/// `leader` is where rank 0 is reached from this allocation: its own resolution (the leader's
/// allocation address on this node in bridge mode) or the servers' (`leader_ip:leader_port`).
pub fn rendezvous_env(rv: &GangRendezvous, leader: (String, u32)) -> BTreeMap<String, String> {
    let (ip, port) = leader;
    let mut env = BTreeMap::new();
    env.insert("MLP_GANG_RANK".into(), rv.rank.to_string());
    env.insert("MLP_GANG_SIZE".into(), rv.size.to_string());
    env.insert("MLP_GANG_LEADER_ADDR".into(), format!("{ip}:{port}"));
    env.insert("MASTER_ADDR".into(), ip);
    env.insert("MASTER_PORT".into(), port.to_string());
    env.insert("RANK".into(), rv.rank.to_string());
    env.insert("WORLD_SIZE".into(), rv.size.to_string());
    env
}

/// The host end of an allocation's veth pair: `mv` and 13 hex digits of a hash of its id
/// (interface names have at most 15 bytes).
pub fn host_veth_name(alloc_id: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in alloc_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mv{:013x}", h & 0x000f_ffff_ffff_ffff)
}

/// Owns the node's allocation networks: addresses in use, set-up, removal, leftovers, and the
/// node's end of the overlay.
pub struct NetworkManager {
    /// The settings, with the leased subnet and the cluster CIDR once registered.
    settings: std::sync::RwLock<NetworkSettings>,
    /// The overlay's peers as the servers last sent them, and what is programmed.
    overlay: tokio::sync::Mutex<overlay::OverlayState>,
    state_dir: PathBuf,
    netns_dir: PathBuf,
    /// Addresses in use by allocation id (also those being set up).
    used: Mutex<BTreeMap<String, Ipv4Addr>>,
    /// The bridge and the table exist (made once per agent run, on the first set-up).
    node_ready: tokio::sync::OnceCell<()>,
}

impl NetworkManager {
    /// A manager keeping its records under `data_dir`; nothing is created until a set-up.
    pub fn new(settings: NetworkSettings, data_dir: &Path) -> NetworkManager {
        NetworkManager {
            settings: std::sync::RwLock::new(settings),
            overlay: tokio::sync::Mutex::new(overlay::OverlayState::default()),
            state_dir: data_dir.join("network"),
            netns_dir: data_dir.join("netns"),
            used: Mutex::new(BTreeMap::new()),
            node_ready: tokio::sync::OnceCell::new(),
        }
    }

    /// The settings (with the leased subnet once registered).
    pub fn settings(&self) -> NetworkSettings {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Registration: the subnet the servers leased to this node (`None`: they lease none, the
    /// overlay is off, and the configured subnet stays) and their cluster CIDR.
    pub fn apply_lease(&self, subnet: Option<Subnet>, cluster_cidr: Option<Subnet>) {
        let mut s = self.settings.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subnet) = subnet {
            if subnet != s.subnet {
                tracing::info!(subnet = %subnet, "allocation subnet leased by the servers");
            }
            s.subnet = subnet;
        }
        s.cluster_cidr = cluster_cidr;
    }

    /// The overlay's peers changed (the servers' stream): program them when this node's
    /// network exists, else keep them for its first set-up.
    pub async fn set_peers(&self, peers: Vec<overlay::Peer>) {
        let settings = self.settings();
        let mut ov = self.overlay.lock().await;
        ov.desired = peers;
        let built = self.node_ready.initialized() || links::exists(&settings.bridge).await.unwrap_or(false);
        if built {
            if let Err(e) = ov.sync(&settings).await {
                tracing::warn!(error = %e, "programming the overlay failed; retried on the next change");
            }
        }
    }

    fn record_path(&self, alloc_id: &str) -> PathBuf {
        self.state_dir.join(format!("{alloc_id}.json"))
    }

    /// The persisted network of `alloc_id`, if any.
    pub fn load(&self, alloc_id: &str) -> Option<AllocNetwork> {
        let bytes = std::fs::read(self.record_path(alloc_id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, net: &AllocNetwork) -> Result<(), NetworkError> {
        std::fs::create_dir_all(&self.state_dir).map_err(NetworkError::io(format!("creating {}", self.state_dir.display())))?;
        let path = self.record_path(&net.alloc_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(net)
            .map_err(|e| NetworkError::Io { what: "encoding the network record".into(), source: e.into() })?;
        std::fs::write(&tmp, bytes).map_err(NetworkError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(NetworkError::io(format!("renaming {}", tmp.display())))
    }

    /// Every persisted record.
    fn records(&self) -> Vec<AllocNetwork> {
        let Ok(rd) = std::fs::read_dir(&self.state_dir) else { return Vec::new() };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<AllocNetwork>(&b).ok())
            .collect()
    }

    async fn node_ready(&self) -> Result<(), NetworkError> {
        self.node_ready
            .get_or_try_init(|| async {
                let settings = self.settings();
                links::ensure_bridge(&settings).await?;
                links::enable_forwarding(&settings.bridge)?;
                let s = settings.clone();
                blocking(move || nft::ensure_table(&s)).await?;
                // The overlay's routes to the peers known so far (none yet on a fresh cluster).
                let mut ov = self.overlay.lock().await;
                if let Err(e) = ov.sync(&settings).await {
                    tracing::warn!(error = %e, "programming the overlay failed; retried on the next change");
                }
                Ok::<(), NetworkError>(())
            })
            .await
            .map(|_| ())
    }

    /// Sets up `alloc_id`'s network, or returns the one a previous agent run set up (untouched).
    /// Returns the network and how long the set-up took (zero for a reattach).
    pub async fn setup(
        &self,
        alloc_id: &str,
        namespace: &str,
        ports: &[AllocatedPort],
    ) -> Result<(AllocNetwork, std::time::Duration), NetworkError> {
        if let Some(net) = self.load(alloc_id) {
            if netns::exists(&net.netns) {
                self.lock_used().insert(alloc_id.to_string(), net.ip);
                tracing::debug!(alloc = %alloc_id, ip = %net.ip, "reattached to the allocation's network");
                return Ok((net, std::time::Duration::ZERO));
            }
            // A record whose namespace is gone (a reboot): remove what it names, set up anew.
            self.teardown(alloc_id).await;
        }
        let began = Instant::now();
        self.node_ready().await?;
        let settings = self.settings();
        let ip = {
            let mut used = self.lock_used();
            let taken: BTreeSet<Ipv4Addr> = used.iter().filter(|(id, _)| *id != alloc_id).map(|(_, ip)| *ip).collect();
            let ip = settings
                .subnet
                .hosts()
                .find(|ip| !taken.contains(ip))
                .ok_or_else(|| NetworkError::SubnetFull(settings.subnet.to_string()))?;
            used.insert(alloc_id.to_string(), ip);
            ip
        };
        let net = AllocNetwork {
            alloc_id: alloc_id.to_string(),
            ip,
            prefix: settings.subnet.prefix,
            gateway: settings.subnet.gateway(),
            host_veth: host_veth_name(alloc_id),
            netns: self.netns_dir.join(alloc_id),
            ports: ports.to_vec(),
            namespace: namespace.to_string(),
        };
        // Recorded first: a crash from here on leaves something the next start can remove.
        let made = async {
            self.save(&net)?;
            std::fs::create_dir_all(&self.netns_dir).map_err(NetworkError::io(format!("creating {}", self.netns_dir.display())))?;
            links::create_alloc_links(&settings, &net).await?;
            let (settings, n) = (settings.clone(), net.clone());
            blocking(move || nft::add_alloc(&settings, &n)).await?;
            Ok::<(), NetworkError>(())
        };
        if let Err(e) = made.await {
            tracing::warn!(alloc = %alloc_id, error = %e, "network set-up failed; removing what was made");
            self.teardown(alloc_id).await;
            return Err(e);
        }
        let took = began.elapsed();
        tracing::info!(alloc = %alloc_id, ip = %ip, veth = %net.host_veth, ports = net.ports.len(), took_us = took.as_micros() as u64, "allocation network set up");
        Ok((net, took))
    }

    fn lock_used(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes everything of `alloc_id`'s network (port mappings, veth pair, namespace, record);
    /// a no-op when it has none. Failures are logged; what remains is removed on the next start.
    pub async fn teardown(&self, alloc_id: &str) {
        let Some(net) = self.load(alloc_id) else {
            self.lock_used().remove(alloc_id);
            return;
        };
        let (settings, n) = (self.settings(), net.clone());
        if let Err(e) = blocking(move || nft::remove_alloc(&settings, &n)).await {
            tracing::warn!(alloc = %alloc_id, error = %e, "removing the allocation's rules failed");
        }
        if let Err(e) = links::delete_link(&net.host_veth).await {
            tracing::warn!(alloc = %alloc_id, error = %e, "removing the veth pair failed");
        }
        if let Err(e) = netns::remove(&net.netns) {
            tracing::warn!(alloc = %alloc_id, error = %e, "removing the network namespace failed");
        }
        let _ = std::fs::remove_file(self.record_path(alloc_id));
        self.lock_used().remove(alloc_id);
        tracing::info!(alloc = %alloc_id, ip = %net.ip, "allocation network removed");
    }

    /// Agent start: keeps the networks of the allocations in `keep` (reattached or to be
    /// started again) and removes everything else this agent made: records and their
    /// namespaces, veths and mappings; namespaces without a record; veths on the bridge and
    /// port mappings to addresses that no kept allocation holds.
    pub async fn remove_leftovers(&self, keep: &BTreeSet<String>) {
        let mut kept_ips = BTreeSet::new();
        let mut kept_veths = BTreeSet::new();
        for net in self.records() {
            if keep.contains(&net.alloc_id) && netns::exists(&net.netns) {
                self.lock_used().insert(net.alloc_id.clone(), net.ip);
                kept_ips.insert(net.ip);
                kept_veths.insert(net.host_veth.clone());
            } else {
                tracing::info!(alloc = %net.alloc_id, "removing the network of an allocation that is gone");
                self.teardown(&net.alloc_id).await;
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.netns_dir) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&id) || self.load(&id).is_none() {
                    if let Err(err) = netns::remove(&e.path()) {
                        tracing::warn!(netns = %e.path().display(), error = %err, "removing a leftover namespace failed");
                    }
                }
            }
        }
        let settings = self.settings();
        match links::bridge_ports(&settings.bridge).await {
            Ok(ports) => {
                for name in ports.into_iter().filter(|n| n.starts_with("mv") && !kept_veths.contains(n)) {
                    tracing::info!(veth = %name, "removing a leftover veth");
                    if let Err(e) = links::delete_link(&name).await {
                        tracing::warn!(veth = %name, error = %e, "removing a leftover veth failed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "no bridge to clean"),
        }
        let kept: BTreeSet<String> = self.lock_used().keys().cloned().collect();
        let s = settings.clone();
        if let Err(e) = blocking(move || nft::remove_isolation_except(&s, &kept)).await {
            tracing::debug!(error = %e, "no isolation rules to clean");
        }
        if let Err(e) = blocking(move || nft::remove_ports_except(&settings, &kept_ips)).await {
            tracing::debug!(error = %e, "no port mappings to clean");
        }
    }

    /// Where rank 0 of a gang is reached from this node: the leader allocation's own address
    /// and first port when it runs here in bridge mode (waiting up to `wait` for its network),
    /// else the servers' answer (its node's address and host port).
    pub async fn leader_of(&self, rv: &GangRendezvous, wait: std::time::Duration) -> (String, u32) {
        let servers = (rv.leader_ip.clone(), rv.leader_port);
        let deadline = Instant::now() + wait;
        loop {
            if let Some(net) = self.load(&rv.leader_alloc_id) {
                let port = net.ports.first().map_or(rv.leader_port, |p| p.to);
                return (net.ip.to_string(), port);
            }
            if Instant::now() >= deadline {
                return servers;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Runs blocking work (an `nft` process) off the runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, NetworkError> + Send + 'static) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetworkError::Io { what: "network worker".into(), source: std::io::Error::other(e.to_string()) })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_hand_out_hosts_after_the_gateway() -> Result<(), NetworkError> {
        let s = Subnet::parse("172.26.64.0/20")?;
        assert_eq!(s.gateway(), Ipv4Addr::new(172, 26, 64, 1));
        let hosts: Vec<_> = s.hosts().take(2).collect();
        assert_eq!(hosts, [Ipv4Addr::new(172, 26, 64, 2), Ipv4Addr::new(172, 26, 64, 3)]);
        assert_eq!(s.hosts().count(), 4096 - 3);
        assert!(s.contains(Ipv4Addr::new(172, 26, 79, 255)) && !s.contains(Ipv4Addr::new(172, 26, 80, 0)));
        for bad in ["172.26.64.1/20", "172.26.64.0", "x/20", "10.0.0.0/31", "10.0.0.0/x"] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn port_and_rendezvous_variables() {
        let ports = [AllocatedPort { label: "http".into(), host_port: 20_001, to: 8080 }];
        let env = port_env(&ports, "172.26.64.2", true);
        assert_eq!(env["MLP_ADDR_http"], "172.26.64.2:8080");
        assert_eq!(env["MLP_HOST_PORT_http"], "20001");
        let env = port_env(&ports, "10.0.0.1", false);
        assert_eq!(env["MLP_PORT_http"], "20001");
        let rv = GangRendezvous { rank: 2, size: 4, ..Default::default() };
        let env = rendezvous_env(&rv, ("10.0.0.1".into(), 29_500));
        assert_eq!((env["RANK"].as_str(), env["WORLD_SIZE"].as_str(), env["MASTER_PORT"].as_str()), ("2", "4", "29500"));
        assert_eq!(env["MLP_GANG_LEADER_ADDR"], "10.0.0.1:29500");
    }

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name("0a1b2c3d-0000-0000-0000-000000000001");
        let b = host_veth_name("0a1b2c3d-0000-0000-0000-000000000002");
        assert_eq!(a.len(), 15);
        assert_ne!(a, b);
        assert!(NetworkSettings { bridge: "a-very-long-bridge".into(), ..Default::default() }.check().is_err());
        assert_eq!(NetworkSettings::default().table(), "mlp");
    }
}
