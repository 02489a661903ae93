//! At least 10,000 random and mutated requests against a running `mlp dev`, over gRPC (every
//! service and method in `proto/mlp.proto`, raw bytes on the wire) and over HTTP (every route,
//! random methods, bodies and ids), in a bounded loop. Afterwards the server answers, lists
//! exactly the jobs whose registration it acknowledged (less those it acknowledged purging, and
//! those it acknowledged stopping once a garbage collection ran),
//! logged no panic, and comes back with the same jobs after a kill -9 and restart.
//!
//! Left out: `ClusterService/Join`, which makes the server dial the address in the request (a
//! random one could be outside this machine); it is a server-to-server call that mutual TLS
//! restricts to servers.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use common::Dev;
use mlp_proto::jobspec;
use mlp_proto::v1::*;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const REQUESTS: usize = 10_000;
/// Bound on the whole loop; the requests take well under a minute on the build machine.
const LOOP_BOUND: Duration = Duration::from_secs(600);
/// Per request: streams (allocation watches, logs) are cut off after this.
const CALL_TIMEOUT: Duration = Duration::from_millis(300);
const EXCLUDED: &[&str] = &["/mlp.v1.ClusterService/Join"];

/// Deterministic xorshift, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn mutate(&mut self, mut b: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.below(4) {
            match self.below(4) {
                0 if !b.is_empty() => {
                    let i = self.below(b.len());
                    b[i] ^= (self.next() as u8) | 1;
                }
                1 if !b.is_empty() => {
                    let i = self.below(b.len());
                    b.truncate(i);
                }
                2 => {
                    let i = self.below(b.len() + 1);
                    let extra = self.bytes(8);
                    b.splice(i..i, extra);
                }
                _ => {
                    let i = self.below(b.len() + 1);
                    let j = (i + self.below(16)).min(b.len());
                    let copy = b[i..j].to_vec();
                    b.splice(i..i, copy);
                }
            }
        }
        b
    }
}

/// Raw bytes in, raw bytes out: the fuzzer speaks gRPC framing but not protobuf.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[derive(Debug, Clone)]
struct Method {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every rpc of `proto/mlp.proto`, read from the file so a new method is fuzzed without a change
/// here.
fn methods() -> Vec<Method> {
    let text = std::fs::read_to_string(common::repo_root().join("proto/proto/mlp.proto")).expect("mlp.proto");
    let mut service = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.split_whitespace().next().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let name = rest.split('(').next().unwrap_or_default().trim();
            let (args, ret) = rest.split_once("returns").expect("rpc … returns …");
            out.push(Method {
                path: format!("/mlp.v1.{service}/{name}"),
                client_streaming: args.contains("(stream "),
                server_streaming: ret.contains("(stream "),
            });
        }
    }
    assert!(out.len() >= 30, "found only {} rpcs in mlp.proto", out.len());
    out.retain(|m| !EXCLUDED.contains(&m.path.as_str()));
    out
}

fn job(name: &str) -> Job {
    jobspec::parse_str(
        &format!(
            "job \"{name}\" {{\n  type = \"service\"\n  group \"g\" {{\n    count = 0\n    task \"t\" {{\n      driver = \"exec\"\n      config {{\n        command = \"/bin/true\"\n      }}\n    }}\n  }}\n}}\n"
        ),
        "",
    )
    .expect("template job parses")
}

/// The job the server registers for this request (defaults as the API fills them), if it decodes.
fn registered_key(job: Job) -> (String, String) {
    let mut job = job;
    jobspec::apply_defaults(&mut job);
    let name = if job.name.is_empty() { job.id } else { job.name };
    (job.namespace, name)
}

/// Valid messages to mutate; any method may get any of them (type confusion is hostile too).
fn bases(n: u64) -> Vec<Vec<u8>> {
    let name = format!("fuzz-{n}");
    vec![
        RegisterJobRequest { job: Some(job(&name)), ..Default::default() }.encode_to_vec(),
        PlanJobRequest { job: Some(job(&name)) }.encode_to_vec(),
        GetJobRequest { job_id: name.clone(), ..Default::default() }.encode_to_vec(),
        StopJobRequest { job_id: name.clone(), purge: n.is_multiple_of(2), ..Default::default() }.encode_to_vec(),
        ListAllocsRequest { job_id: name.clone(), ..Default::default() }.encode_to_vec(),
        NodeDrainRequest { node_id: name.clone(), enable: true, deadline_ms: 1000, ignore_system: false }.encode_to_vec(),
        LogsRequest { alloc_id: name.clone(), task: "t".into(), ..Default::default() }.encode_to_vec(),
        HeartbeatRequest { node_id: name, gpu_stats: Vec::new() }.encode_to_vec(),
    ]
}

struct Ledger {
    acked: BTreeSet<(String, String)>,
    /// Acknowledged jobs whose last acknowledged change was a stop: garbage collection
    /// (`SystemService.GarbageCollect`, which the fuzzer calls too) may remove them.
    stopped: BTreeSet<(String, String)>,
    ok: usize,
    refused: usize,
    timed_out: usize,
}

impl Ledger {
    /// What an acknowledged request did to the set of jobs.
    fn acknowledged(&mut self, path: &str, payload: &[u8]) {
        self.ok += 1;
        match path {
            "/mlp.v1.JobService/Register" => {
                if let Some(job) = RegisterJobRequest::decode(payload).ok().and_then(|r| r.job) {
                    let key = registered_key(job);
                    self.stopped.remove(&key);
                    self.acked.insert(key);
                }
            }
            "/mlp.v1.JobService/Stop" => {
                if let Ok(r) = StopJobRequest::decode(payload) {
                    let ns = if r.namespace.is_empty() { "default".to_string() } else { r.namespace };
                    let key = (ns, r.job_id);
                    if r.purge {
                        self.acked.remove(&key);
                        self.stopped.remove(&key);
                    } else if self.acked.contains(&key) {
                        self.stopped.insert(key);
                    }
                }
            }
            _ => {}
        }
    }
}

async fn grpc_call(channel: tonic::transport::Channel, m: &Method, payload: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = m.path.parse().map_err(|_| tonic::Status::internal("bad path"))?;
    match (m.client_streaming, m.server_streaming) {
        (false, false) => grpc.unary(tonic::Request::new(payload), path, RawCodec).await.map(drop),
        (false, true) => {
            let mut stream = grpc.server_streaming(tonic::Request::new(payload), path, RawCodec).await?.into_inner();
            stream.message().await.map(drop)
        }
        (true, _) => {
            let input = tokio_stream::iter(vec![payload]);
            let mut stream = grpc.streaming(tonic::Request::new(input), path, RawCodec).await?.into_inner();
            stream.message().await.map(drop)
        }
    }
}

const HTTP_PATHS: &[&str] = &[
    "/v1/jobs",
    "/v1/job/{id}",
    "/v1/job/{id}/allocations",
    "/v1/job/{id}/versions",
    "/v1/job/{id}/evaluations",
    "/v1/allocations",
    "/v1/allocation/{id}",
    "/v1/nodes",
    "/v1/node/{id}",
    "/v1/node/{id}/drain",
    "/v1/node/{id}/eligibility",
    "/v1/evaluations",
    "/v1/evaluation/{id}",
    "/v1/services",
    "/v1/service/{id}",
    "/v1/status/leader",
    "/v1/metrics",
    "/v1/{id}",
];

fn http_request(rng: &mut Rng, n: u64) -> (String, String, Option<&'static str>, Vec<u8>) {
    let method = ["GET", "POST", "DELETE", "PUT", "PATCH"][rng.below(5)].to_string();
    let ids = [format!("fuzz-{n}"), "..%2F..%2Fetc".into(), "%00".into(), "a".repeat(300), String::new()];
    let id = ids[rng.below(ids.len())].clone();
    let mut path = HTTP_PATHS[rng.below(HTTP_PATHS.len())].replace("{id}", &id);
    if rng.below(4) == 0 {
        path.push_str(["?purge=true", "?stale=maybe", "?namespace=%ff", "?job_id=x&node_id=y"][rng.below(4)]);
    }
    let valid = serde_json::to_vec(&serde_json::json!({ "job": job(&format!("fuzz-http-{n}")) })).expect("json");
    let body = match rng.below(4) {
        0 => rng.bytes(256),
        1 => rng.mutate(valid),
        2 => valid,
        _ => br#"{"enable": true, "deadline_ms": 5}"#.to_vec(),
    };
    let ct = [Some("application/json"), None, Some("text/plain")][rng.below(3)];
    (method, path, ct, body)
}

#[test]
fn ten_thousand_hostile_requests_change_nothing_unacknowledged() {
    let mut dev = Dev::start();
    let methods = methods();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let channel =
        rt.block_on(tonic::transport::Endpoint::from_shared(format!("http://{}", dev.grpc)).expect("endpoint").connect()).expect("connect");
    let mut rng = Rng(0x5eed_1234_9876_abcd);
    let mut ledger = Ledger { acked: BTreeSet::new(), stopped: BTreeSet::new(), ok: 0, refused: 0, timed_out: 0 };
    let started = Instant::now();
    let mut per_method = std::collections::BTreeMap::<String, usize>::new();
    for n in 0..REQUESTS as u64 {
        assert!(started.elapsed() < LOOP_BOUND, "the loop ran past its bound after {n} requests");
        if n % 5 == 4 {
            let (method, path, ct, body) = http_request(&mut rng, n);
            let (code, resp) = common::http_request(&dev.http, &method, &path, ct, &body);
            assert!(code != 0 && code < 500 || code == 503, "HTTP {method} {path}: {code} {resp}");
            *per_method.entry(format!("HTTP {method}")).or_default() += 1;
            if method == "POST" && path == "/v1/jobs" && code == 200 {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("acknowledged body is JSON");
                let job: Job = serde_json::from_value(v["job"].clone()).expect("acknowledged job decodes");
                let key = registered_key(job);
                ledger.stopped.remove(&key);
                ledger.acked.insert(key);
                ledger.ok += 1;
            } else if method == "DELETE" && path.starts_with("/v1/job/") && code == 200 {
                let (id, purge) = match path.trim_start_matches("/v1/job/").split_once('?') {
                    Some((id, q)) => (id, q == "purge=true"),
                    None => (path.trim_start_matches("/v1/job/"), false),
                };
                let key = ("default".to_string(), id.to_string());
                if purge {
                    ledger.acked.remove(&key);
                    ledger.stopped.remove(&key);
                } else if ledger.acked.contains(&key) {
                    ledger.stopped.insert(key);
                }
            }
            continue;
        }
        let m = &methods[rng.below(methods.len())];
        let payload = match rng.below(10) {
            0..=2 => rng.bytes(512),
            3 => Vec::new(),
            _ => {
                let b = bases(n);
                let base = b[rng.below(b.len())].clone();
                if rng.below(3) == 0 {
                    base
                } else {
                    rng.mutate(base)
                }
            }
        };
        *per_method.entry(m.path.clone()).or_default() += 1;
        let result = rt.block_on(async { tokio::time::timeout(CALL_TIMEOUT, grpc_call(channel.clone(), m, payload.clone())).await });
        match result {
            Ok(Ok(())) => ledger.acknowledged(&m.path, &payload),
            Ok(Err(status)) => {
                assert!(status.code() != tonic::Code::Unknown || !status.message().contains("panic"), "{}: {status}", m.path);
                ledger.refused += 1;
            }
            Err(_) => ledger.timed_out += 1,
        }
    }
    eprintln!(
        "{REQUESTS} requests in {:?}: {} acknowledged, {} refused, {} cut off (streams); {} jobs registered",
        started.elapsed(),
        ledger.ok,
        ledger.refused,
        ledger.timed_out,
        ledger.acked.len()
    );
    let untouched: Vec<&Method> = methods.iter().filter(|m| !per_method.contains_key(&m.path)).collect();
    assert!(untouched.is_empty(), "methods never called: {untouched:?}");
    assert!(!ledger.acked.is_empty(), "no registration was acknowledged: the fuzzer never reached the state");

    // Stopped jobs go at the next collection once their evaluations finished: settle, collect,
    // and what is left is exactly the acknowledged, not stopped jobs.
    common::wait_for("evaluations to settle", Duration::from_secs(60), || {
        let (_, body) = common::http_request(&dev.http, "GET", "/v1/evaluations", None, b"");
        let evals: serde_json::Value = serde_json::from_str(&body).ok()?;
        evals.as_array()?.iter().all(|e| e["status"] != "pending").then_some(())
    });
    dev.ok(&["system", "gc"]);
    let expected: BTreeSet<(String, String)> = ledger.acked.difference(&ledger.stopped).cloned().collect();

    let listed = |dev: &Dev| -> BTreeSet<(String, String)> {
        // Every namespace (the CLI lists one).
        let (_, body) = common::http_request(&dev.http, "GET", "/v1/jobs", None, b"");
        let jobs: serde_json::Value = serde_json::from_str(&body).expect("job list");
        jobs.as_array()
            .expect("job list")
            .iter()
            .map(|j| (j["namespace"].as_str().unwrap_or("default").to_string(), j["name"].as_str().unwrap_or_default().to_string()))
            .collect()
    };
    assert_eq!(listed(&dev), expected, "the server lists exactly the acknowledged jobs (less those stopped and collected)");
    assert!(!dev.log().contains("panicked"), "the server logged a panic:\n{}", common::tail(&dev.log(), 4000));

    dev.kill9();
    dev.spawn();
    assert_eq!(listed(&dev), expected, "the same jobs after a restart on the same data dir");
}
