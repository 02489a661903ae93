//! What every benchmark shares: starting real `mlp` processes (killed and their data dirs
//! removed on drop), gRPC channels, percentiles, and printing `key value` results (also as
//! JSON to `$MLP_BENCH_OUT` when set, for the scripts in `scripts/`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tonic::transport::Channel;

pub const MLP: &str = env!("CARGO_BIN_EXE_mlp");

/// A running `mlp` process and its data dir; dropping it kills the process and removes the dir.
pub struct MlpProc {
    pub child: Child,
    pub dir: PathBuf,
    /// The gRPC address it printed (`gRPC: …`; an agent's `RPC: …`).
    pub grpc: String,
    /// The HTTP address it printed (`HTTP: http://…`), without the scheme.
    pub http: String,
}

impl Drop for MlpProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh, empty temp dir for one benchmark process (`name` keeps parallel runs apart).
pub fn bench_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlp-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Starts `mlp ARGS --data-dir DIR/data` and waits until it printed its addresses: gRPC and HTTP
/// for `mlp dev` and `mlp server` (the line `HTTP:` follows `gRPC:`), the `RPC:` line of
/// `mlp agent` (kept as `grpc`).
pub fn start_mlp(args: &[&str], dir: PathBuf) -> Result<MlpProc, String> {
    let mut child = Command::new(MLP)
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("MLP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn mlp {args:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut p = MlpProc { child, dir, grpc: String::new(), http: String::new() };
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next() {
        let line = line.map_err(|e| e.to_string())?;
        let line = line.trim();
        if let Some(v) = line.strip_prefix("gRPC:") {
            p.grpc = v.trim().to_string();
        }
        if let Some(v) = line.strip_prefix("HTTP:") {
            p.http = v.trim().trim_start_matches("http://").to_string();
        }
        // Servers and dev clusters end their addresses with HTTP, agents print only RPC.
        let agent_ready = line.strip_prefix("RPC:").map(|v| p.grpc = v.trim().to_string()).is_some();
        if !p.http.is_empty() || agent_ready {
            if p.grpc.is_empty() {
                return Err("no gRPC line before the HTTP line".into());
            }
            // Keep draining the banner in the background so the process never blocks on a
            // full stdout pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Ok(p);
        }
    }
    Err(format!("mlp {args:?} exited before printing its addresses"))
}

/// A connected gRPC channel to `addr` (host:port).
pub async fn channel(addr: &str) -> Result<Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())
}

/// The `p` quantile (0..=1) of sorted samples; NaN when there are none.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An integer from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs a benchmark on a multi-threaded runtime, prints its results as `key value` lines (and
/// as JSON to `$MLP_BENCH_OUT`), and exits 1 with the error when it fails.
pub fn main_with<F>(run: F)
where
    F: Future<Output = Result<BTreeMap<String, f64>, String>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run) {
        Ok(results) => {
            for (k, v) in &results {
                println!("{k} {v:.2}");
            }
            if let Ok(path) = std::env::var("MLP_BENCH_OUT") {
                let json = serde_json::to_string_pretty(&results).unwrap_or_default();
                if let Err(e) = std::fs::write(&path, json) {
                    eprintln!("cannot write {path}: {e}");
                }
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Resident set size of process `pid` in MiB (VmRSS), if it runs.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// A service job with no instances (`count = 0`): registering it is a Raft write and an
/// evaluation, and nothing runs.
pub fn tiny_job(name: &str) -> mlp_proto::v1::Job {
    use mlp_proto::v1::{Job, Resources, Task, TaskConfig, TaskGroup};
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: "service".into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(0),
            tasks: vec![Task {
                name: "t".into(),
                driver: "raw_exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                resources: Some(Resources { cpu_mhz: 10, memory_mib: 8, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}
