//! MLflow artifacts replicated to a quorum of servers and kept in an S3-compatible bucket
//! (issue 17 §2). Three `mlp server` processes on loopback: uploads through a follower and
//! the leader, the leader killed with kill -9, every byte downloaded and listed through the
//! survivors; a server missing a blob fetches it from a peer; an upload that no quorum can take
//! is refused and leaves the index as it was; GC deletes blobs nothing names. And `mlp dev
//! --artifact-store s3://...` against moto (PyPI's S3-compatible server, installed by
//! `.ci/run` into the mlflow-skinny virtualenv) with MLflow's own client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{mlp, wait_for, Dev};
use sha2::Digest;

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<std::net::TcpListener> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// A plain HTTP/1.1 request answered with `Content-Length` (artifact downloads are): status and
/// raw body bytes.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return (0, Vec::new()),
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else { return (0, resp) };
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut body = resp[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < nl + 2 + n {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[(nl + 2 + n + 2).min(b.len())..];
    }
    out
}

const ART: &str = "/api/2.0/mlflow-artifacts/artifacts";

fn upload(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (s, b) = http(addr, "PUT", &format!("{ART}/{path}"), body);
    (s, String::from_utf8_lossy(&b).into_owned())
}

/// An upload expected to succeed: retried (for up to 30 s) while the server answers 503, as
/// MLflow's client does (an upload is idempotent: same path, same bytes).
fn upload_ok(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = upload(addr, path, body);
        if s != 503 || Instant::now() > deadline {
            return (s, b);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A read: retried (for up to 30 s) while the server answers 503, as MLflow's client retries
/// `TEMPORARILY_UNAVAILABLE` (a leader briefly unsure of its quorum on a loaded machine).
fn read(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = http(addr, "GET", path, b"");
        if s != 503 || Instant::now() > deadline {
            return (s, b);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn download(addr: &str, path: &str) -> (u16, Vec<u8>) {
    read(addr, &format!("{ART}/{path}"))
}

fn list(addr: &str, dir: &str) -> Vec<(String, bool, Option<u64>)> {
    let (s, b) = read(addr, &format!("{ART}?path={dir}"));
    assert_eq!(s, 200, "list {dir} on {addr}: {}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
    v["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| (f["path"].as_str().unwrap_or("").to_string(), f["is_dir"].as_bool().unwrap_or(false), f["file_size"].as_u64()))
                .collect()
        })
        .unwrap_or_default()
}

/// Deterministic, incompressible-looking bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// Three `mlp server` processes on loopback, killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    grpc: Vec<String>,
    http: Vec<String>,
    procs: Vec<Option<Child>>,
    extra: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start(extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new().prefix("mlp-test-").tempdir().expect("tempdir");
        let ports = free_ports(6);
        let mut c = Cluster {
            dir,
            grpc: (0..3).map(|i| format!("127.0.0.1:{}", ports[i])).collect(),
            http: (0..3).map(|i| format!("127.0.0.1:{}", ports[3 + i])).collect(),
            procs: vec![None, None, None],
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("server{i}.log"))).expect("log");
        let child = Command::new(mlp())
            .args(["server", "--bootstrap-expect", "3", "--join", &self.grpc.join(",")])
            .args(["--grpc-addr", &self.grpc[i], "--http-addr", &self.http[i]])
            .args(["--raft-heartbeat-ms", "100", "--raft-election-min-ms", "500", "--raft-election-max-ms", "1000"])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .env("MLP_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn mlp server");
        self.procs[i] = Some(child);
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("server{i}"))
    }

    fn blob_file(&self, i: usize, sha: &str) -> PathBuf {
        self.data_dir(i).join("artifacts").join("blobs").join(&sha[..2]).join(sha)
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let l = std::fs::read_to_string(self.dir.path().join(format!("server{i}.log"))).unwrap_or_default();
                format!("--- server{i}:\n{}", common::tail(&l, 3000))
            })
            .collect()
    }

    fn cli(&self, addrs: &[String], args: &[&str]) -> Output {
        Command::new(mlp()).args(args).env("MLP_ADDR", addrs.join(",")).stdin(Stdio::null()).output().expect("run mlp")
    }

    /// The index (into `grpc`) of the leader, as the servers in `among` see it.
    fn leader(&self, among: &[usize]) -> Option<usize> {
        let addrs: Vec<String> = among.iter().map(|i| self.grpc[*i].clone()).collect();
        let out = self.cli(&addrs, &["operator", "raft", "list-peers", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let addr = v.as_array()?.iter().find(|p| p["leader"] == true)?["address"].as_str()?.to_string();
        self.grpc.iter().position(|a| *a == addr).filter(|i| among.contains(i))
    }
}

#[test]
fn mlflow_artifacts_survive_a_leader_kill_and_need_a_quorum() {
    let mut c = Cluster::start(&["--artifact-gc-grace", "2s"]);
    let leader = wait_for("the cluster to form", Duration::from_secs(60), || c.leader(&[0, 1, 2]));
    let follower = (leader + 1) % 3;
    let run = "1/r0/artifacts";

    // Through a follower and through the leader; a 3 MiB file crosses many chunks.
    let big = bytes(3 * 1024 * 1024 + 17, 1);
    let small = b"hello from the follower".to_vec();
    let (s, b) = upload_ok(&c.http[follower], &format!("{run}/model/weights.bin"), &big);
    assert_eq!(s, 200, "upload through a follower: {b}\n{}", c.logs());
    let (s, b) = upload_ok(&c.http[leader], &format!("{run}/notes.txt"), &small);
    assert_eq!(s, 200, "upload through the leader: {b}\n{}", c.logs());
    // The same bytes again, through the third server, all of whose peers have them already
    // (they answer the push before reading it): one blob, two paths.
    let third = (leader + 2) % 3;
    let big_again = bytes(3 * 1024 * 1024 + 17, 1);
    let (s, b) = upload_ok(&c.http[third], &format!("{run}/model/copy.bin"), &big_again);
    assert_eq!(s, 200, "upload of known bytes: {b}\n{}", c.logs());
    let (s, b) = http(&c.http[third], "DELETE", &format!("{ART}/{run}/model/copy.bin"), b"");
    assert_eq!(s, 200, "delete the copy: {}", String::from_utf8_lossy(&b));
    // Acknowledged means on a majority: the receiver and at least one more.
    for (what, data) in [("big", &big), ("small", &small)] {
        let holders = (0..3).filter(|i| c.blob_file(*i, &sha(data)).exists()).count();
        assert!(holders >= 2, "{what}: acknowledged with the blob on {holders} servers");
    }
    // Every server lists and serves every artifact.
    for i in 0..3 {
        assert_eq!(
            list(&c.http[i], run),
            vec![("model".to_string(), true, None), ("notes.txt".to_string(), false, Some(small.len() as u64))],
            "server {i}"
        );
        assert_eq!(list(&c.http[i], &format!("{run}/model")), vec![("weights.bin".to_string(), false, Some(big.len() as u64))]);
        let (s, got) = download(&c.http[i], &format!("{run}/model/weights.bin"));
        assert!(s == 200 && got == big, "server {i}: status {s}, {} bytes", got.len());
    }

    // kill -9 the leader; the survivors elect another and still have every byte.
    c.kill9(leader);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    wait_for("a new leader", Duration::from_secs(30), || c.leader(&survivors));
    for i in &survivors {
        assert_eq!(list(&c.http[*i], run).len(), 2, "server {i} after the leader kill");
        let (s, got) = download(&c.http[*i], &format!("{run}/model/weights.bin"));
        assert!(s == 200 && got == big, "server {i} after the kill: status {s}, {} bytes\n{}", got.len(), c.logs());
        let (s, got) = download(&c.http[*i], &format!("{run}/notes.txt"));
        assert!(s == 200 && got == small, "server {i} after the kill: status {s}");
    }

    // A server that lacks a blob fetches it from a peer and keeps it.
    let (a, b2) = (survivors[0], survivors[1]);
    let blob = c.blob_file(a, &sha(&big));
    let _ = std::fs::remove_file(&blob);
    let (s, got) = download(&c.http[a], &format!("{run}/model/weights.bin"));
    assert!(s == 200 && got == big, "fetched from a peer: status {s}, {} bytes\n{}", got.len(), c.logs());
    assert!(blob.exists(), "the fetched blob is kept");

    // With two of three servers down, no upload is acknowledged and the index is unchanged.
    c.kill9(b2);
    let lonely = bytes(4096, 2);
    let (s, b) = upload(&c.http[a], &format!("{run}/lonely.bin"), &lonely);
    assert!(s >= 500, "an upload no quorum can take must fail, got {s}: {b}");
    c.spawn(b2);
    wait_for("a leader again", Duration::from_secs(60), || c.leader(&survivors));
    for i in &survivors {
        let names: Vec<String> = list(&c.http[*i], run).into_iter().map(|f| f.0).collect();
        assert_eq!(names, vec!["model", "notes.txt"], "server {i}: the refused upload left no entry");
        assert_eq!(download(&c.http[*i], &format!("{run}/lonely.bin")).0, 404);
    }
    // Now it goes through (two of three voters take it).
    let (s, b) = upload_ok(&c.http[a], &format!("{run}/lonely.bin"), &lonely);
    assert_eq!(s, 200, "upload with a quorum back: {b}\n{}", c.logs());

    // GC: deleting the artifacts frees their blobs on every live server (grace 2 s).
    for p in ["model", "lonely.bin"] {
        let (s, b) = http(&c.http[b2], "DELETE", &format!("{ART}/{run}/{p}"), b"");
        assert_eq!(s, 200, "delete {p}: {}", String::from_utf8_lossy(&b));
    }
    let gone = [sha(&big), sha(&lonely)];
    wait_for("unreferenced blobs collected", Duration::from_secs(30), || {
        survivors.iter().all(|i| gone.iter().all(|h| !c.blob_file(*i, h).exists())).then_some(())
    });
    assert!(survivors.iter().all(|i| c.blob_file(*i, &sha(&small)).exists()), "a blob still named stays");
    assert_eq!(download(&c.http[a], &format!("{run}/notes.txt")).1, small);
}

#[test]
fn mlflow_artifacts_of_an_older_version_are_imported() {
    // What an mlp from before the replicated index left: a pointer file by path, the blob by hash.
    let mut dev = Dev::start();
    dev.kill9();
    let data = bytes(70_000, 3);
    let h = sha(&data);
    let root = dev.data_dir().join("server").join("artifacts");
    let blob = root.join("blobs").join(&h[..2]).join(&h);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, &data).unwrap();
    let pointer = root.join("paths").join("0").join("old").join("artifacts").join("m.bin");
    std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
    std::fs::write(&pointer, serde_json::json!({ "sha256": h, "size": data.len() }).to_string()).unwrap();
    dev.spawn();
    wait_for("the older artifact imported", Duration::from_secs(30), || {
        (list(&dev.http, "0/old/artifacts") == vec![("m.bin".to_string(), false, Some(data.len() as u64))]).then_some(())
    });
    assert_eq!(download(&dev.http, "0/old/artifacts/m.bin"), (200, data));
    wait_for("the pointer files removed", Duration::from_secs(10), || (!root.join("paths").exists()).then_some(()));
}

// ---- S3 through moto and MLflow's own client ----

fn venv() -> PathBuf {
    std::env::var_os("MLP_MLFLOW_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/mlp-test/mlflow-venv"))
}

/// The venv's python with mlflow-skinny and moto's server, failing the test with what is
/// missing and how to get it.
fn venv_with_moto() -> (PathBuf, PathBuf) {
    let venv = venv();
    let (python, moto) = (venv.join("bin").join("python"), venv.join("bin").join("moto_server"));
    let how = format!(
        "create it with `python3 -m venv {v} && {v}/bin/pip install mlflow-skinny 'moto[server]'` (.ci/run does this; \
         MLP_MLFLOW_VENV names another venv)",
        v = venv.display()
    );
    assert!(python.exists(), "missing the test virtualenv: {} does not exist; {how}", python.display());
    let probe = Command::new(&python).args(["-c", "import mlflow, requests, moto, flask"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "mlflow-skinny or moto[server] is not installed in {}: {}; {how}",
            venv.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("{} does not run ({e}); {how}", python.display()),
    }
    assert!(moto.exists(), "missing {}: {how}", moto.display());
    (python, moto)
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s3_keys(endpoint: &str, bucket: &str, prefix: &str) -> String {
    let (s, b) = http(endpoint, "GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), b"");
    assert_eq!(s, 200, "listing the bucket: {}", String::from_utf8_lossy(&b));
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn mlflow_artifacts_in_s3_through_the_mlflow_client() {
    let (python, moto_server) = venv_with_moto();
    let port = free_ports(1)[0];
    let endpoint = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto(
        Command::new(&moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("moto.log")).expect("log")))
            .spawn()
            .expect("start moto_server"),
    );
    wait_for("moto_server to listen", Duration::from_secs(60), || TcpStream::connect(&endpoint).ok());
    // moto takes unsigned requests: make the bucket.
    let (s, b) = http(&endpoint, "PUT", "/mlp-art", b"");
    assert_eq!(s, 200, "create bucket: {}", String::from_utf8_lossy(&b));

    let url = format!("http://{endpoint}");
    let creds = [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];
    let dev = Dev::start_with_env(
        &["--artifact-store", "s3://mlp-art/runs", "--s3-endpoint", &url, "--s3-region", "us-east-1", "--artifact-gc-grace", "1s"],
        &creds,
    );
    let script = common::repo_root().join("tests").join("mlflow").join("s3_client.py");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let (status, out, err) = common::run_mlflow_script(&python, &script, &[&work], &dev.http, 60);
    let ok = status.is_some_and(|s| s.success()) && out.contains("mlflow s3 artifacts: ok");
    assert!(
        ok,
        "the MLflow client script failed ({status:?}):\nstdout:\n{out}\nstderr:\n{}\nserver log:\n{}",
        common::tail(&err, 8000),
        common::tail(&dev.log(), 4000)
    );
    // The bytes are in the bucket, by sha256, under the prefix; none on the server's disk.
    let run_id = out.lines().find_map(|l| l.strip_prefix("run_id=")).expect("the script prints the run id").trim().to_string();
    let model = std::fs::read(work.join("model.bin")).expect("the script's file");
    let keys = s3_keys(&endpoint, "mlp-art", "runs/");
    assert!(keys.contains(&format!("runs/{}", sha(&model))), "blob not in the bucket: {keys}");
    assert!(!blob_files(&dev.data_dir().join("server").join("artifacts").join("blobs")), "S3 mode keeps no blobs on disk");

    // Deleting the run's artifacts frees the object (GC grace 1 s).
    let (s, b) = http(&dev.http, "DELETE", &format!("{ART}/0/{run_id}/artifacts"), b"");
    assert_eq!(s, 200, "delete: {}", String::from_utf8_lossy(&b));
    wait_for("the unreferenced object deleted from the bucket", Duration::from_secs(30), || {
        (!s3_keys(&endpoint, "mlp-art", "runs/").contains(&sha(&model))).then_some(())
    });
    drop(moto);
}

fn blob_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}
