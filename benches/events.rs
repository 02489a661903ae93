//! What the event stream costs a server (issue 11 §1): `MLP_BENCH_SUBSCRIBERS` (default 1,000)
//! gRPC subscribers, each on its own connection (as separate `mlp event stream` clients would
//! be), on one `mlp server` (release build, a real process, fsync on).
//!
//! * idle: the server's CPU (user + system, from /proc) over `MLP_BENCH_SECS` (default 10) s
//!   with no subscriber, then with all of them connected and nothing happening; its RSS
//!   before and after they connect.
//! * under writes: `MLP_BENCH_JOBS` (default 200) registrations, one at a time through one
//!   client, while every subscriber follows the Job topic: the time from each registration's
//!   acknowledgement until each subscriber received its event (p50, p99 over all deliveries),
//!   and the server's CPU per registration with and without the subscribers.
//! * a subscriber that reads nothing is cut off (`mlp_event_subscribers_cut_total`) while the
//!   registrations go on at the same pace.
//!
//! Run: `cargo bench --bench events` (prints `key value` lines).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{channel, env_or, main_with, pct, rss_mib, start_mlp};
use mlp_proto::v1::event_service_client::EventServiceClient;
use mlp_proto::v1::job_service_client::JobServiceClient;
use mlp_proto::v1::*;

/// The server's CPU time so far (user + system), in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// Registers `n` jobs one at a time; returns (acknowledged-at per job name, server CPU seconds).
async fn register(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    prefix: &str,
    n: usize,
    pid: u32,
) -> Result<(BTreeMap<String, Instant>, f64), String> {
    let mut acked = BTreeMap::new();
    let cpu0 = cpu_s(pid);
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        jobs.register(RegisterJobRequest { job: Some(common::tiny_job(&name)), request_id: String::new() })
            .await
            .map_err(|e| e.to_string())?;
        acked.insert(name, Instant::now());
    }
    Ok((acked, cpu_s(pid) - cpu0))
}

fn main() {
    main_with(run());
}

async fn run() -> Result<BTreeMap<String, f64>, String> {
    let subscribers = env_or("MLP_BENCH_SUBSCRIBERS", 1000);
    let secs = env_or("MLP_BENCH_SECS", 10) as u64;
    let n_jobs = env_or("MLP_BENCH_JOBS", 200);
    let server = start_mlp(&["server", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"], common::bench_dir("events"))?;
    let pid = server.child.id();
    let mut out = BTreeMap::new();
    let mut jobs = JobServiceClient::new(channel(&server.grpc).await?);
    // Warm up, then the baselines without subscribers.
    register(&mut jobs, "warm", 20, pid).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_s(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    out.insert("idle_cpu_pct_no_subscribers".into(), (cpu_s(pid) - cpu0) / secs as f64 * 100.0);
    out.insert("rss_mib_no_subscribers".into(), rss_mib(pid).unwrap_or(f64::NAN));
    let (_, cpu) = register(&mut jobs, "base", n_jobs, pid).await?;
    out.insert("cpu_ms_per_registration_no_subscribers".into(), cpu * 1000.0 / n_jobs as f64);

    // The subscribers: each its own connection, following the Job topic from now on.
    let deliveries: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for _ in 0..subscribers {
        let mut c = EventServiceClient::new(channel(&server.grpc).await?);
        let req = EventsRequest { topics: vec![EventTopic { topic: "Job".into(), key: String::new() }], ..Default::default() };
        let mut stream = c.events(req).await.map_err(|e| e.to_string())?.into_inner();
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = c;
            while let Ok(Some(b)) = stream.message().await {
                let now = Instant::now();
                let mut d = deliveries.lock().unwrap();
                for e in b.events.iter().filter(|e| e.r#type == "JobRegistered") {
                    d.push((e.key.clone(), now));
                }
            }
        }));
    }
    out.insert("subscribe_all_s".into(), t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_s(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    out.insert("idle_cpu_pct_with_subscribers".into(), (cpu_s(pid) - cpu0) / secs as f64 * 100.0);
    out.insert("rss_mib_with_subscribers".into(), rss_mib(pid).unwrap_or(f64::NAN));

    let (acked, cpu) = register(&mut jobs, "fan", n_jobs, pid).await?;
    out.insert("cpu_ms_per_registration_with_subscribers".into(), cpu * 1000.0 / n_jobs as f64);
    let want = n_jobs * subscribers;
    let deadline = Instant::now() + Duration::from_secs(60);
    while deliveries.lock().unwrap().iter().filter(|(k, _)| k.starts_with("fan-")).count() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat: Vec<f64> = deliveries
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, at)| acked.get(k).map(|a| at.saturating_duration_since(*a).as_secs_f64() * 1000.0))
        .collect();
    out.insert("deliveries".into(), lat.len() as f64);
    out.insert("deliveries_expected".into(), want as f64);
    lat.sort_by(f64::total_cmp);
    out.insert("ack_to_event_p50_ms".into(), pct(&lat, 0.5));
    out.insert("ack_to_event_p99_ms".into(), pct(&lat, 0.99));
    for t in tasks {
        t.abort();
    }

    // A subscriber that reads nothing: cut off, and registrations keep their pace.
    let mut stuck_client = EventServiceClient::new(channel(&server.grpc).await?);
    let stuck = stuck_client.events(EventsRequest::default()).await.map_err(|e| e.to_string())?.into_inner();
    let t = Instant::now();
    // Enough events to fill the HTTP/2 windows (several MiB) between the server and it.
    register(&mut jobs, "stuck", n_jobs * 25, pid).await?;
    out.insert("registrations_per_s_with_a_stuck_subscriber".into(), (n_jobs * 25) as f64 / t.elapsed().as_secs_f64());
    // It is cut once it has taken nothing for `events::SEND_TIMEOUT` (30 s) with events waiting.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut cut = metric(&server.http, "mlp_event_subscribers_cut_total").await;
    while cut < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cut = metric(&server.http, "mlp_event_subscribers_cut_total").await;
    }
    out.insert("stuck_subscriber_cut".into(), cut);
    drop(stuck);
    Ok(out)
}

/// One counter from the server's metrics page (plain HTTP/1.1).
async fn metric(http: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else { return f64::NAN };
    let _ = s.write_all(format!("GET /v1/metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes()).await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
