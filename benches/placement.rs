//! Placement throughput through a real server: `mlp server` (release build, Raft on, the log
//! fsync'd) with N simulated nodes registered by a load generator that speaks the agent protocol
//! (Register, Heartbeat, WatchAllocations, UpdateAllocs) and acknowledges every allocation as
//! running without starting a process. Then J jobs × T tasks are registered and the clock runs
//! until every allocation is placed, and until every one is acknowledged running.
//!
//! Run: `cargo bench --bench placement` (defaults 500 nodes, 100 jobs × 100 tasks; override with
//! MLP_BENCH_NODES, MLP_BENCH_JOBS, MLP_BENCH_TASKS). With MLP_BENCH_PREFERENCES=1 the nodes sit
//! in 10 racks (`meta.rack`) and every job spreads over the racks and prefers rack r1 (affinity),
//! which measures what preferences cost (every feasible node is then scored, no sampling).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlp_proto::consts::{alloc_client, alloc_desired};
use mlp_proto::v1::agent_service_client::AgentServiceClient;
use mlp_proto::v1::job_service_client::JobServiceClient;
use mlp_proto::v1::*;
use tonic::transport::Channel;

mod common;

use common::{channel, env_or, main_with, start_mlp};

/// Set once the measurement ends: the simulated nodes' streams break when the server stops.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads the named counters from the server's Prometheus page.
fn scrape(http: &str, names: &[&str]) -> Vec<(String, f64)> {
    use std::io::{Read, Write};
    let mut out = Vec::new();
    let Ok(mut s) = std::net::TcpStream::connect(http) else { return out };
    let _ = s.write_all(format!("GET /v1/metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes());
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    for line in body.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            if names.contains(&k) {
                if let Ok(v) = v.parse() {
                    out.push((format!("server_{k}"), v));
                }
            }
        }
    }
    out
}

fn start_server() -> Result<(common::MlpProc, String, String), String> {
    let p = start_mlp(
        &["server", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--heartbeat-ttl", "60"],
        common::bench_dir("placement"),
    )?;
    let (grpc, http) = (p.grpc.clone(), p.http.clone());
    Ok((p, grpc, http))
}

fn node(i: usize, racks: bool) -> Node {
    let meta = if racks { [("rack".to_string(), format!("r{}", i % 10))].into_iter().collect() } else { Default::default() };
    Node {
        meta,
        id: format!("sim-node-{i:05}"),
        name: format!("sim-{i:05}"),
        datacenter: "dc1".into(),
        drivers: vec!["exec".into(), "raw_exec".into()],
        attributes: [("kernel.name".to_string(), "linux".to_string())].into_iter().collect(),
        resources: Some(NodeResources {
            cpu_cores: 32,
            cpu_mhz_per_core: 2500,
            cpu_total_mhz: 80_000,
            memory_mib: 256 * 1024,
            disk_mib: 1 << 20,
            gpus: vec![],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One simulated node: registers, then acknowledges each new allocation as running.
async fn fake_agent(ch: Channel, n: Node, acked: Arc<AtomicU64>, ready: tokio::sync::mpsc::Sender<()>) -> Result<(), String> {
    let mut c = AgentServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024);
    let secret = c.register(RegisterNodeRequest { node: Some(n.clone()) }).await.map_err(|e| e.to_string())?.into_inner().node_secret;
    // Every later agent RPC carries the node secret the registration issued (issue 15 §3).
    let with_secret = |msg| {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = secret.parse() {
            r.metadata_mut().insert(mlp_tls::secret::METADATA_KEY, v);
        }
        r
    };
    let mut stream =
        c.watch_allocations(with_secret(WatchAllocationsRequest { node_id: n.id.clone() })).await.map_err(|e| e.to_string())?.into_inner();
    let _ = ready.send(()).await;
    let mut seen = BTreeSet::new();
    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
        let updates: Vec<AllocClientUpdate> = msg
            .allocations
            .iter()
            .filter(|a| a.desired_status == alloc_desired::RUN && a.client_status == alloc_client::PENDING && seen.insert(a.id.clone()))
            .map(|a| AllocClientUpdate { alloc_id: a.id.clone(), client_status: alloc_client::RUNNING.into(), ..Default::default() })
            .collect();
        if !updates.is_empty() {
            let k = updates.len() as u64;
            let mut r = tonic::Request::new(UpdateAllocsRequest { node_id: n.id.clone(), updates });
            if let Ok(v) = secret.parse() {
                r.metadata_mut().insert(mlp_tls::secret::METADATA_KEY, v);
            }
            c.update_allocs(r).await.map_err(|e| e.to_string())?;
            acked.fetch_add(k, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn job(name: &str, tasks: u32, preferences: bool) -> Job {
    let (affinities, spreads) = if preferences {
        let rack = "${meta.rack}".to_string();
        (
            vec![Affinity { attribute: rack.clone(), operator: "=".into(), value: "r1".into(), weight: Some(50) }],
            vec![Spread { attribute: rack, weight: Some(100), targets: vec![] }],
        )
    } else {
        (vec![], vec![])
    };
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: "service".into(),
        priority: 50,
        groups: vec![TaskGroup {
            name: "g".into(),
            count: Some(tasks),
            restart: Some(RestartPolicy { attempts: 1, interval_ms: 60_000, delay_ms: 1000, mode: "fail".into() }),
            tasks: vec![Task {
                name: "t".into(),
                driver: "exec".into(),
                config: Some(TaskConfig { command: "/bin/true".into(), args: vec![], ..Default::default() }),
                resources: Some(Resources { cpu_mhz: 100, memory_mib: 128, ..Default::default() }),
                kill_timeout_ms: 1000,
                ..Default::default()
            }],
            affinities,
            spreads,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn run() -> Result<BTreeMap<String, f64>, String> {
    let (nodes, jobs, tasks) = (env_or("MLP_BENCH_NODES", 500), env_or("MLP_BENCH_JOBS", 100), env_or("MLP_BENCH_TASKS", 100));
    let preferences = env_or("MLP_BENCH_PREFERENCES", 0) == 1;
    let (_server, addr, http) = start_server()?;
    let acked = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(nodes);
    // A few connections shared by the simulated nodes, as HTTP/2 multiplexes streams.
    let mut chans = Vec::new();
    for _ in 0..8 {
        chans.push(channel(&addr).await?);
    }
    let t_reg = Instant::now();
    for i in 0..nodes {
        let (ch, acked, ready) = (chans[i % chans.len()].clone(), acked.clone(), ready_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = fake_agent(ch, node(i, preferences), acked, ready).await {
                if !DONE.load(Ordering::Relaxed) {
                    eprintln!("fake node {i}: {e}");
                }
            }
        });
    }
    for _ in 0..nodes {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await.map_err(|_| "nodes did not register in 120s")?;
    }
    let reg_s = t_reg.elapsed().as_secs_f64();

    let mut jc = JobServiceClient::new(channel(&addr).await?).max_decoding_message_size(256 * 1024 * 1024);
    let total = (jobs * tasks) as u64;
    let t0 = Instant::now();
    let mut submit = Vec::new();
    for j in 0..jobs {
        let mut c = jc.clone();
        let spec = job(&format!("p{j:04}"), tasks as u32, preferences);
        submit
            .push(tokio::spawn(async move { c.register(RegisterJobRequest { job: Some(spec), ..Default::default() }).await.map(|_| ()) }));
    }
    for s in submit {
        s.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    let submit_s = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut placed_s = None;
    loop {
        if placed_s.is_none() {
            let list = jc.list(ListJobsRequest { stale: true, ..Default::default() }).await.map_err(|e| e.to_string())?.into_inner();
            let placed: u64 = list.jobs.iter().map(|j| j.alloc_counts.values().map(|v| u64::from(*v)).sum::<u64>()).sum();
            if placed >= total {
                placed_s = Some(t0.elapsed().as_secs_f64());
            }
        }
        if placed_s.is_some() && acked.load(Ordering::Relaxed) >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("not done after 600s: acked {}/{total}", acked.load(Ordering::Relaxed)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let placed_s = placed_s.unwrap_or(f64::NAN);
    let running_s = t0.elapsed().as_secs_f64();
    DONE.store(true, Ordering::Relaxed);
    let mut out: BTreeMap<String, f64> = [
        ("placement_nodes".into(), nodes as f64),
        ("placement_preferences".into(), if preferences { 1.0 } else { 0.0 }),
        ("placement_allocs".into(), total as f64),
        ("placement_node_register_s".into(), reg_s),
        ("placement_submit_s".into(), submit_s),
        ("placement_all_placed_s".into(), placed_s),
        ("placement_placements_per_sec".into(), total as f64 / placed_s),
        ("placement_all_running_s".into(), running_s),
        ("placement_running_per_sec".into(), total as f64 / running_s),
    ]
    .into_iter()
    .collect();
    // Where the time went: scheduler CPU time vs the rest (Raft, streams, acks).
    out.extend(scrape(
        &http,
        &[
            "mlp_scheduler_micros_total",
            "mlp_evals_processed_total",
            "mlp_plans_applied_total",
            "mlp_plan_placements_rejected_total",
            "mlp_raft_applied_index",
        ],
    ));
    Ok(out)
}

fn main() {
    main_with(run());
}
