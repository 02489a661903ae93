//! `artifact` blocks (`mlp_agent::artifact`) against a real HTTP server on loopback (a small
//! one in this file, so each test controls its answers) and real files: checksums, archives,
//! retries, `file://` roots, and destinations that must stay inside the task dir.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlp_agent::artifact::{fetch_all, ArtifactError, ArtifactSettings};
use mlp_proto::v1::Artifact;
use sha2::Digest;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Serves `routes` (path → (status, body)); a route listed in `fail_first` answers 503 that
/// many times first. Counts requests per path.
struct Http {
    addr: String,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Http {
    fn start(routes: BTreeMap<String, (u16, Vec<u8>)>, fail_first: BTreeMap<String, usize>) -> std::io::Result<Http> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = format!("http://{}", listener.local_addr()?);
        let hits: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let count = {
                    let mut hits = h.lock().unwrap_or_else(|p| p.into_inner());
                    let c = hits.entry(path.clone()).or_insert(0);
                    *c += 1;
                    *c
                };
                let (status, body) = if fail_first.get(&path).is_some_and(|f| count <= *f) {
                    (503, b"busy".to_vec())
                } else {
                    routes.get(&path).cloned().unwrap_or((404, b"no such file".to_vec()))
                };
                let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        Ok(Http { addr, hits })
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap_or_else(|p| p.into_inner()).get(path).copied().unwrap_or(0)
    }
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>())
}

fn art(source: &str, destination: &str, checksum: &str, mode: &str) -> Artifact {
    Artifact { source: source.into(), destination: destination.into(), checksum: checksum.into(), mode: mode.into() }
}

fn tar_gz(files: &[(&str, &[u8])]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o4755); // setuid: must not survive the unpack
        h.set_cksum();
        b.append_data(&mut h, name, *data)?;
    }
    Ok(b.into_inner()?.finish()?)
}

/// A tar whose one entry is named `name` verbatim (the builder refuses `..`).
fn raw_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(512 + data.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn fetch(settings: &ArtifactSettings, dir: &Path, arts: &[Artifact]) -> Result<Vec<String>, ArtifactError> {
    let lines = Mutex::new(Vec::new());
    let report = |l: String| lines.lock().unwrap_or_else(|p| p.into_inner()).push(l);
    rt().block_on(fetch_all(settings, dir, arts, &report))?;
    Ok(lines.into_inner().unwrap_or_default())
}

#[test]
fn files_and_archives_arrive_verified_and_a_wrong_checksum_refuses() -> TestResult {
    let model = b"weights v1".to_vec();
    let archive = tar_gz(&[("data/hello.txt", b"hello"), ("data/sub/run.sh", b"#!/bin/sh\n")])?;
    let routes = BTreeMap::from([("/model.bin".to_string(), (200, model.clone())), ("/data.tar.gz".to_string(), (200, archive.clone()))]);
    let http = Http::start(routes, BTreeMap::new())?;
    let dir = tempfile::tempdir()?;
    let settings = ArtifactSettings::default();
    let lines = fetch(
        &settings,
        dir.path(),
        &[
            art(&format!("{}/model.bin", http.addr), "", &sha256(&model), ""),
            art(&format!("{}/data.tar.gz", http.addr), "local/in", &sha256(&archive), ""),
            art(&format!("{}/model.bin", http.addr), "local/renamed.bin", "", "file"),
        ],
    )?;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(std::fs::read(dir.path().join("local/model.bin"))?, model);
    assert_eq!(std::fs::read(dir.path().join("local/in/data/hello.txt"))?, b"hello");
    assert_eq!(std::fs::read(dir.path().join("local/renamed.bin"))?, model);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("local/in/data/sub/run.sh"))?.permissions());
    assert_eq!(mode & 0o7777, 0o755, "setuid stripped, mode {mode:o}");
    // No temporary file is left behind.
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path())?.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".part")).collect();
    assert!(leftovers.is_empty());

    let other = tempfile::tempdir()?;
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = fetch(&settings, other.path(), &[art(&format!("{}/model.bin", http.addr), "", &wrong, "")]).expect_err("mismatch refused");
    assert!(matches!(err, ArtifactError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(&sha256(&model)), "the error names what arrived: {err}");
    assert!(!other.path().join("local/model.bin").exists(), "a file that failed its checksum is not placed");
    Ok(())
}

#[test]
fn server_errors_are_retried_and_client_errors_are_not() -> TestResult {
    let routes = BTreeMap::from([("/flaky.bin".to_string(), (200, b"ok".to_vec()))]);
    let http = Http::start(routes, BTreeMap::from([("/flaky.bin".to_string(), 2)]))?;
    let dir = tempfile::tempdir()?;
    let settings = ArtifactSettings { timeout: Duration::from_secs(30), ..Default::default() };
    fetch(&settings, dir.path(), &[art(&format!("{}/flaky.bin", http.addr), "", "", "")])?;
    assert_eq!(http.hits("/flaky.bin"), 3, "two 503s, then the file");
    assert_eq!(std::fs::read(dir.path().join("local/flaky.bin"))?, b"ok");
    let err = fetch(&settings, dir.path(), &[art(&format!("{}/missing.bin", http.addr), "", "", "")]).expect_err("404 fails");
    assert!(err.to_string().contains("404") && err.to_string().contains("after 1 attempt"), "{err}");
    assert_eq!(http.hits("/missing.bin"), 1, "a 404 is not retried");
    // Nothing listening: a clear error, within the deadline.
    let gone = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let quick = ArtifactSettings { timeout: Duration::from_secs(5), ..Default::default() };
    let err = fetch(&quick, dir.path(), &[art(&format!("http://{gone}/x.bin"), "", "", "")]).expect_err("nothing listening");
    assert!(matches!(err, ArtifactError::Fetch { .. }), "{err}");
    Ok(())
}

#[test]
fn nothing_lands_outside_the_task_dir() -> TestResult {
    let evil = raw_tar("../escaped.txt", b"gotcha");
    let http = Http::start(BTreeMap::from([("/evil.tar".to_string(), (200, evil))]), BTreeMap::new())?;
    let root = tempfile::tempdir()?;
    let task = root.path().join("task");
    std::fs::create_dir_all(task.join("local"))?;
    let settings = ArtifactSettings::default();
    let err = fetch(&settings, &task, &[art(&format!("{}/evil.tar", http.addr), "local/x", "", "")]).expect_err("`..` entry refused");
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!root.path().join("task/local/escaped.txt").exists() && !root.path().join("task/escaped.txt").exists());
    // A symlink in the task dir cannot redirect a destination out of it.
    let outside = tempfile::tempdir()?;
    std::os::unix::fs::symlink(outside.path(), task.join("local/link"))?;
    let http2 = Http::start(BTreeMap::from([("/f.bin".to_string(), (200, b"x".to_vec()))]), BTreeMap::new())?;
    let err = fetch(&settings, &task, &[art(&format!("{}/f.bin", http2.addr), "local/link/sub", "", "")]).expect_err("symlink refused");
    assert!(err.to_string().contains("outside the task dir"), "{err}");
    assert!(std::fs::read_dir(outside.path())?.next().is_none(), "nothing written through the symlink");
    Ok(())
}

#[test]
fn file_sources_only_under_the_agents_roots() -> TestResult {
    let root = tempfile::tempdir()?;
    std::fs::write(root.path().join("dataset.csv"), b"a,b\n1,2\n")?;
    let elsewhere = tempfile::tempdir()?;
    std::fs::write(elsewhere.path().join("secret"), b"no")?;
    let task = tempfile::tempdir()?;
    let src = |p: &Path| format!("file://{}", p.display());
    let off = ArtifactSettings::default();
    let err = fetch(&off, task.path(), &[art(&src(&root.path().join("dataset.csv")), "", "", "")]).expect_err("no roots: refused");
    assert!(err.to_string().contains("--artifact-file-root"), "{err}");
    let on = ArtifactSettings { file_roots: vec![root.path().to_path_buf()], ..Default::default() };
    fetch(&on, task.path(), &[art(&src(&root.path().join("dataset.csv")), "local/data/", "", "")])?;
    assert_eq!(std::fs::read(task.path().join("local/data/dataset.csv"))?, b"a,b\n1,2\n");
    let err = fetch(&on, task.path(), &[art(&src(&elsewhere.path().join("secret")), "", "", "")]).expect_err("outside the root");
    assert!(err.to_string().contains("not under"), "{err}");
    // A symlink inside the root that points out of it does not widen it.
    std::os::unix::fs::symlink(elsewhere.path().join("secret"), root.path().join("link"))?;
    assert!(fetch(&on, task.path(), &[art(&src(&root.path().join("link")), "", "", "")]).is_err());
    Ok(())
}
