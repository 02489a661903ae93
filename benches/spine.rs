//! Spine benchmark: runs the real `mlp dev` (release build) and measures
//!   1. submit → task running latency over N jobs (p50/p99),
//!   2. 500 trivial batch jobs (`/bin/true`) from first submit to all complete,
//!   3. job registrations per second through Raft (fsync'd log) with 1 and 64 concurrent clients,
//!   4. the resident memory of an idle agent (registered, heartbeating, nothing to run) and server.
//!
//! It prints `key value` lines (and writes them as JSON to $MLP_BENCH_OUT if set) so that
//! `scripts/bench-spine.sh` can put them next to Slurm's figures from the same run.
//!
//! Run: `cargo bench --bench spine` (or `scripts/bench-spine.sh` for the Slurm comparison);
//! `MLP_BENCH_ONLY=latency,batch,rss,regs` picks parts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mlp_proto::consts::{alloc_client, job_status};
use mlp_proto::v1::job_service_client::JobServiceClient;
use mlp_proto::v1::*;
use tonic::transport::Channel;

mod common;

use common::{channel, main_with, pct, start_mlp};

fn start_dev() -> Result<(common::MlpProc, String), String> {
    let dev = start_mlp(&["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"], common::bench_dir("spine"))?;
    let grpc = dev.grpc.clone();
    Ok((dev, grpc))
}

fn job(name: &str, ty: &str, count: u32, command: &str, args: &[&str]) -> Job {
    job_with_driver(name, ty, count, command, args, "exec")
}

fn job_with_driver(name: &str, ty: &str, count: u32, command: &str, args: &[&str], driver: &str) -> Job {
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: ty.into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(count),
            restart: Some(RestartPolicy { attempts: 0, interval_ms: 60_000, delay_ms: 1000, mode: "fail".into() }),
            tasks: vec![Task {
                name: "t".into(),
                driver: driver.into(),
                config: Some(TaskConfig {
                    command: command.into(),
                    args: args.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                resources: Some(Resources { cpu_mhz: 10, memory_mib: 10, ..Default::default() }),
                kill_timeout_ms: 1000,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn connect(addr: &str) -> Result<JobServiceClient<Channel>, String> {
    Ok(JobServiceClient::new(channel(addr).await?))
}

/// Submit → running: time from just before the register RPC to the task's start time as the
/// agent recorded it (same machine, same clock), one job at a time.
async fn submit_to_running(addr: &str, n: usize, driver: &str) -> Result<Vec<f64>, String> {
    let mut c = connect(addr).await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("lat-{driver}-{i}");
        let t0 = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
        c.register(RegisterJobRequest { job: Some(job_with_driver(&name, "batch", 1, "/bin/true", &[], driver)), ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c
                .get(GetJobRequest { job_id: name.clone(), stale: true, ..Default::default() })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let started = r.allocations.first().and_then(|a| a.task_states.get("t")).map(|s| s.started_at_ms).unwrap_or(0);
            if started > 0 {
                lat.push(started as f64 - t0.as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{name} not running after 30s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

/// 500 `/bin/true` batch jobs, submitted one after another, until all are complete.
async fn batch_500(addr: &str, driver: &str) -> Result<f64, String> {
    let mut c = connect(addr).await?;
    let t0 = Instant::now();
    for i in 0..500 {
        c.register(RegisterJobRequest {
            job: Some(job_with_driver(&format!("b{i}"), "batch", 1, "/bin/true", &[], driver)),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = c.list(ListJobsRequest { stale: true, ..Default::default() }).await.map_err(|e| e.to_string())?.into_inner().jobs;
        let done = jobs
            .iter()
            .filter(|j| j.name.starts_with('b') && j.status == job_status::DEAD && j.alloc_counts.get(alloc_client::COMPLETE) == Some(&1))
            .count();
        if done == 500 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Err(format!("only {done}/500 batch jobs complete after 600s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Registrations per second with `clients` concurrent gRPC clients, `per_client` each. The jobs
/// have count = 0, so each registration is one Raft entry plus one evaluation pass.
async fn registrations(addr: &str, clients: usize, per_client: usize, tag: &str) -> Result<f64, String> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(connect(addr).await?);
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (ci, mut c) in conns.into_iter().enumerate() {
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let j = job(&format!("r{tag}-{ci}-{i}"), "service", 0, "/bin/true", &[]);
                c.register(RegisterJobRequest { job: Some(j), ..Default::default() }).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((clients * per_client) as f64 / t0.elapsed().as_secs_f64())
}

async fn run() -> Result<BTreeMap<String, f64>, String> {
    let n_lat: usize = std::env::var("MLP_BENCH_LATENCY_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    // MLP_BENCH_ONLY=latency,batch,rss,regs runs only those parts (default: all).
    let only = std::env::var("MLP_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    let mut out = BTreeMap::new();
    if part("latency") {
        let (_dev, addr) = start_dev()?;
        // `exec` runs with full isolation (namespaces, pivot_root, cgroups); `raw_exec` is a
        // plain spawn: the difference is the isolation overhead.
        let lat = submit_to_running(&addr, n_lat, "exec").await?;
        out.insert("mlp_submit_to_running_p50_ms".into(), pct(&lat, 0.5));
        out.insert("mlp_submit_to_running_p99_ms".into(), pct(&lat, 0.99));
        out.insert("mlp_submit_to_running_n".into(), lat.len() as f64);
        let raw = submit_to_running(&addr, n_lat, "raw_exec").await?;
        out.insert("mlp_submit_to_running_raw_exec_p50_ms".into(), pct(&raw, 0.5));
        out.insert("mlp_submit_to_running_raw_exec_p99_ms".into(), pct(&raw, 0.99));
        out.insert("mlp_isolation_overhead_p50_ms".into(), pct(&lat, 0.5) - pct(&raw, 0.5));
    }
    if part("batch") {
        let (_dev, addr) = start_dev()?;
        let secs = batch_500(&addr, "exec").await?;
        out.insert("mlp_batch500_s".into(), secs);
        out.insert("mlp_batch500_jobs_per_sec".into(), 500.0 / secs);
    }
    if part("batch") {
        let (_dev, addr) = start_dev()?;
        let secs = batch_500(&addr, "raw_exec").await?;
        out.insert("mlp_batch500_raw_exec_s".into(), secs);
    }
    if part("rss") {
        // The agent alone, idle: registered with a server, heartbeating, nothing to run.
        let server = start_mlp(&["server", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"], common::bench_dir("spine-server"))?;
        let agent = start_mlp(&["agent", "--servers", &server.grpc], common::bench_dir("spine-agent"))?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        out.insert("mlp_agent_idle_rss_mib".into(), common::rss_mib(agent.child.id()).ok_or("agent not running after 10s")?);
        out.insert("mlp_server_idle_rss_mib".into(), common::rss_mib(server.child.id()).ok_or("server not running after 10s")?);
    }
    if part("regs") {
        let (_dev, addr) = start_dev()?;
        // Warm up connections and the leader's loop.
        registrations(&addr, 4, 25, "warm").await?;
        out.insert("mlp_registrations_per_sec_1_client".into(), registrations(&addr, 1, 1000, "one").await?);
        out.insert("mlp_registrations_per_sec_64_clients".into(), registrations(&addr, 64, 100, "many").await?);
    }
    Ok(out)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    main_with(run());
}
