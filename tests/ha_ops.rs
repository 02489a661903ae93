//! Cluster operations across real network namespaces: node drain with `migrate { max_parallel }`
//! and scheduling eligibility, the reschedule policy (delay, attempts used up), snapshot save and
//! restore on a 3-server cluster, and a rolling restart of 5 servers under a stream of writes.
//!
//! Built on the `multihost` harness (every host its own network namespace, real `mlp`
//! processes); a machine without root, iproute2 or network namespaces fails each test with what
//! is missing (`MLP_TEST_ALLOW_SKIP=1` skips instead; see `tests/prereq`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod multihost;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multihost::{assert_all_once, wait_for, wait_leader, Client, Net, GRPC_PORT, HTTP_PORT};

/// Forming a cluster / registering agents.
const FORM_BOUND: Duration = Duration::from_secs(40);

macro_rules! require_netns {
    ($($need:expr),*) => {
        if !multihost::require_netns(&[$($need),*]) {
            return;
        }
    };
}

/// `mlp ARGS --address ADDR` from `c`; panics unless it succeeds; returns stdout.
fn ok(c: &Client, addr: &str, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--address", addr]);
    let out = c.mlp(&all, Duration::from_secs(30)).unwrap_or_else(|| panic!("mlp {all:?} timed out"));
    assert!(out.status.success(), "mlp {all:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The job's allocations as JSON values (from `job status --json`).
fn allocs(c: &Client, addr: &str, job: &str) -> Option<Vec<serde_json::Value>> {
    let out = c.mlp(&["job", "status", job, "--json", "--address", addr], Duration::from_secs(10))?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("allocations")?.as_array().cloned()
}

/// `node status NODE --json`'s node.
fn node(c: &Client, addr: &str, id: &str) -> Option<serde_json::Value> {
    let out = c.mlp(&["node", "status", id, "--json", "--address", addr], Duration::from_secs(10))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("node").cloned()
}

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v.get(k).and_then(|x| x.as_str()).unwrap_or_default()
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k).and_then(|x| x.as_u64()).unwrap_or_default()
}

/// One server and `n` agents named agent-0.. on their own hosts, plus a client host.
fn single_server_with_agents(n: usize) -> (Net, String, Client) {
    let mut net = Net::new();
    let server = net.add_host("server");
    let agents: Vec<usize> = (0..n).map(|i| net.add_host(&format!("agent-{i}"))).collect();
    let client = net.add_host("client");
    let addr = multihost::start_single_server(&mut net, server, "10");
    for (i, h) in agents.iter().enumerate() {
        multihost::start_agent(&mut net, *h, &addr, i);
    }
    let c = net.client(client);
    multihost::wait_ready_nodes(&c, &addr, n, FORM_BOUND);
    (net, addr, c)
}

#[test]
fn ha_ops_drain_moves_allocations_with_max_parallel_and_eligibility_gates_placement() {
    require_netns!();
    let (net, addr, c) = single_server_with_agents(3);
    let names: Vec<(String, String)> = multihost::nodes(&c, &addr).unwrap().into_iter().map(|n| (n.0, n.1)).collect();
    let id_of = |name: &str| names.iter().find(|n| n.1 == name).map(|n| n.0.clone()).unwrap();
    let drained = id_of("agent-0");

    // Ineligible nodes get no placements: with agent-1 and agent-2 ineligible, all go to agent-0.
    for n in ["agent-1", "agent-2"] {
        ok(&c, &addr, &["node", "eligibility", n, "--disable"]);
        wait_for("the node ineligible", FORM_BOUND, || node(&c, &addr, n).filter(|v| v["eligible"] == false));
    }
    let spec = net.path("svc.hcl");
    std::fs::write(
        &spec,
        "job \"svc\" {\n  type = \"service\"\n  group \"g\" {\n    count = 3\n    migrate {\n      max_parallel = 1\n    }\n    task \"t\" {\n      driver = \"raw_exec\"\n      config {\n        command = \"/bin/sleep\"\n        args = [\"600\"]\n      }\n      kill_timeout = \"1s\"\n      resources {\n        cpu = 10\n        memory = 8\n      }\n    }\n  }\n}\n",
    )
    .unwrap();
    ok(&c, &addr, &["job", "run", "--detach", &spec.display().to_string()]);
    let first = wait_for("3 allocations running", FORM_BOUND, || {
        let list = allocs(&c, &addr, "svc")?;
        let running: Vec<_> = list.into_iter().filter(|a| s(a, "client_status") == "running").collect();
        (running.len() == 3).then_some(running)
    });
    assert!(first.iter().all(|a| s(a, "node_id") == drained), "ineligible nodes got placements: {first:?}");

    // Eligible again, then drain agent-0.
    for n in ["agent-1", "agent-2"] {
        ok(&c, &addr, &["node", "eligibility", n, "--enable"]);
    }
    ok(&c, &addr, &["node", "drain", "agent-0", "--detach", "--deadline", "5m"]);
    let n0 = node(&c, &addr, "agent-0").unwrap();
    assert_eq!(n0["eligible"], false, "a draining node is ineligible at once");

    // Follow the drain: at no point may more than max_parallel (1) of the group's indexes lack
    // a running allocation that is meant to run.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut worst = 0usize;
    let mut polls = 0usize;
    let mut moved_seen = BTreeSet::new();
    loop {
        assert!(Instant::now() < deadline, "drain did not complete in 120s (worst gap {worst})");
        polls += 1;
        if let Some(list) = allocs(&c, &addr, "svc") {
            let mut gap = 0usize;
            for i in 0..3 {
                let name = format!("svc.g[{i}]");
                let up = list.iter().any(|a| s(a, "name") == name && s(a, "desired_status") == "run" && s(a, "client_status") == "running");
                if !up {
                    gap += 1;
                }
            }
            worst = worst.max(gap);
            assert!(gap <= 1, "{gap} of the group's allocations were down at once (max_parallel 1): {list:#?}");
            for a in &list {
                if s(a, "node_id") != drained && s(a, "client_status") == "running" {
                    moved_seen.insert(s(a, "name").to_string());
                }
            }
            let n = node(&c, &addr, &drained);
            let done = n.as_ref().is_some_and(|n| n["drain_strategy"].is_null());
            let running_elsewhere = list
                .iter()
                .filter(|a| s(a, "desired_status") == "run" && s(a, "client_status") == "running" && s(a, "node_id") != drained)
                .count();
            if done && running_elsewhere == 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("drain complete after {polls} polls; worst gap {worst}; moved {moved_seen:?}");
    assert_eq!(moved_seen.len(), 3, "all three indexes run elsewhere");
    let n0 = node(&c, &addr, "agent-0").unwrap();
    assert_eq!(n0["eligible"], false, "a drained node stays ineligible");
    let events = n0["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| s(e, "message") == "drain complete"), "{events:?}");
    // The migrated allocations were replaced (previous_allocation), not rescheduled.
    let list = allocs(&c, &addr, "svc").unwrap();
    let replacements: Vec<_> = list.iter().filter(|a| s(a, "node_id") != drained).collect();
    assert!(replacements.iter().all(|a| !s(a, "previous_allocation").is_empty()), "{replacements:#?}");
    // The server's own record of the sequence: each replacement was created only after the
    // previous one was running (max_parallel 1), whatever the polling above happened to see.
    let mut seq: Vec<(u64, u64)> = replacements
        .iter()
        .map(|a| (u(a, "create_time_ms"), a.pointer("/task_states/t/started_at_ms").and_then(|v| v.as_u64()).unwrap_or(0)))
        .collect();
    seq.sort();
    for w in seq.windows(2) {
        assert!(w[0].1 > 0 && w[1].0 >= w[0].1, "a replacement was placed before the previous one ran: {seq:?}");
    }
    let status = ok(&c, &addr, &["node", "status", "agent-0"]);
    assert!(status.contains("Eligibility = ineligible") && status.contains("Drain       = false"), "{status}");
}

#[test]
fn ha_ops_reschedule_waits_its_delay_and_stops_when_attempts_are_used() {
    require_netns!();
    let (net, addr, c) = single_server_with_agents(1);
    let spec = net.path("flaky.hcl");
    std::fs::write(
        &spec,
        "job \"flaky\" {\n  type = \"batch\"\n  group \"g\" {\n    restart {\n      attempts = 0\n      mode = \"fail\"\n    }\n    reschedule {\n      attempts = 2\n      interval = \"1h\"\n      delay = \"2s\"\n      delay_function = \"constant\"\n    }\n    task \"t\" {\n      driver = \"raw_exec\"\n      config {\n        command = \"/bin/false\"\n      }\n      resources {\n        cpu = 10\n        memory = 8\n      }\n    }\n  }\n}\n",
    )
    .unwrap();
    ok(&c, &addr, &["job", "run", "--detach", &spec.display().to_string()]);
    // The original and two reschedules fail; the last one says why there is no fourth.
    let list = wait_for("three failed allocations, the last not rescheduled", Duration::from_secs(90), || {
        let list = allocs(&c, &addr, "flaky")?;
        let failed = list.iter().filter(|a| s(a, "client_status") == "failed").count();
        let told = list.iter().any(|a| s(a, "reschedule_description").contains("not rescheduled"));
        (list.len() == 3 && failed == 3 && told).then_some(list)
    });
    let by_id = |id: &str| list.iter().find(|a| s(a, "id") == id).unwrap();
    let mut chained = 0;
    for a in &list {
        let prev = s(a, "previous_allocation");
        if prev.is_empty() {
            continue;
        }
        chained += 1;
        let p = by_id(prev);
        assert_eq!(s(p, "next_allocation"), s(a, "id"));
        let finished = p.pointer("/task_states/t/finished_at_ms").and_then(|v| v.as_u64()).unwrap_or(0);
        assert!(finished > 0, "the failed task reports when it ended: {p:#?}");
        assert!(
            u(a, "create_time_ms") >= finished + 2_000,
            "replacement {} created {} ms after its predecessor ended, before the 2s delay",
            s(a, "id"),
            u(a, "create_time_ms") as i64 - finished as i64
        );
        let events = a.pointer("/reschedule_tracker/events").and_then(|e| e.as_array()).map(|e| e.len()).unwrap_or(0);
        assert!(events >= 1, "{a:#?}");
    }
    assert_eq!(chained, 2, "two reschedules: {list:#?}");
    let last = list.iter().find(|a| !s(a, "reschedule_description").is_empty()).unwrap();
    let text = ok(&c, &addr, &["alloc", "status", s(last, "id")]);
    assert!(text.contains("not rescheduled: 2 of 2 reschedule attempts within 1h used"), "{text}");
    let text = ok(&c, &addr, &["job", "status", "flaky"]);
    assert!(text.contains("not rescheduled: 2 of 2"), "{text}");
    // Bounded check that no further replacement comes (the delay is 2s; wait well past it).
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(allocs(&c, &addr, "flaky").map(|l| l.len()), Some(3), "attempts used up, yet another replacement came");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `n` servers on hosts 0..n and a client host; returns the net, process indexes, addresses and
/// the client host.
fn servers(n: usize) -> (Net, Vec<usize>, Vec<String>, usize) {
    let mut net = Net::new();
    for i in 0..n {
        net.add_host(&format!("server{i}"));
    }
    let client = net.add_host("client");
    let procs = multihost::start_servers(&mut net, n);
    let addrs: Vec<String> = (0..n).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    (net, procs, addrs, client)
}

/// An MLflow API call to the server at `addr` (its gRPC address; HTTP is on [`HTTP_PORT`]) from
/// the client's host: the status and JSON body.
fn mlflow(c: &Client, addr: &str, endpoint: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let url = format!("http://{host}:{HTTP_PORT}/api/2.0/mlflow/{endpoint}");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.ns, "curl", "-s", "-m", "30", "-o", "-", "-w", "\n%{http_code}", "-XPOST", &url])
        .args(["-H", "content-type: application/json", "--data-binary", &body.to_string()])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(json).unwrap_or(serde_json::Value::Null))
}

/// [`mlflow`] retried while the server answers 503, as MLflow's client retries (no quorum
/// confirmed the read or write in time, on a loaded host); the 200 answer's body.
fn mlflow_retried(c: &Client, addr: &str, endpoint: &str, body: &serde_json::Value) -> serde_json::Value {
    wait_for(&format!("{endpoint} on {addr}"), Duration::from_secs(60), || {
        let (code, v) = mlflow(c, addr, endpoint, body);
        assert!(code == 200 || code == 503, "{endpoint} on {addr}: {code} {v}");
        (code == 200).then_some(v)
    })
}

/// `run`'s history of `loss` on the server at `addr` (read from that server's points tree).
fn loss_history(c: &Client, addr: &str, run: &str) -> serde_json::Value {
    mlflow_retried(c, addr, "metrics/get-history", &serde_json::json!({ "run_id": run, "metric_key": "loss" }))["metrics"].clone()
}

/// Logs `n` points of `loss` from step `from` through `addr`, in batches of 1,000.
fn log_loss(c: &Client, addr: &str, run: &str, from: i64, n: i64) {
    let points: Vec<serde_json::Value> = (from..from + n)
        .map(|s| serde_json::json!({ "key": "loss", "value": s as f64 / 8.0, "timestamp": 5_000 - s, "step": s }))
        .collect();
    for (i, batch) in points.chunks(1000).enumerate() {
        // A 503 (no quorum confirmed in time, on a starved host) is ambiguous: the batch may have
        // committed. Resend it only if the history does not hold it yet, so no point is doubled.
        let want = from as usize + i * 1000 + batch.len();
        wait_for(&format!("log-batch {i} through {addr}"), Duration::from_secs(90), || {
            let (code, v) = mlflow(c, addr, "runs/log-batch", &serde_json::json!({ "run_id": run, "metrics": batch }));
            assert!(code == 200 || code == 503, "log-batch: {code} {v}");
            (code == 200 || loss_history(c, addr, run).as_array().map_or(0, Vec::len) >= want).then_some(())
        });
    }
}

#[test]
fn ha_ops_snapshot_save_and_restore_round_trip_on_every_server() {
    require_netns!();
    let (net, _procs, addrs, client) = servers(3);
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    let c = net.client(client);
    let all = addrs.join(",");
    for i in 0..3 {
        assert!(c.register(&all, &format!("keep-{i}"), Duration::from_secs(40)), "keep-{i} not registered");
    }
    // Metric points: more than one `RestorePoints` entry's worth (512 KiB, some 20,000 points).
    // Retried on a 503 (a second run, if the first did commit, is harmless).
    let v = mlflow_retried(&c, &leader, "runs/create", &serde_json::json!({ "experiment_id": "0", "start_time": 1 }));
    let run = v["run"]["info"]["run_id"].as_str().unwrap_or_else(|| panic!("runs/create: {v}")).to_string();
    log_loss(&c, &leader, &run, 0, 30_000);
    let saved = loss_history(&c, &leader, &run);
    assert_eq!(saved.as_array().map(Vec::len), Some(30_000));
    let file = net.path("state.snap");
    ok(&c, &leader, &["operator", "snapshot", "save", &file.display().to_string()]);
    for i in 0..3 {
        assert!(c.register(&all, &format!("later-{i}"), Duration::from_secs(40)), "later-{i} not registered");
    }
    log_loss(&c, &leader, &run, 30_000, 500);

    // A corrupt copy is refused and changes nothing.
    let bad = net.path("corrupt.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&bad, &bytes).unwrap();
    let out =
        c.mlp(&["operator", "snapshot", "restore", &bad.display().to_string(), "--address", &leader], Duration::from_secs(30)).unwrap();
    assert!(!out.status.success(), "a corrupt snapshot was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt"), "{err}");
    let ids = wait_for("job status on the leader", Duration::from_secs(60), || c.job_ids(&leader, false));
    assert!(ids.iter().any(|j| j == "later-0"), "a refused restore changed the state: {ids:?}");

    // The real one: through a follower (forwarded), then every server converges on it.
    let follower = addrs.iter().find(|a| **a != leader).unwrap();
    ok(&c, follower, &["operator", "snapshot", "restore", &file.display().to_string()]);
    for a in &addrs {
        let ids = wait_for(&format!("server {a} restored"), Duration::from_secs(30), || {
            let ids = c.job_ids(a, true)?;
            (!ids.iter().any(|j| j.starts_with("later-"))).then_some(ids)
        });
        let mut keep: Vec<&String> = ids.iter().filter(|j| j.starts_with("keep-")).collect();
        keep.sort();
        assert_eq!(keep, ["keep-0", "keep-1", "keep-2"], "server {a}: {ids:?}");
        // Every server has exactly the saved points (a follower reads its own tree).
        assert_eq!(loss_history(&c, a, &run), saved, "server {a}: the restored history");
    }
    // The cluster keeps working after a restore.
    assert!(c.register(&all, "after-restore", Duration::from_secs(40)));
    let ids = wait_for("job status on the leader", Duration::from_secs(60), || c.job_ids(&leader, false));
    assert!(ids.iter().any(|j| j == "after-restore"));
}

/// A writer that registers `roll-N` jobs through all servers, recording every outcome.
struct Recorder {
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(c: Client, addresses: String) -> Recorder {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, f, st) = (acked.clone(), failed.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) && n < 100_000 {
                let name = format!("roll-{n}");
                let file = c.job_file(&name).display().to_string();
                match c.mlp(&["job", "run", "--json", "--address", &addresses, &file], Duration::from_secs(60)) {
                    Some(out) if out.status.success() => a.lock().unwrap().push(name),
                    Some(out) => f.lock().unwrap().push((name, String::from_utf8_lossy(&out.stderr).into_owned())),
                    None => f.lock().unwrap().push((name, "timed out after 60s".into())),
                }
                n += 1;
            }
        });
        Recorder { acked, failed, stop, handle: Some(handle) }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(mut self) -> (Vec<String>, Vec<(String, String)>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (self.acked.lock().unwrap().clone(), self.failed.lock().unwrap().clone())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn ha_ops_rolling_restart_of_five_servers_fails_no_request() {
    require_netns!();
    let (mut net, procs, addrs, client) = servers(5);
    wait_leader(&net, client, &addrs, 5, FORM_BOUND);
    let c = net.client(client);
    let writer = Recorder::start(c.clone(), addrs.join(","));
    wait_for("the writer under way", FORM_BOUND, || (writer.count() >= 3).then_some(()));
    for (i, p) in procs.iter().enumerate() {
        // SIGTERM, wait for the exit, start again on the same data dir.
        net.procs[*p].signal(nix::sys::signal::Signal::SIGTERM);
        wait_for(&format!("server {i} exited"), Duration::from_secs(30), || (!net.procs[*p].running()).then_some(()));
        net.restart(*p);
        // Back as a voter that agrees on the leader with all the others.
        let leader = wait_leader(&net, client, &addrs, 5, Duration::from_secs(60));
        // ... and caught up: the leader has replicated to it what was applied after its restart.
        let applied = wait_for("the leader's applied index", FORM_BOUND, || {
            multihost::list_peers(&net, client, &leader)?.first().map(|p| p.applied_index)
        });
        wait_for(&format!("server {i} caught up to index {applied}"), Duration::from_secs(60), || {
            let peers = multihost::list_peers(&net, client, &leader)?;
            peers.iter().find(|p| p.address == addrs[i]).filter(|p| p.matched_index >= applied).map(|_| ())
        });
        let before = writer.count();
        wait_for("writes acknowledged after the restart", Duration::from_secs(60), || (writer.count() >= before + 2).then_some(()));
        eprintln!("server {i} restarted and rejoined; {} writes acknowledged so far", writer.count());
    }
    let (acked, failed) = writer.finish();
    assert!(failed.is_empty(), "{} requests failed during the rolling restart: {failed:#?}", failed.len());
    let leader = wait_leader(&net, client, &addrs, 5, FORM_BOUND);
    let ids = c.job_ids(&leader, false).unwrap();
    assert_all_once(&acked, &ids);
    eprintln!("rolling restart: {} writes, none failed", acked.len());
}

#[test]
fn ha_ops_http_mirror_drains_and_sets_eligibility_with_clear_errors() {
    let dev = common::Dev::start();
    let nodes = dev.json(&["node", "status", "--json"]);
    let id = nodes[0]["id"].as_str().unwrap().to_string();
    let json = Some("application/json");
    let post = |path: &str, body: &str| dev.http("POST", path, json, body.as_bytes());

    let (code, body) = post(&format!("/v1/node/{id}/eligibility"), r#"{"eligible": false}"#);
    assert_eq!(code, 200, "{body}");
    assert_eq!(dev.json(&["node", "status", &id, "--json"])["node"]["eligible"], false);
    let (code, body) = post(&format!("/v1/node/{id}/eligibility"), r#"{"eligible": "no"}"#);
    assert_eq!(code, 422, "{body}");
    let (code, body) = post("/v1/node/no-such-node/eligibility", r#"{"eligible": true}"#);
    assert_eq!(code, 404, "{body}");
    let (code, body) = post(&format!("/v1/node/{id}/drain"), r#"{"enable": false}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not draining"), "{body}");

    // A drain of a node with nothing on it completes at once and leaves it ineligible.
    let (code, body) = post(&format!("/v1/node/{id}/eligibility"), r#"{"eligible": true}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&format!("/v1/node/{id}/drain"), r#"{"enable": true, "deadline_ms": 60000}"#);
    assert_eq!(code, 200, "{body}");
    let n = common::wait_for("the drain to complete", Duration::from_secs(30), || {
        let n = dev.json(&["node", "status", &id, "--json"])["node"].clone();
        n["drain_strategy"].is_null().then_some(n)
    });
    assert_eq!(n["eligible"], false);
    let (code, body) = post(&format!("/v1/node/{id}/eligibility"), r#"{"eligible": true}"#);
    assert_eq!(code, 200, "{body}");
    // The CLI follows a drain to its end without --detach.
    let out = dev.ok(&["node", "drain", &id, "--deadline", "0"]);
    assert!(out.contains("drain complete"), "{out}");
    let text = dev.ok(&["node", "status", &id]);
    assert!(text.contains("Eligibility = ineligible") && text.contains("drain started (no deadline)"), "{text}");
    dev.ok(&["node", "eligibility", &id, "--enable"]);
}

#[test]
fn ha_ops_a_new_leader_runs_a_delayed_reschedule() {
    require_netns!();
    let mut net = Net::new();
    for i in 0..3 {
        net.add_host(&format!("server{i}"));
    }
    let agent = net.add_host("agent");
    let client = net.add_host("client");
    let procs = multihost::start_servers(&mut net, 3);
    let addrs: Vec<String> = (0..3).map(|i| format!("{}:{GRPC_PORT}", net.hosts[i].ip)).collect();
    let all = addrs.join(",");
    let leader = wait_leader(&net, client, &addrs, 3, FORM_BOUND);
    multihost::start_agent(&mut net, agent, &all, 0);
    let c = net.client(client);
    multihost::wait_ready_nodes(&c, &leader, 1, FORM_BOUND);
    let spec = net.path("flaky.hcl");
    std::fs::write(
        &spec,
        "job \"flaky\" {\n  type = \"batch\"\n  group \"g\" {\n    restart {\n      attempts = 0\n      mode = \"fail\"\n    }\n    reschedule {\n      attempts = 1\n      interval = \"1h\"\n      delay = \"6s\"\n    }\n    task \"t\" {\n      driver = \"raw_exec\"\n      config {\n        command = \"/bin/false\"\n      }\n      resources {\n        cpu = 10\n        memory = 8\n      }\n    }\n  }\n}\n",
    )
    .unwrap();
    ok(&c, &all, &["job", "run", "--detach", &spec.display().to_string()]);
    // The failure is in and its follow-up evaluation is committed: then the leader dies.
    let first = wait_for("the first allocation failed with a follow-up", FORM_BOUND, || {
        let list = allocs(&c, &leader, "flaky")?;
        list.into_iter().find(|a| s(a, "client_status") == "failed" && !s(a, "follow_up_eval_id").is_empty())
    });
    let li = addrs.iter().position(|a| *a == leader).unwrap();
    net.procs[procs[li]].kill9();
    let others: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    let new_leader = wait_for("a new leader", FORM_BOUND, || {
        let peers = multihost::list_peers(&net, client, &others[0])?;
        peers.iter().find(|p| p.leader && p.address != leader).map(|p| p.address.clone())
    });
    let replacement = wait_for("the delayed replacement, placed by the new leader", Duration::from_secs(60), || {
        let list = allocs(&c, &new_leader, "flaky")?;
        list.into_iter().find(|a| s(a, "previous_allocation") == s(&first, "id"))
    });
    let finished = first.pointer("/task_states/t/finished_at_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(finished > 0);
    assert!(u(&replacement, "create_time_ms") >= finished + 6_000, "replaced before its delay: {replacement:#?}");
}
