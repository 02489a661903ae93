//! Test harness: runs the real `mlp` binary (`mlp dev` on a temp data dir, ports chosen by the
//! OS) and the CLI against it. Guards kill the cluster and every task process it left behind,
//! also when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use prereq::mlp;

// Also loaded by the other harness in tests that use both (`ha_ops`).
#[allow(clippy::duplicate_mod)]
#[path = "../prereq/mod.rs"]
pub mod prereq;

// Also loaded by the multi-host harness (`ha_ops` uses both).
#[allow(clippy::duplicate_mod)]
pub mod pinned;

/// What a test that runs `exec` tasks needs (root and a cgroup hierarchy); see
/// [`prereq::require`]: `false` (skip) only under `MLP_TEST_ALLOW_SKIP=1`, else a failure that
/// names what is missing.
pub fn require_exec() -> bool {
    prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups])
}

/// An allocation's `client_status` from its JSON view.
pub fn status(a: &serde_json::Value) -> &str {
    a["client_status"].as_str().unwrap_or("")
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `mlp dev` process on its own data dir; or ([`Dev::start_split`]) an `mlp server` and a
/// separate `mlp agent` on the same layout (`data/server`, `data/agent`), so that the agent can
/// crash alone.
pub struct Dev {
    pub child: Option<Child>,
    /// The separate agent of a split cluster.
    pub agent: Option<Child>,
    pub dir: tempfile::TempDir,
    pub grpc: String,
    pub http: String,
    /// Flags added to every `mlp dev` start of this guard (`Dev::start_with`).
    pub extra_args: Vec<String>,
    /// Environment variables of the `mlp dev` process (`Dev::start_with_env`).
    pub env: Vec<(String, String)>,
    /// Flags added to every start of a split cluster's agent (`Dev::start_split_with`).
    pub agent_args: Vec<String>,
    /// Environment variables of every CLI call (`Dev::cli`), e.g. the TLS client's files.
    pub cli_env: Vec<(String, String)>,
}

impl Dev {
    pub fn start() -> Dev {
        Dev::start_with(&[])
    }

    /// A dev cluster started with these extra `mlp dev` flags.
    pub fn start_with(extra_args: &[&str]) -> Dev {
        Dev::start_with_env(extra_args, &[])
    }

    /// A dev cluster started with these extra flags and environment variables.
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Dev {
        let mut dev = Dev::unstarted(extra_args);
        dev.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        dev.spawn();
        dev
    }

    /// The guard on a fresh temp dir, nothing started yet.
    fn unstarted(extra_args: &[&str]) -> Dev {
        let dir = tempfile::Builder::new().prefix("mlp-test-").tempdir().expect("tempdir");
        Dev {
            child: None,
            agent: None,
            dir,
            grpc: String::new(),
            http: String::new(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            agent_args: Vec::new(),
            cli_env: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts) the dev process on the same data dir.
    pub fn spawn(&mut self) {
        let mut child = Command::new(mlp())
            // A relative --data-dir, as in the README's quick start (`./mlp-data` by default);
            // the process runs from the temp dir's parent so that its own cwd is not inside
            // the cluster's dir (where `processes_under` looks for task processes).
            .args(["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(Path::new(self.dir.path().file_name().expect("temp dir name")).join("data"))
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.dir.path().parent().expect("temp dir parent"))
            .env("MLP_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("dev.log")).expect("log file"),
            ))
            .spawn()
            .expect("spawn mlp dev");
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);
        // `mlp dev` prints its addresses, then "==> try:" once its agent is up too.
        match announced_addresses(stdout, |line, _| line.contains("==> try:")) {
            Some((g, h)) => {
                self.grpc = g;
                self.http = h;
            }
            None => panic!("mlp dev did not start:\n{}", self.log()),
        }
    }

    /// `mlp server` (one node) plus `mlp agent`, each its own process.
    pub fn start_split() -> Dev {
        Dev::start_split_with(&[], &[])
    }

    /// A split cluster whose server and agent get these extra flags (paths relative to the
    /// temp dir's parent, the processes' working directory; absolute ones are simplest).
    pub fn start_split_with(server_args: &[&str], agent_args: &[&str]) -> Dev {
        let mut dev = Dev::unstarted(&[]);
        dev.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
        let data = Path::new(dev.dir.path().file_name().expect("temp dir name")).join("data");
        let mut child = Command::new(mlp())
            .args(["server", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data.join("server"))
            .args(server_args)
            .current_dir(dev.dir.path().parent().expect("temp dir parent"))
            .env("MLP_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(dev.log_file("server.log")))
            .spawn()
            .expect("spawn mlp server");
        let stdout = child.stdout.take().expect("stdout");
        dev.child = Some(child);
        match announced_addresses(stdout, |_, both| both) {
            Some((g, h)) => {
                dev.grpc = g;
                dev.http = h;
            }
            None => panic!("mlp server did not start:\n{}", std::fs::read_to_string(dev.dir.path().join("server.log")).unwrap_or_default()),
        }
        dev.spawn_agent();
        dev
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(name)).expect("log file")
    }

    /// Starts (or restarts) the split cluster's agent on its data dir; its log is appended to
    /// `agent.log`.
    pub fn spawn_agent(&mut self) {
        let data = Path::new(self.dir.path().file_name().expect("temp dir name")).join("data");
        let child = Command::new(mlp())
            .args(["agent", "--servers", &self.grpc, "--node-name", "split", "--rpc-addr", "127.0.0.1:0"])
            // The tests run raw_exec tasks; an agent offers it only when asked (issue 15 §4).
            .arg("--enable-raw-exec")
            .arg("--data-dir")
            .arg(data.join("agent"))
            .args(&self.agent_args)
            .current_dir(self.dir.path().parent().expect("temp dir parent"))
            .env("MLP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.log_file("agent.log")))
            .stderr(Stdio::from(self.log_file("agent.log")))
            .spawn()
            .expect("spawn mlp agent");
        self.agent = Some(child);
    }

    /// kill -9 the split cluster's agent alone; returns its pid.
    pub fn kill9_agent(&mut self) -> Option<u32> {
        let mut c = self.agent.take()?;
        let pid = c.id();
        let _ = c.kill();
        let _ = c.wait();
        Some(pid)
    }

    /// The split agent's log, without terminal colour codes.
    pub fn agent_log(&self) -> String {
        let raw = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI sequence: ESC [ … final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) && c != '[' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    /// kill -9 the dev process (tasks it started stay, as they would on a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(mlp())
            .args(args)
            .env("MLP_ADDR", &self.grpc)
            .envs(self.cli_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run mlp")
    }

    /// Runs the CLI and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "mlp {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndev log tail: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 3000)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("mlp {args:?}: not JSON ({e}): {out}"))
    }

    /// `mlp job status NAME --json`.
    pub fn job(&self, name: &str) -> serde_json::Value {
        self.json(&["job", "status", name, "--json"])
    }

    /// Waits until the job's allocations satisfy `pred`, returns them.
    pub fn wait_allocs(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        wait_for(what, timeout, || {
            let v = self.job(job);
            let allocs = v["allocations"].as_array().cloned().unwrap_or_default();
            pred(&allocs).then_some(allocs)
        })
    }

    /// Writes a job file into the test dir.
    pub fn write_job(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).expect("write job");
        p
    }

    /// A raw HTTP/1.1 request to the HTTP API; returns (status, body).
    pub fn http(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
        http_request(&self.http, method, path, content_type, body)
    }
}

/// The gRPC and HTTP addresses a starting `mlp dev` or `mlp server` prints on stdout, once
/// `ready(line, both_seen)` says it is up; None if that does not happen within 60 s. The
/// reader thread keeps draining stdout afterwards, so the process never blocks on it.
fn announced_addresses(stdout: std::process::ChildStdout, ready: fn(&str, bool) -> bool) -> Option<(String, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut grpc, mut http) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.trim().strip_prefix("gRPC:") {
                grpc = Some(v.trim().to_string());
            }
            if let Some(v) = line.trim().strip_prefix("HTTP:") {
                http = Some(v.trim().trim_start_matches("https://").trim_start_matches("http://").to_string());
            }
            if ready(&line, grpc.is_some() && http.is_some()) {
                let _ = tx.send(grpc.take().zip(http.take()));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).ok().flatten()
}

/// Where the virtualenv with mlflow-skinny lives (`.ci/run` creates it there).
pub fn mlflow_venv() -> PathBuf {
    std::env::var_os("MLP_MLFLOW_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/mlp-test/mlflow-venv"))
}

/// The venv's python, failing the test with what is missing and how to get it.
pub fn mlflow_python() -> PathBuf {
    let venv = mlflow_venv();
    let python = venv.join("bin").join("python");
    let how = format!(
        "create it with `python3 -m venv {v} && {v}/bin/pip install mlflow-skinny` (.ci/run does this; \
         MLP_MLFLOW_VENV names another venv)",
        v = venv.display()
    );
    assert!(python.exists(), "missing the mlflow-skinny virtualenv: {} does not exist; {how}", python.display());
    let probe = Command::new(&python).args(["-c", "import mlflow, requests; print(mlflow.__version__)"]).output();
    match probe {
        Ok(o) if o.status.success() => python,
        Ok(o) => panic!("mlflow-skinny is not installed in {}: {}; {how}", venv.display(), String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => panic!("{} does not run ({e}); {how}", python.display()),
    }
}

pub fn http_request(addr: &str, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
    http_request_as(addr, "", method, path, content_type, body)
}

/// `http_request` with an ACL token in `X-MLP-Token` (none when empty).
pub fn http_request_as(addr: &str, token: &str, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
    let headers: Vec<(&str, &str)> = if token.is_empty() { vec![] } else { vec![("X-MLP-Token", token)] };
    http_request_with(addr, &headers, method, path, content_type, body)
}

/// `http_request` with extra request headers.
pub fn http_request_with(
    addr: &str,
    headers: &[(&str, &str)],
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes chunked transfer encoding well enough for JSON bodies.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Whether a process exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The process group of a process (field 5 of /proc/PID/stat).
pub fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Ids of the allocations of every agent data dir under `dir` (`<...>/allocs/<id>`).
pub fn alloc_ids_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() || path.is_symlink() {
                continue;
            }
            if e.file_name() == "allocs" {
                if let Ok(allocs) = std::fs::read_dir(&path) {
                    out.extend(allocs.flatten().map(|a| a.file_name().to_string_lossy().into_owned()));
                }
            } else if depth > 0 {
                walk(&path, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 3, &mut out);
    out
}

/// The value of `key` in a process's environment.
pub fn environ_var(pid: i32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')).map(str::to_string)
    })
}

/// Pids of the task processes of a test cluster under `dir`: processes whose working directory
/// is inside `dir` (raw_exec tasks, task supervisors) or whose `MLP_ALLOC_ID` names one of its
/// allocations (exec tasks, whose working directory is inside their own root).
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let allocs = alloc_ids_under(dir);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| is_under(pid, dir, &allocs))
        .collect()
}

/// Whether live process `pid` is one of `processes_under(dir)` (`allocs`: the ids under `dir`).
fn is_under(pid: i32, dir: &Path, allocs: &[String]) -> bool {
    let by_cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir));
    let by_env = || environ_var(pid, "MLP_ALLOC_ID").is_some_and(|id| allocs.contains(&id));
    (by_cwd || by_env()) && pid_alive(pid)
}

/// Whether process `pid` is in task cgroup `cg` (a directory under a hierarchy's mount point):
/// some line of `/proc/<pid>/cgroup` ends in the cgroup's path below its hierarchy.
fn in_cgroup(pid: i32, cg: &Path) -> bool {
    let (Some(name), Some(parent)) = (cg.file_name(), cg.parent().and_then(Path::file_name)) else {
        return false;
    };
    let tail = format!("/{}/{}", parent.to_string_lossy(), name.to_string_lossy());
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| text.lines().any(|l| l.ends_with(&tail)))
}

/// Task cgroup directories (every hierarchy) of the allocations under `dir`.
pub fn cgroups_under(dir: &Path) -> Vec<PathBuf> {
    let allocs = alloc_ids_under(dir);
    let mut parents = vec![PathBuf::from("/sys/fs/cgroup/mlp")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        parents.extend(entries.flatten().map(|e| e.path().join("mlp")));
    }
    let mut out = Vec::new();
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if allocs.iter().any(|a| name.starts_with(&format!("{a}."))) {
                out.push(e.path());
            }
        }
    }
    out
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        self.kill9_agent();
        self.kill9();
        // Tasks run in their own sessions: kill whatever still runs inside this cluster's dir
        // (each checked again once pinned: its number may name another test's process by now).
        let dir = self.dir.path();
        let allocs = alloc_ids_under(dir);
        for pid in processes_under(dir) {
            pinned::kill_if(pid, |p| is_under(p, dir, &allocs));
        }
        // exec tasks' cgroups outlive a killed agent: empty them and remove them.
        let deadline = Instant::now() + Duration::from_secs(5);
        for cg in cgroups_under(dir) {
            while std::fs::remove_dir(&cg).is_err() && cg.exists() && Instant::now() < deadline {
                for pid in std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines() {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        pinned::kill_if(pid, |p| in_cgroup(p, &cg));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Dev {
    /// A failed test's evidence: the end of each of this cluster's logs, on stderr (which the
    /// test runner shows for a failing test), before the temp dir goes.
    fn print_log_tails(&self) {
        for name in ["dev.log", "server.log", "agent.log"] {
            let Ok(text) = std::fs::read_to_string(self.dir.path().join(name)) else { continue };
            eprintln!("---- the end of {name} ----\n{}", tail(&text, 12_000));
        }
    }
}

/// An `mlp agent` process for node `name` on `data_dir` against `servers`, with `extra` flags,
/// its output appended to `log`.
pub fn agent_process(servers: &str, name: &str, data_dir: &Path, log: &Path, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("agent log");
    Command::new(mlp())
        .args(["agent", "--servers", servers, "--node-name", name, "--rpc-addr", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .env("MLP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("agent log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn mlp agent")
}

/// The workspace root (for examples/).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs an MLflow client script (`python script args…`) against the HTTP address `http` with
/// MLflow's client settings for tests (no telemetry, one retry, `timeout_s` per request) and
/// waits for it at most 300 s (killed then). Returns its exit status (None: killed), stdout and
/// stderr.
#[allow(dead_code)]
pub fn run_mlflow_script(
    python: &Path,
    script: &Path,
    args: &[&Path],
    http: &str,
    timeout_s: u32,
) -> (Option<std::process::ExitStatus>, String, String) {
    run_mlflow_script_env(python, script, args, http, timeout_s, &[])
}

/// `run_mlflow_script` with more environment variables (`MLFLOW_WORKSPACE`, ...).
pub fn run_mlflow_script_env(
    python: &Path,
    script: &Path,
    args: &[&Path],
    http: &str,
    timeout_s: u32,
    env: &[(&str, &str)],
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child = Command::new(python)
        .envs(env.iter().copied())
        .arg(script)
        .args(args)
        .env("MLFLOW_TRACKING_URI", format!("http://{http}"))
        .env("MLFLOW_DISABLE_TELEMETRY", "true")
        .env("DO_NOT_TRACK", "true")
        .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        .env("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout_s.to_string())
        .env_remove("MLFLOW_REGISTRY_URI")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the client script");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    (status, out, err)
}

/// What a task of an allocation wrote to stdout (or stderr), through `mlp alloc logs`.
pub fn logs(dev: &Dev, alloc: &str, task: &str, stderr: bool) -> String {
    let mut args = vec!["alloc", "logs", alloc, task];
    if stderr {
        args.push("--stderr");
    }
    String::from_utf8_lossy(&dev.cli(&args).stdout).into_owned()
}

/// The value of a `key=value` line printed by a task.
pub fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}
