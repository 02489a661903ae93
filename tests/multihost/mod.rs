//! Multi-host test harness: every "host" is a network namespace the test creates, joined by a
//! veth pair to a bridge that lives in another namespace the test creates. Hosts get addresses
//! from 198.18.0.0/15 (reserved for benchmark networks), so nothing can leak to or collide with
//! a real network. mlp servers, agents and CLI calls run as real processes inside the hosts
//! (`ip netns exec`).
//!
//! Faults: kill -9, SIGSTOP/SIGCONT, link down/up (partition), packet loss with nftables
//! (`numgen random mod 100 < N drop`), bandwidth limits with `tc tbf`.
//!
//! Everything is torn down by guards, also when a test panics: [`Net`] kills its processes,
//! deletes its namespaces and removes its temp dir on drop. Namespace names carry the test
//! process id and a counter, so tests can run in parallel (nextest runs each test in its own
//! process). Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use prereq::mlp;

static NET_COUNTER: AtomicUsize = AtomicUsize::new(0);

// Both also loaded by the single-host harness in tests that use both (`ha_ops`).
#[allow(clippy::duplicate_mod)]
#[path = "../common/pinned.rs"]
mod pinned;
#[allow(clippy::duplicate_mod)]
#[path = "../prereq/mod.rs"]
pub mod prereq;

/// Whether this machine lets us create network namespaces (root, `ip` present), for the
/// benchmarks; tests call [`require_netns`], which fails with what is missing instead.
pub fn available() -> bool {
    let probe = format!("mlpprobe-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &probe]).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    }
    ok
}

/// What every multi-host test needs (root, iproute2, network namespaces) plus `extra`; see
/// [`prereq::require`]: fails the test with what is missing, or returns `false` (skip) only
/// under `MLP_TEST_ALLOW_SKIP=1`.
pub fn require_netns(extra: &[prereq::Need]) -> bool {
    let mut needs = vec![prereq::Need::Root, prereq::Need::NetNs];
    needs.extend_from_slice(extra);
    prereq::require(&needs)
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One host: a network namespace with `eth0` on the shared bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// The bridge-side end of this host's veth pair (in the bridge namespace).
    pub port: String,
}

/// A process started inside a host.
pub struct Proc {
    pub name: String,
    pub host: usize,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// A test network: one bridge namespace and any number of hosts. Dropping it kills every
/// process, deletes every namespace and removes the temp dir.
pub struct Net {
    pub id: String,
    pub bridge_ns: String,
    pub hosts: Vec<Host>,
    pub procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
    subnet: u8,
}

impl Net {
    /// A bridge namespace with a bridge `br0`; hosts are added with [`Net::add_host`].
    pub fn new() -> Net {
        let n = NET_COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tempfile::Builder::new().prefix("mlp-multihost-").tempdir().expect("tempdir");
        let bridge_ns = format!("mlpbr-{id}");
        let net = Net { id, bridge_ns: bridge_ns.clone(), hosts: Vec::new(), procs: Vec::new(), dir, subnet: (n % 250) as u8 };
        run(&["ip", "netns", "add", &bridge_ns]);
        run(&["ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &bridge_ns, "link", "set", "br0", "up"]);
        run(&["ip", "-n", &bridge_ns, "link", "set", "lo", "up"]);
        net
    }

    /// Adds a host (its own namespace) at 198.18.<subnet>.<index + 1>/24 and returns its index.
    pub fn add_host(&mut self, name: &str) -> usize {
        let i = self.hosts.len();
        let ns = format!("mlph-{}-{i}", self.id);
        let port = format!("h{i}");
        let ip = format!("198.18.{}.{}", self.subnet, i + 1);
        run(&["ip", "netns", "add", &ns]);
        // Created inside the bridge namespace, so parallel tests never clash on names.
        run(&["ip", "-n", &self.bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        run(&["ip", "-n", &self.bridge_ns, "link", "set", &port, "master", "br0", "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.hosts.push(Host { name: name.to_string(), ns, ip, port });
        i
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts `mlp ARGS` in host `host`; stdout and stderr go to `<dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, host: usize, args: &[String]) -> usize {
        let log = self.path(&format!("{name}.log"));
        let child = self.start_child(host, args, &log);
        self.procs.push(Proc { name: name.to_string(), host, args: args.to_vec(), child: Some(child), log });
        self.procs.len() - 1
    }

    /// Starts a stopped (killed) process again with the same arguments.
    pub fn restart(&mut self, idx: usize) {
        let (host, args, log) = {
            let p = &mut self.procs[idx];
            p.kill9();
            (p.host, p.args.clone(), p.log.clone())
        };
        let child = self.start_child(host, &args, &log);
        self.procs[idx].child = Some(child);
    }

    fn start_child(&self, host: usize, args: &[String], log: &Path) -> Child {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = file.try_clone().expect("log file");
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[host].ns, mlp()])
            .args(args)
            .env("MLP_LOG", std::env::var("MLP_TEST_SERVER_LOG").unwrap_or_else(|_| "info,openraft=warn,mlp_server::raft=debug".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn mlp")
    }

    /// Runs `mlp ARGS` to completion in host `host`, killed after `timeout`; `None` on timeout.
    pub fn mlp(&self, host: usize, args: &[&str], timeout: Duration) -> Option<Output> {
        self.client(host).mlp(args, timeout)
    }

    /// A handle for running the CLI in host `host` from another thread.
    pub fn client(&self, host: usize) -> Client {
        Client { ns: self.hosts[host].ns.clone(), dir: self.dir.path().to_path_buf() }
    }

    // ---- faults ----

    /// Cuts (or restores) a host's link at the bridge: a partition of that host.
    pub fn link(&self, host: usize, up: bool) {
        run(&["ip", "-n", &self.bridge_ns, "link", "set", &self.hosts[host].port, if up { "up" } else { "down" }]);
    }

    /// Drops `percent`% of the packets a host receives (nftables in the host's namespace);
    /// `0` removes the rule. Needs the `nft` binary.
    pub fn packet_loss(&self, host: usize, percent: u8) {
        let ns = &self.hosts[host].ns;
        let _ = Command::new("ip").args(["netns", "exec", ns, "nft", "delete", "table", "inet", "mlpfault"]).output();
        if percent == 0 {
            return;
        }
        run(&["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "mlpfault"]);
        run(&["ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "mlpfault", "input", "{ type filter hook input priority 0; }"]);
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "add",
            "rule",
            "inet",
            "mlpfault",
            "input",
            "numgen",
            "random",
            "mod",
            "100",
            "<",
            &percent.to_string(),
            "drop",
        ]);
    }

    /// Limits a host's egress bandwidth with a token bucket (`tc tbf`); `None` removes it.
    pub fn bandwidth(&self, host: usize, rate: Option<&str>) {
        let ns = &self.hosts[host].ns;
        let _ = Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"]).output();
        if let Some(rate) = rate {
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit", "latency",
                "400ms",
            ]);
        }
    }

    /// Freezes a process (SIGSTOP) for `pause`, then thaws it: a slow or frozen host.
    pub fn freeze(&self, proc_idx: usize, pause: Duration) {
        self.procs[proc_idx].signal(nix::sys::signal::Signal::SIGSTOP);
        std::thread::sleep(pause);
        self.procs[proc_idx].signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// The tail of a process's log, for failure messages.
    pub fn log_tail(&self, proc_idx: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.procs[proc_idx].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            // A frozen process must be thawed to die promptly and release its files.
            p.signal(nix::sys::signal::Signal::SIGCONT);
            p.kill9();
        }
        // Tasks outlive their agents (each under its own supervisor, in its own session):
        // kill every process started for this net, found by a command line naming its dir
        // (the supervisors) or a working directory inside it (the tasks).
        kill_processes_under(self.dir.path());
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge_ns]).output();
        // MLP_KEEP_LOGS=DIR keeps every process log for a post-mortem.
        if let Ok(keep) = std::env::var("MLP_KEEP_LOGS") {
            let dest = Path::new(&keep).join(&self.id);
            if std::fs::create_dir_all(&dest).is_ok() {
                for p in &self.procs {
                    if let Some(name) = p.log.file_name() {
                        let _ = std::fs::copy(&p.log, dest.join(name));
                    }
                }
            }
        }
    }
}

/// SIGKILLs every process whose command line names `dir` or whose cwd is inside it (two
/// passes: supervisors first, then anything their death left behind).
pub fn kill_processes_under(dir: &Path) {
    let needle = dir.display().to_string();
    for _ in 0..2 {
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if pid == std::process::id() as i32 {
                continue;
            }
            let ours = |pid: i32| {
                let by_cmd = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
                by_cmd || std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
            };
            // Checked again once pinned: the number may name another test's process by now.
            if ours(pid) {
                pinned::kill_if(pid, ours);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the CLI inside one host; cheap to clone into a writer thread.
#[derive(Debug, Clone)]
pub struct Client {
    pub ns: String,
    pub dir: PathBuf,
}

impl Client {
    /// Runs `mlp ARGS` to completion, killed after `timeout`; `None` on timeout.
    pub fn mlp(&self, args: &[&str], timeout: Duration) -> Option<Output> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, mlp()])
            .args(args)
            .env("MLP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mlp cli");
        // Drain both pipes while waiting: a child whose output outgrows the pipe buffer would
        // otherwise block on write and never exit.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
        let err = drain(child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
        status.map(|status| Output { status, stdout, stderr })
    }

    /// Writes a batch job spec named `name` and returns its path.
    pub fn job_file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.hcl"));
        let spec = format!(
            "job \"{name}\" {{\n  type = \"batch\"\n  group \"g\" {{\n    task \"t\" {{\n      driver = \"raw_exec\"\n      config {{\n        command = \"/bin/true\"\n      }}\n      resources {{\n        cpu = 10\n        memory = 8\n      }}\n    }}\n  }}\n}}\n"
        );
        std::fs::write(&path, spec).expect("job file");
        path
    }

    /// Registers job `name` through the servers at `addresses` (comma separated); `true` only
    /// when the registration was acknowledged.
    pub fn register(&self, addresses: &str, name: &str, timeout: Duration) -> bool {
        let file = self.job_file(name).display().to_string();
        match self.mlp(&["job", "run", "--json", "--address", addresses, &file], timeout) {
            Some(out) => out.status.success(),
            None => false,
        }
    }

    /// Allocations of job `name`.
    pub fn allocs(&self, addr: &str, name: &str) -> Option<Vec<AllocRow>> {
        let out = self.mlp(&["job", "status", name, "--json", "--address", addr], Duration::from_secs(10))?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let list = v.get("allocations")?.as_array()?;
        Some(
            list.iter()
                .map(|a| {
                    let s = |k: &str| a.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
                    let pid = a.pointer("/task_states/t/pid").and_then(|p| p.as_u64()).unwrap_or(0);
                    (s("id"), s("node_id"), s("client_status"), s("desired_status"), pid)
                })
                .collect(),
        )
    }

    /// The ids of all jobs, read from `addr` (`stale`: that server's own state, no barrier).
    pub fn job_ids(&self, addr: &str, stale: bool) -> Option<Vec<String>> {
        let mut args = vec!["job", "status", "--json", "--address", addr];
        if stale {
            args.push("--stale");
        }
        let Some(out) = self.mlp(&args, Duration::from_secs(20)) else {
            eprintln!("job status via {addr}: no answer within 20s");
            return None;
        };
        if !out.status.success() {
            eprintln!("job status via {addr}: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        let jobs: Vec<serde_json::Value> = match serde_json::from_slice(&out.stdout) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("job status via {addr}: bad JSON ({e}): {} bytes", out.stdout.len());
                return None;
            }
        };
        Some(jobs.iter().filter_map(|j| j.get("id").and_then(|v| v.as_str()).map(String::from)).collect())
    }
}

/// One allocation as (id, node_id, client_status, desired_status, pid of task `t`).
pub type AllocRow = (String, String, String, String, u64);

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; a zombie has exited.
        Ok(stat) => stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// A client thread registering `w-N` jobs in a loop against all servers, recording every
/// acknowledged name with when its request started and when it was acknowledged.
pub struct Writer {
    acked: Arc<Mutex<Vec<(String, Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(client: Client, addresses: String, prefix: &'static str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            // Bounded: the test stops it, and every registration has a timeout.
            while !s.load(Ordering::SeqCst) && n < 100_000 {
                let name = format!("{prefix}-{n}");
                let started = Instant::now();
                if client.register(&addresses, &name, Duration::from_secs(20)) {
                    a.lock().unwrap().push((name, started, Instant::now()));
                }
                n += 1;
            }
        });
        Writer { acked, stop, handle: Some(handle) }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// When the first write that started after `t` was acknowledged.
    pub fn first_ack_started_after(&self, t: Instant) -> Option<Instant> {
        self.acked.lock().unwrap().iter().find(|(_, started, _)| *started > t).map(|(_, _, at)| *at)
    }

    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.acked.lock().unwrap().iter().map(|(n, _, _)| n.clone()).collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every acknowledged name is present exactly once in `ids`.
pub fn assert_all_once(acked: &[String], ids: &[String]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dup.is_empty(), "duplicated jobs: {dup:?}");
    let lost: Vec<_> = acked.iter().filter(|a| !counts.contains_key(a.as_str())).collect();
    assert!(lost.is_empty(), "{} acknowledged registrations lost: {lost:?}", lost.len());
}

// ---- an mlp server cluster on top of a Net ----

/// Fast Raft timing for tests: failover in about a second.
pub const RAFT_FLAGS: [&str; 6] = ["--raft-heartbeat-ms", "100", "--raft-election-min-ms", "500", "--raft-election-max-ms", "1000"];

pub const GRPC_PORT: u16 = 7647;
pub const HTTP_PORT: u16 = 7646;

/// `n` servers, one per host (hosts 0..n), formed with `--bootstrap-expect n`; returns the
/// indexes of their processes.
pub fn start_servers(net: &mut Net, n: usize) -> Vec<usize> {
    start_servers_with(net, n, &RAFT_FLAGS)
}

/// [`start_servers`] with other Raft timing flags.
pub fn start_servers_with(net: &mut Net, n: usize, raft_flags: &[&str]) -> Vec<usize> {
    let addrs: Vec<String> = (0..n).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    let mut procs = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let data = net.path(&format!("server{i}"));
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--grpc-addr".into(),
            addr.clone(),
            "--http-addr".into(),
            format!("{}:{HTTP_PORT}", net.hosts[i].ip),
            "--bootstrap-expect".into(),
            n.to_string(),
            "--join".into(),
            addrs.join(","),
        ];
        args.extend(raft_flags.iter().map(|s| s.to_string()));
        procs.push(net.spawn(&format!("server{i}"), i, &args));
    }
    procs
}

/// One row of `mlp operator raft list-peers --json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Peer {
    pub id: u64,
    pub address: String,
    pub voter: bool,
    pub leader: bool,
    pub matched_index: u64,
    pub applied_index: u64,
}

/// `list-peers --json` asked of the server at `addr`, from host `from`.
pub fn list_peers(net: &Net, from: usize, addr: &str) -> Option<Vec<Peer>> {
    let out = net.mlp(from, &["operator", "raft", "list-peers", "--json", "--address", addr], Duration::from_secs(5))?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The leader's address, once every server in `addrs` answers and all name the same leader
/// with `voters` voters. (A server restarted from a log where it led believes it leads until
/// it hears a higher term; one server's word alone is not enough.)
pub fn wait_leader(net: &Net, from: usize, addrs: &[String], voters: usize, timeout: Duration) -> String {
    wait_for("a leader all servers agree on", timeout, || {
        let mut leader: Option<String> = None;
        for a in addrs {
            let peers = list_peers(net, from, a)?;
            if peers.iter().filter(|p| p.voter).count() != voters {
                return None;
            }
            let l = peers.iter().find(|p| p.leader)?.address.clone();
            if leader.as_ref().is_some_and(|prev| *prev != l) {
                return None;
            }
            leader = Some(l);
        }
        leader
    })
}

/// A service job `svc` with one `raw_exec` task `t` that sleeps for ten minutes.
/// (Lost allocations follow the group's reschedule policy; `delay = "0s"` replaces them at once.)
pub const SLEEP_SERVICE_JOB: &str = "job \"svc\" {\n  type = \"service\"\n  group \"g\" {\n    count = 1\n    reschedule {\n      delay = \"0s\"\n    }\n    task \"t\" {\n      driver = \"raw_exec\"\n      config {\n        command = \"/bin/sleep\"\n        args = [\"600\"]\n      }\n      resources {\n        cpu = 10\n        memory = 8\n      }\n    }\n  }\n}\n";

/// A single `mlp server` on `host` (port [`GRPC_PORT`]) with heartbeat TTL `ttl_secs`; returns
/// its gRPC address.
pub fn start_single_server(net: &mut Net, host: usize, ttl_secs: &str) -> String {
    let addr = format!("{}:{GRPC_PORT}", net.hosts[host].ip);
    let mut args: Vec<String> =
        ["server", "--grpc-addr", &addr, "--http-addr", &format!("{}:0", net.hosts[host].ip), "--heartbeat-ttl", ttl_secs, "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.push(net.path("server").display().to_string());
    net.spawn("server", host, &args);
    addr
}

/// An `mlp agent` named `agent-{i}` on `host`, talking to `servers` (comma separated); returns
/// its process index.
pub fn start_agent(net: &mut Net, host: usize, servers: &str, i: usize) -> usize {
    let args: Vec<String> = vec![
        "agent".into(),
        "--servers".into(),
        servers.to_string(),
        "--node-name".into(),
        format!("agent-{i}"),
        "--rpc-addr".into(),
        format!("{}:0", net.hosts[host].ip),
        "--data-dir".into(),
        net.path(&format!("agent{i}")).display().to_string(),
        // The tests run raw_exec tasks; an agent offers it only when asked (issue 15 §4).
        "--enable-raw-exec".into(),
    ];
    net.spawn(&format!("agent{i}"), host, &args)
}

/// `mlp node status --json` as (id, name, status) rows.
pub fn nodes(c: &Client, addr: &str) -> Option<Vec<(String, String, String)>> {
    let out = c.mlp(&["node", "status", "--json", "--address", addr], Duration::from_secs(5))?;
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    let s = |n: &serde_json::Value, k: &str| n.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    Some(nodes.iter().map(|n| (s(n, "id"), s(n, "name"), s(n, "status"))).collect())
}

/// Waits until `n` nodes are `ready`.
pub fn wait_ready_nodes(c: &Client, addr: &str, n: usize, timeout: Duration) {
    wait_for("ready nodes", timeout, || (nodes(c, addr)?.iter().filter(|r| r.2 == "ready").count() == n).then_some(()));
}
