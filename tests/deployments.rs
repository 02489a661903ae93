//! Deployments end to end on `mlp dev` (issue 16 §1): a rolling update of a three-instance HTTP
//! service (Python's `http.server` serving its version) while a client sends requests the whole
//! time, with zero failed requests; canaries and `mlp deployment promote`; a broken version
//! (its health check fails) that fails its deployment and reverts by itself to the latest
//! stable version; pause and resume; `mlp job revert`, `mlp job scale` and `mlp job history`.
//!
//! The client resolves the passing instances through `/v1/service/web?passing=true` before
//! every request, as a service-mesh sidecar or DNS client would; the group's `shutdown_delay`
//! keeps a stopped instance serving for a while after the servers deregistered it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_for, Dev};

/// A service job whose instances answer `GET /` with their version and `GET /health` with 200,
/// or 500 when the version is "broken".
fn web_job(version: &str, count: u32, update: &str) -> String {
    format!(
        r#"
job "web" {{
  type = "service"
  update {{
{update}
  }}
  group "web" {{
    count = {count}
    shutdown_delay = "2s"
    network {{
      port "http" {{}}
    }}
    service {{
      name = "web"
      port = "http"
      check {{
        type     = "http"
        path     = "/health"
        interval = "300ms"
        timeout  = "300ms"
      }}
    }}
    task "srv" {{
      driver = "raw_exec"
      env {{
        VERSION = "{version}"
      }}
      config {{
        command = "/usr/bin/python3"
        args    = ["-c", "{SERVER}"]
      }}
      resources {{
        cpu    = 50
        memory = 64
      }}
    }}
  }}
}}
"#
    )
}

const SERVER: &str = "import http.server as h, os; V = os.environ['VERSION']; H = type('H', (h.BaseHTTPRequestHandler,), {'do_GET': lambda s: (s.send_response(500 if (s.path == '/health' and V == 'broken') else 200), s.send_header('Content-Length', str(len(V))), s.end_headers(), s.wfile.write(V.encode())), 'log_message': lambda s, *a: None}); h.ThreadingHTTPServer(('127.0.0.1', int(os.environ['MLP_PORT_http'])), H).serve_forever()";

const ROLLING: &str = r#"    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "1s"
    healthy_deadline  = "20s"
    progress_deadline = "40s""#;

fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().map_err(|e| format!("{addr}: {e}"))?, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("{addr}: no status line: {text:?}"))?;
    Ok((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// The passing instances of service `web`, as `ip:port`.
fn passing(http: &str) -> Vec<String> {
    let (code, body) = common::http_request(http, "GET", "/v1/service/web?passing=true", None, b"");
    if code != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array().into_iter().flatten().filter_map(|r| Some(format!("{}:{}", r["address"].as_str()?, r["port"].as_u64()?))).collect()
}

/// What the client saw: versions answered, and failed requests with why.
#[derive(Default)]
struct Seen {
    versions: Vec<String>,
    failures: Vec<String>,
    requests: usize,
}

/// Sends requests to a passing instance (round robin) every 20 ms until stopped.
fn client(http: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let instances = passing(&http);
            if let Some(addr) = instances.get(n % instances.len().max(1)) {
                n += 1;
                let r = get(addr, "/");
                let mut s = seen.lock().expect("client results");
                s.requests += 1;
                match r {
                    Ok((200, v)) => {
                        if s.versions.last() != Some(&v) {
                            s.versions.push(v);
                        }
                    }
                    Ok((code, body)) => s.failures.push(format!("{addr}: HTTP {code} {body}")),
                    Err(e) => s.failures.push(e),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn deployment_of(dev: &Dev, version: u64) -> Option<serde_json::Value> {
    let list = dev.json(&["deployment", "list", "--job", "web", "--json"]);
    list.as_array()?.iter().find(|d| d["job_version"].as_u64().unwrap_or(0) == version).cloned()
}

fn wait_deployment(dev: &Dev, version: u64, status: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(d) = deployment_of(dev, version).filter(|d| d["status"] == status) {
            return d;
        }
        if Instant::now() > deadline {
            let (_, services) = common::http_request(&dev.http, "GET", "/v1/service/web", None, b"");
            let mut stderr = String::new();
            for a in std::fs::read_dir(dev.data_dir().join("agent").join("allocs")).into_iter().flatten().flatten() {
                stderr.push_str(&std::fs::read_to_string(a.path().join("srv").join("logs").join("srv.stderr.0")).unwrap_or_default());
            }
            eprintln!("task stderr: {}", common::tail(&stderr, 2000));
            panic!(
                "timed out after {timeout:?} waiting for the deployment of version {version} to be {status}:\n{}\nservices: {services}\njob: {}\ndev log: {}",
                dev.ok(&["deployment", "list"]),
                dev.ok(&["job", "status", "web"]),
                common::tail(&dev.log(), 4000)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The versions the passing instances answer with, sorted.
fn serving(dev: &Dev) -> Vec<String> {
    let mut v: Vec<String> = passing(&dev.http).iter().filter_map(|a| get(a, "/").ok()).map(|(_, b)| b).collect();
    v.sort();
    v
}

/// A `mlp dev` with host ports of its own: tests run side by side, and every `mlp dev` would
/// otherwise hand out the same dynamic ports (20000 up) to its host-mode tasks.
fn dev() -> Dev {
    let lo = 24_000 + (std::process::id() % 400) * 20;
    Dev::start_with(&["--network-port-range", &format!("{lo}-{}", lo + 19)])
}

fn run(dev: &Dev, file: &str, body: &str) {
    dev.ok(&["job", "run", "--detach", dev.write_job(file, body).to_str().expect("path")]);
}

#[test]
fn a_rolling_update_under_traffic_fails_no_request() {
    let dev = dev();
    run(&dev, "v1.hcl", &web_job("v1", 3, ROLLING));
    wait_deployment(&dev, 0, "successful", Duration::from_secs(60));
    wait_for("three passing v1 instances", Duration::from_secs(20), || (serving(&dev) == ["v1", "v1", "v1"]).then_some(()));

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let t = client(dev.http.clone(), stop.clone(), seen.clone());
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    run(&dev, "v2.hcl", &web_job("v2", 3, ROLLING));
    // One at a time: while the deployment runs, never more than one v2 instance is unhealthy.
    let d = wait_deployment(&dev, 1, "successful", Duration::from_secs(90));
    let took = started.elapsed();
    wait_for("three passing v2 instances", Duration::from_secs(20), || (serving(&dev) == ["v2", "v2", "v2"]).then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    t.join().expect("client thread");
    let seen = seen.lock().expect("client results");
    assert!(seen.failures.is_empty(), "{} of {} requests failed: {:?}", seen.failures.len(), seen.requests, seen.failures);
    assert!(seen.requests > 50, "the client sent requests the whole time ({})", seen.requests);
    assert!(
        seen.versions.first().map(String::as_str) == Some("v1") && seen.versions.last().map(String::as_str) == Some("v2"),
        "{:?}",
        seen.versions
    );
    let group = &d["groups"]["web"];
    assert_eq!(group["healthy_allocs"], 3, "{d}");
    assert_eq!(group["placed_allocs"], 3, "{d}");
    let job_status = dev.ok(&["job", "status", "web"]);
    assert!(job_status.contains("Latest Deployment") && job_status.contains("3 healthy"), "{job_status}");
    let status = dev.ok(&["deployment", "status", d["id"].as_str().expect("id")]);
    assert!(status.contains("successful") && status.contains("healthy"), "{status}");
    // Version 1 became stable; the history shows what changed.
    let history = dev.ok(&["job", "history", "web"]);
    assert!(history.contains("groups[web].tasks[srv].env.VERSION: \"v1\" => \"v2\""), "{history}");
    eprintln!("rolling update of 3 instances took {took:?} ({} requests, 0 failed)", seen.requests);
}

#[test]
fn canaries_are_promoted_by_hand_and_a_broken_version_reverts_by_itself() {
    let dev = dev();
    let update = format!("{ROLLING}\n    canary = 1\n    auto_revert = true");
    run(&dev, "v1.hcl", &web_job("v1", 2, &update));
    wait_deployment(&dev, 0, "successful", Duration::from_secs(60));

    // A canary runs beside the two v1 instances and waits, healthy, for a promotion.
    run(&dev, "v2.hcl", &web_job("v2", 2, &update));
    let d = wait_for("a healthy canary", Duration::from_secs(60), || {
        deployment_of(&dev, 1).filter(|d| d["groups"]["web"]["healthy_allocs"] == 1)
    });
    let id = d["id"].as_str().expect("id").to_string();
    assert_eq!(d["status"], "running");
    wait_for("v1, v1 and the v2 canary serving", Duration::from_secs(20), || (serving(&dev) == ["v1", "v1", "v2"]).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(deployment_of(&dev, 1).expect("deployment")["status"], "running", "no auto_promote: it waits");
    // Pause and resume: a paused deployment cannot be promoted, a resumed one can.
    dev.ok(&["deployment", "pause", &id]);
    assert_eq!(deployment_of(&dev, 1).expect("deployment")["status"], "paused");
    dev.ok(&["deployment", "resume", &id]);
    let out = dev.ok(&["deployment", "promote", &id]);
    assert!(out.contains("promoted"), "{out}");
    wait_deployment(&dev, 1, "successful", Duration::from_secs(60));
    wait_for("v2 everywhere", Duration::from_secs(20), || (serving(&dev) == ["v2", "v2"]).then_some(()));

    // A broken version: its canary's check never passes; the deployment fails at the canary's
    // healthy_deadline, and the job goes back to version 1 (the latest stable) on its own.
    let started = Instant::now();
    run(&dev, "broken.hcl", &web_job("broken", 2, &update));
    let failed = wait_deployment(&dev, 2, "failed", Duration::from_secs(60));
    assert!(failed["status_description"].as_str().unwrap_or("").contains("reverting to stable version 1"), "{failed}");
    let job = dev.job("web");
    assert_eq!(job["job"]["version"], 3, "the revert is version 3");
    assert_eq!(job["job"]["revert_of"], 1);
    let revert = wait_deployment(&dev, 3, "successful", Duration::from_secs(60));
    assert_eq!(revert["is_revert"], true);
    assert_eq!(revert["groups"]["web"]["desired_canaries"], 0, "a revert places no canaries (nomad#10882)");
    wait_for("v2 everywhere again", Duration::from_secs(20), || (serving(&dev) == ["v2", "v2"]).then_some(()));
    eprintln!("broken version detected and reverted in {:?}", started.elapsed());

    // Errors say what is wrong and change nothing.
    let out = dev.cli(&["deployment", "promote", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("successful"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dev.cli(&["job", "revert", "web", "99"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no version 99"), "{err}");

    // By hand: back to version 0's spec (v1), then scale it.
    dev.ok(&["job", "revert", "web", "0"]);
    wait_deployment(&dev, 4, "successful", Duration::from_secs(60));
    wait_for("v1 everywhere", Duration::from_secs(20), || (serving(&dev) == ["v1", "v1"]).then_some(()));
    dev.ok(&["job", "scale", "web", "web", "3"]);
    wait_for("three v1", Duration::from_secs(30), || (serving(&dev) == ["v1", "v1", "v1"]).then_some(()));
    let out = dev.cli(&["job", "scale", "web", "nope", "3"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no group \"nope\""));

    // A rolling restart replaces every allocation through a deployment.
    let before: Vec<String> = alloc_ids(&dev);
    dev.ok(&["job", "restart", "web"]);
    wait_deployment(&dev, 6, "successful", Duration::from_secs(60));
    let after = alloc_ids(&dev);
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|a| !before.contains(a)), "every allocation was replaced: {before:?} -> {after:?}");
}

/// The ids of the job's live allocations.
fn alloc_ids(dev: &Dev) -> Vec<String> {
    let job = dev.job("web");
    job["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["desired_status"] == "run" && a["client_status"] == "running")
        .filter_map(|a| a["id"].as_str().map(String::from))
        .collect()
}

#[test]
fn update_blocks_are_validated_with_positions() {
    let dev = dev();
    let bad = web_job(
        "v1",
        1,
        "    max_parallel = 1\n    health_check = \"sometimes\"\n    healthy_deadline = \"1s\"\n    min_healthy_time = \"5s\"",
    );
    let out = dev.cli(&["job", "run", dev.write_job("bad.hcl", &bad).to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.hcl:6:") && err.contains("unknown health check \"sometimes\""), "{err}");
    assert!(err.contains("healthy_deadline (1s) must be greater than min_healthy_time (5s)"), "{err}");
    let batch = "job \"b\" {\n  type = \"batch\"\n  update {\n    max_parallel = 2\n  }\n  group \"g\" {\n    task \"t\" {\n      driver = \"raw_exec\"\n      config {\n        command = \"/bin/true\"\n      }\n    }\n  }\n}\n";
    let out = dev.cli(&["job", "run", dev.write_job("batch.hcl", batch).to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("batch.hcl:3:") && err.contains("applies to service and system jobs"), "{err}");
}

#[test]
fn manual_health_is_set_from_the_cli() {
    let dev = dev();
    let update =
        "    max_parallel     = 1\n    health_check     = \"manual\"\n    min_healthy_time = \"1s\"\n    healthy_deadline = \"5m\"";
    run(&dev, "v1.hcl", &web_job("v1", 1, update));
    let d = wait_for("the deployment to place its allocation", Duration::from_secs(60), || {
        deployment_of(&dev, 0).filter(|d| d["groups"]["web"]["placed_allocs"] == 1)
    });
    let id = d["id"].as_str().expect("id").to_string();
    wait_for("the allocation to run", Duration::from_secs(30), || (alloc_ids(&dev).len() == 1).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(deployment_of(&dev, 0).expect("deployment")["status"], "running", "manual health: running tasks are not enough");
    // Only the deployment's own allocations; then the person's word.
    let out = dev.cli(&["deployment", "alloc-health", &id, "--healthy", "00000000"]);
    assert!(!out.status.success(), "an unknown allocation is refused");
    let alloc = alloc_ids(&dev).remove(0);
    dev.ok(&["deployment", "alloc-health", &id, "--healthy", &alloc]);
    wait_deployment(&dev, 0, "successful", Duration::from_secs(30));
}
