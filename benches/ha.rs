//! High-availability benchmarks (issue 5), each against real `mlp` processes:
//!
//! * `regs`: job registrations per second on a 3-server cluster on loopback (Raft on, every
//!   log append fsync'd before it is acknowledged), the shape of etcd's `check perf --load=l`
//!   (which `scripts/bench-ha.sh` runs next to it): `MLP_BENCH_CLIENTS` (default 500) clients,
//!   each on its own gRPC connection, spread over the three servers (followers forward to the
//!   leader), each registering realistic job specs (at least etcd's 256-byte key + 1 KiB value
//!   when encoded) back to back for `MLP_BENCH_SECS` (default 20) seconds.
//! * `failover`: 3 servers, each in its own network namespace; kill -9 the leader under a
//!   stream of registrations and time until a write that started after the kill is
//!   acknowledged; `MLP_FAILOVER_TRIALS` (default 20) trials. Needs root.
//! * `nodeloss`: a server with a 2 s heartbeat TTL and two agents, each in its own namespace;
//!   cut the link of the agent that runs a service allocation and time until the replacement
//!   runs on the other node; reconnect, wait until the stale copy is stopped, repeat
//!   `MLP_NODELOSS_TRIALS` (default 10) times. Needs root.
//!
//! * `failover-cli-defaults`: 3 servers in network namespaces with the *default* Raft flags;
//!   each trial kills the leader with SIGKILL and at once runs one `mlp job run --detach
//!   --address A,B,C` (a whole CLI process, as a user would), timing from the kill until that
//!   command exits acknowledged (the CLI fails over by itself; a failed exit is counted and run
//!   again). `MLP_FAILOVER_TRIALS` (default 20) trials; prints p50/p90/max. Needs root. Not
//!   part of the default set: name it.
//!
//! Run: `cargo bench --bench ha -- [regs] [failover] [nodeloss] [failover-cli-defaults]`
//! (default: the first three).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/multihost/mod.rs"]
mod multihost;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{channel, env_or, main_with, pct, start_mlp};
use mlp_proto::v1::job_service_client::JobServiceClient;
use mlp_proto::v1::status_service_client::StatusServiceClient;
use mlp_proto::v1::*;
use multihost::{alive, assert_all_once, wait_for, wait_leader, Net, Writer, GRPC_PORT};

/// A job spec as a training team writes one (the shape of `examples/train.hcl`: a script in its
/// args, env, meta, a constraint, resources, restart and timeouts), with `count = 0` so that
/// registering it is a Raft write and an evaluation but places nothing: the write path, as
/// etcd's puts are. Its protobuf encoding is at least etcd's `check perf` key + value (256 +
/// 1,024 bytes); `regs` checks that.
fn realistic_job(name: &str) -> Job {
    let script = "set -e\n\
        echo \"starting training run $MLP_ALLOC_ID lr=$LEARNING_RATE batch=$BATCH_SIZE\"\n\
        python3 -m trainer.main --data /mnt/datasets/imagenet-1k --epochs \"$EPOCHS\" \\\n\
          --lr \"$LEARNING_RATE\" --batch-size \"$BATCH_SIZE\" --checkpoint-dir \"$MLP_ALLOC_DIR/checkpoints\" \\\n\
          --resume-from-latest --log-every 50 --eval-every 1000 --mixed-precision bf16\n\
        python3 -m trainer.export --checkpoint \"$MLP_ALLOC_DIR/checkpoints/latest.pt\" --format onnx \\\n\
          --opset 17 --output \"$MLP_ALLOC_DIR/model.onnx\" --dynamic-batch --validate-against imagenet-val-5k\n\
        python3 -m trainer.report --run \"$MLP_ALLOC_ID\" --metrics top1,top5,loss --upload s3://ml-results/resnet50\n\
        echo \"training complete\"\n";
    let env: BTreeMap<String, String> = [
        ("LEARNING_RATE", "0.0003"),
        ("BATCH_SIZE", "256"),
        ("EPOCHS", "90"),
        ("WANDB_PROJECT", "resnet50-baseline"),
        ("NCCL_DEBUG", "WARN"),
        ("OMP_NUM_THREADS", "8"),
        ("HF_HOME", "/mnt/cache/huggingface"),
        ("TORCH_CUDNN_V8_API_ENABLED", "1"),
        ("DATASET_URI", "s3://ml-datasets/imagenet-1k/train/shards-{00000..01023}.tar"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let meta: BTreeMap<String, String> = [
        ("team", "vision"),
        ("owner", "ml-platform@example.com"),
        ("cost-center", "research-42"),
        ("git-sha", "3f9c2d1e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"),
        (
            "description",
            "ResNet-50 baseline on ImageNet-1k, 90 epochs, bf16, cosine schedule; nightly regression run for the vision platform",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Job {
        id: name.into(),
        name: name.into(),
        namespace: "default".into(),
        r#type: "service".into(),
        priority: 50,
        meta,
        constraints: vec![Constraint { attribute: "${attr.kernel.name}".into(), operator: "=".into(), value: "linux".into() }],
        groups: vec![TaskGroup {
            name: "trainer".into(),
            count: Some(0),
            tasks: vec![Task {
                name: "train".into(),
                driver: "raw_exec".into(),
                config: Some(TaskConfig { command: "/bin/sh".into(), args: vec!["-c".into(), script.into()], ..Default::default() }),
                env,
                resources: Some(Resources { cpu_mhz: 4000, memory_mib: 16384, ..Default::default() }),
                kill_timeout_ms: 30_000,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn regs(out: &mut BTreeMap<String, f64>) -> Result<(), String> {
    let clients = env_or("MLP_BENCH_CLIENTS", 500);
    let secs = env_or("MLP_BENCH_SECS", 20) as u64;
    let base = env_or("MLP_BENCH_HA_PORT", 27640);
    let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let join = addrs.join(",");
    // Started together: each waits for the others before the cluster bootstraps.
    let starts: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (a, join) = (a.clone(), join.clone());
            std::thread::spawn(move || {
                start_mlp(
                    &["server", "--grpc-addr", &a, "--http-addr", "127.0.0.1:0", "--bootstrap-expect", "3", "--join", &join],
                    common::bench_dir(&format!("ha-s{i}")),
                )
            })
        })
        .collect();
    let mut servers = Vec::new();
    for s in starts {
        servers.push(s.join().map_err(|_| "server start panicked")??);
    }
    // Until the cluster has a leader that commits.
    let mut c0 = JobServiceClient::new(channel(&addrs[0]).await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c0.register(RegisterJobRequest { job: Some(common::tiny_job("warm-0")), ..Default::default() }).await.is_err() {
        if Instant::now() > deadline {
            return Err("no leader committed within 60s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leader =
        StatusServiceClient::new(channel(&addrs[0]).await?).leader(LeaderRequest {}).await.map_err(|e| e.to_string())?.into_inner();
    eprintln!("regs: 3 servers {join}, leader {leader:?}; {clients} clients for {secs}s");
    let spec_bytes = prost::Message::encoded_len(&realistic_job("r-499-99999"));
    if spec_bytes < 256 + 1024 {
        return Err(format!("the job spec encodes to {spec_bytes} bytes, less than etcd's check perf key + value"));
    }
    // As etcd's `check perf`: every client its own connection (its own clientv3 client there),
    // the clients spread over the three servers.
    let mut chans = Vec::new();
    for ci in 0..clients {
        chans.push(channel(&addrs[ci % addrs.len()]).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for ci in 0..clients {
        let mut c = JobServiceClient::new(chans[ci % chans.len()].clone());
        let (stop, lat, errors) = (stop.clone(), lat.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match c.register(RegisterJobRequest { job: Some(realistic_job(&format!("r-{ci}-{i}"))), ..Default::default() }).await {
                    Ok(_) => mine.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            lat.lock().map(|mut l| l.extend(mine)).ok();
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut lat = lat.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_by(|a, b| a.total_cmp(b));
    out.insert("ha3_clients".into(), clients as f64);
    out.insert("ha3_connections".into(), chans.len() as f64);
    out.insert("ha3_job_spec_bytes".into(), spec_bytes as f64);
    out.insert("ha3_registrations".into(), lat.len() as f64);
    out.insert("ha3_registrations_per_sec".into(), lat.len() as f64 / elapsed);
    out.insert("ha3_latency_p50_ms".into(), pct(&lat, 0.5));
    out.insert("ha3_latency_p99_ms".into(), pct(&lat, 0.99));
    out.insert("ha3_errors".into(), errors.load(Ordering::Relaxed) as f64);
    drop(servers);
    Ok(())
}

/// Raft timing of the failover benchmark: heartbeat 150 ms, election timeout 300–600 ms. An
/// openraft 0.9 follower calls an election only after the leader lease (= the maximum election
/// timeout) plus its election timeout, so failover is 0.9–1.2 s of timers plus the vote, the
/// new leader's first commit and the client's retry. (openraft 0.9 also times AppendEntries
/// out after one heartbeat interval, so heartbeats shorter than a slow fsync make a
/// catching-up follower's appends time out, as seen with 50 ms on a loaded machine.)
const FAILOVER_RAFT_FLAGS: [&str; 6] = ["--raft-heartbeat-ms", "150", "--raft-election-min-ms", "300", "--raft-election-max-ms", "600"];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summarize(out: &mut BTreeMap<String, f64>, prefix: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    out.insert(format!("{prefix}_trials"), v.len() as f64);
    out.insert(format!("{prefix}_p50_ms"), pct(&v, 0.5));
    out.insert(format!("{prefix}_min_ms"), pct(&v, 0.0));
    out.insert(format!("{prefix}_max_ms"), pct(&v, 1.0));
}

fn failover(out: &mut BTreeMap<String, f64>) {
    let trials = env_or("MLP_FAILOVER_TRIALS", 20);
    let mut net = Net::new();
    for i in 0..3 {
        net.add_host(&format!("server{i}"));
    }
    let client = net.add_host("client");
    let procs = multihost::start_servers_with(&mut net, 3, &FAILOVER_RAFT_FLAGS);
    let addrs: Vec<String> = (0..3).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    let form = Duration::from_secs(30);
    let mut leader = wait_leader(&net, client, &addrs, 3, form);
    // Several writers, so that some request starts soon after the kill whatever the others
    // are waiting on; each is a CLI process, as a user's would be.
    let writers: Vec<Writer> = ["b0", "b1", "b2"].into_iter().map(|p| Writer::start(net.client(client), addrs.join(","), p)).collect();
    let total = |ws: &[Writer]| ws.iter().map(Writer::count).sum::<usize>();
    let mut samples = Vec::new();
    for trial in 0..trials {
        let before = total(&writers);
        wait_for("writes before the kill", Duration::from_secs(30), || (total(&writers) >= before + 3).then_some(()));
        let idx = procs[addrs.iter().position(|a| *a == leader).expect("leader is a known server")];
        let killed_at = Instant::now();
        net.procs[idx].kill9();
        let acked_at = wait_for("an acknowledged write after the kill", Duration::from_secs(15), || {
            let acks: Vec<Instant> = writers.iter().filter_map(|w| w.first_ack_started_after(killed_at)).collect();
            // Wait until every writer had its chance, then take the earliest.
            (acks.len() == writers.len()).then(|| acks.into_iter().min()).flatten()
        });
        samples.push(acked_at - killed_at);
        eprintln!("failover trial {trial}: killed {leader}; next acknowledged write after {:?}", acked_at - killed_at);
        net.restart(idx);
        leader = wait_leader(&net, client, &addrs, 3, form);
    }
    let acked: Vec<String> = writers.into_iter().flat_map(Writer::finish).collect();
    // Read on the leader: a follower restarted many times may still be catching up.
    let ids = wait_for("the final read", Duration::from_secs(60), || net.client(client).job_ids(&leader, false));
    assert_all_once(&acked, &ids);
    summarize(out, "failover", samples);
    out.insert("failover_acked_writes".into(), acked.len() as f64);
    out.insert("failover_raft_heartbeat_ms".into(), 150.0);
    out.insert("failover_raft_election_min_ms".into(), 300.0);
    out.insert("failover_raft_election_max_ms".into(), 600.0);
}

/// Kill -9 the leader, then one `mlp job run --detach` through all three servers, with the
/// servers' default Raft timing: what a user sees end to end.
fn failover_cli_defaults(out: &mut BTreeMap<String, f64>) {
    let trials = env_or("MLP_FAILOVER_TRIALS", 20);
    let mut net = Net::new();
    for i in 0..3 {
        net.add_host(&format!("server{i}"));
    }
    let client = net.add_host("client");
    // MLP_BENCH_RAFT_FLAGS (space separated) tries other timings against the same measure.
    let flags = std::env::var("MLP_BENCH_RAFT_FLAGS").unwrap_or_default();
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let procs = multihost::start_servers_with(&mut net, 3, &flags);
    let addrs: Vec<String> = (0..3).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    let all = addrs.join(",");
    let form = Duration::from_secs(60);
    let c = net.client(client);
    let mut leader = wait_leader(&net, client, &addrs, 3, form);
    let (mut samples, mut failed_runs, mut acked) = (Vec::new(), 0usize, Vec::new());
    for trial in 0..trials {
        let name = format!("cli-{trial}");
        let file = c.job_file(&name).display().to_string();
        let idx = procs[addrs.iter().position(|a| *a == leader).expect("leader is a known server")];
        let killed_at = Instant::now();
        net.procs[idx].kill9();
        // Bounded: each run is killed after 30 s, and at most 10 runs.
        let mut ok = false;
        for _ in 0..10 {
            let run = c.mlp(&["job", "run", "--detach", "--address", &all, &file], Duration::from_secs(30));
            if run.as_ref().is_some_and(|o| o.status.success()) {
                ok = true;
                break;
            }
            failed_runs += 1;
            eprintln!(
                "failover-cli-defaults trial {trial}: a run failed: {:?}",
                run.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            );
        }
        assert!(ok, "no acknowledged `mlp job run` after killing {leader}");
        let took = killed_at.elapsed();
        acked.push(name);
        samples.push(took);
        eprintln!("failover-cli-defaults trial {trial}: killed {leader}; `mlp job run --detach` acknowledged after {took:?}");
        net.restart(idx);
        leader = wait_leader(&net, client, &addrs, 3, form);
    }
    let ids = wait_for("the final read", Duration::from_secs(60), || c.job_ids(&leader, false));
    assert_all_once(&acked, &ids);
    samples.sort();
    let v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    out.insert("failover_cli_defaults_trials".into(), v.len() as f64);
    out.insert("failover_cli_defaults_p50_ms".into(), pct(&v, 0.5));
    out.insert("failover_cli_defaults_p90_ms".into(), pct(&v, 0.9));
    out.insert("failover_cli_defaults_min_ms".into(), pct(&v, 0.0));
    out.insert("failover_cli_defaults_max_ms".into(), pct(&v, 1.0));
    out.insert("failover_cli_defaults_failed_runs".into(), failed_runs as f64);
}

fn nodeloss(out: &mut BTreeMap<String, f64>) {
    const TTL_SECS: &str = "2";
    let trials = env_or("MLP_NODELOSS_TRIALS", 10);
    let mut net = Net::new();
    let server = net.add_host("server");
    let agents = [net.add_host("agent-a"), net.add_host("agent-b")];
    let client = net.add_host("client");
    let addr = multihost::start_single_server(&mut net, server, TTL_SECS);
    for (i, h) in agents.iter().enumerate() {
        multihost::start_agent(&mut net, *h, &addr, i);
    }
    let c = net.client(client);
    let bound = Duration::from_secs(60);
    multihost::wait_ready_nodes(&c, &addr, 2, bound);
    let spec = net.path("svc.hcl");
    std::fs::write(&spec, multihost::SLEEP_SERVICE_JOB).expect("job file");
    let run = c.mlp(&["job", "run", "--detach", "--address", &addr, &spec.display().to_string()], Duration::from_secs(20));
    assert!(run.is_some_and(|o| o.status.success()), "job run failed");
    let mut samples = Vec::new();
    for trial in 0..trials {
        let (id, node, _, _, pid) =
            wait_for("the allocation running", bound, || c.allocs(&addr, "svc")?.into_iter().find(|a| a.2 == "running" && a.4 != 0));
        let name = multihost::nodes(&c, &addr).and_then(|ns| ns.into_iter().find(|n| n.0 == node)).expect("node of the alloc").1;
        let host = if name == "agent-0" { agents[0] } else { agents[1] };
        net.link(host, false);
        let cut_at = Instant::now();
        wait_for("a replacement running on the other node", bound, || {
            let list = c.allocs(&addr, "svc")?;
            list.iter().any(|a| a.0 != id && a.1 != node && a.2 == "running").then_some(())
        });
        let took = cut_at.elapsed();
        eprintln!("node loss trial {trial}: replacement running after {took:?} (TTL {TTL_SECS}s)");
        samples.push(took);
        net.link(host, true);
        wait_for("the stale copy stopped after reconnecting", bound, || (!alive(pid)).then_some(()));
        multihost::wait_ready_nodes(&c, &addr, 2, bound);
    }
    summarize(out, "nodeloss", samples);
    out.insert("nodeloss_heartbeat_ttl_ms".into(), 2000.0);
}

async fn run(modes: Vec<String>) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    let all = modes.is_empty();
    let wants = |m: &str| (all && m != "failover-cli-defaults") || modes.iter().any(|x| x == m);
    if wants("regs") {
        regs(&mut out).await?;
    }
    let needs_netns = wants("failover") || wants("nodeloss") || wants("failover-cli-defaults");
    if needs_netns && !multihost::available() {
        return Err("failover/nodeloss need network namespaces (root and iproute2)".into());
    }
    if wants("failover-cli-defaults") {
        tokio::task::block_in_place(|| failover_cli_defaults(&mut out));
    }
    if wants("failover") {
        tokio::task::block_in_place(|| failover(&mut out));
    }
    if wants("nodeloss") {
        tokio::task::block_in_place(|| nodeloss(&mut out));
    }
    Ok(out)
}

fn main() {
    // `cargo bench` passes `--bench`; the rest names the modes.
    let modes: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    main_with(run(modes));
}
