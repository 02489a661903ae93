//! Mutual TLS and node identity end to end (issue 15 §1 and §3), on real `mlp server` and
//! `mlp agent` processes with certificates made by `mlp tls`.

mod common;
mod prereq;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mlp, status, wait_for, Dev};
use mlp_proto::v1::agent_service_client::AgentServiceClient;
use mlp_proto::v1::client_service_client::ClientServiceClient;
use mlp_proto::v1::cluster_service_client::ClusterServiceClient;
use mlp_proto::v1::node_service_client::NodeServiceClient;
use mlp_proto::v1::raft_service_client::RaftServiceClient;
use mlp_proto::v1::{
    ForwardRequest, GetBlobRequest, GetNodeRequest, HeartbeatRequest, JoinRequest, ListNodesRequest, ListPeersRequest, LogsRequest, Node,
    RaftPayload, RegisterNodeRequest, UpdateAllocsRequest, WatchAllocationsRequest,
};
use mlp_tls::{Role, Tls, TlsFiles};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A CA and one certificate per role, made with `mlp tls` in a temp dir.
struct Certs {
    dir: tempfile::TempDir,
}

fn mlp_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(mlp()).args(args).current_dir(dir).stdin(Stdio::null()).output().expect("run mlp");
    assert!(out.status.success(), "mlp {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::Builder::new().prefix("mlp-tls-certs-").tempdir().expect("tempdir");
        mlp_in(dir.path(), &["tls", "ca", "create"]);
        // Nomad's single-dash spelling, and the long one.
        let out = mlp_in(dir.path(), &["tls", "cert", "create", "-server"]);
        assert!(out.contains("mlp-server.pem"), "{out}");
        mlp_in(dir.path(), &["tls", "cert", "create", "--agent"]);
        mlp_in(dir.path(), &["tls", "cert", "create", "-client"]);
        Certs { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
    /// `--ca-file … --cert-file … --key-file …` for a role's files.
    fn flags(&self, role: &str) -> Vec<String> {
        vec![
            "--ca-file".into(),
            self.p("mlp-ca.pem"),
            "--cert-file".into(),
            self.p(&format!("mlp-{role}.pem")),
            "--key-file".into(),
            self.p(&format!("mlp-{role}-key.pem")),
        ]
    }
    fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("MLP_CACERT".into(), self.p("mlp-ca.pem")),
            ("MLP_CLIENT_CERT".into(), self.p("mlp-client.pem")),
            ("MLP_CLIENT_KEY".into(), self.p("mlp-client-key.pem")),
        ]
    }
    fn identity(&self, role: &str) -> Arc<Tls> {
        Tls::load(TlsFiles {
            ca_file: self.path("mlp-ca.pem"),
            cert_file: self.path(&format!("mlp-{role}.pem")),
            key_file: self.path(&format!("mlp-{role}-key.pem")),
        })
        .expect("load identity")
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A split cluster (server + agent processes) with mutual TLS; the CLI calls carry the client
/// certificate.
fn tls_cluster(certs: &Certs) -> Dev {
    let server = certs.flags("server");
    let agent = certs.flags("agent");
    let mut dev = Dev::start_split_with(&strs(&server), &strs(&agent));
    dev.cli_env = certs.cli_env();
    wait_for("the TLS agent's node to be ready", Duration::from_secs(60), || dev.ok(&["node", "status"]).contains("ready").then_some(()));
    dev
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn channel(addr: &str, tls: Option<&Arc<Tls>>, role: Role) -> Result<Channel, tonic::transport::Error> {
    let ep = Endpoint::from_shared(mlp_tls::net::uri_for(addr, tls.is_some())).expect("endpoint").connect_timeout(Duration::from_secs(5));
    mlp_tls::net::channel(ep, tls, role).await
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn host_port(addr: &str) -> (String, u16) {
    let (h, p) = addr.rsplit_once(':').expect("host:port");
    (h.to_string(), p.parse().expect("port"))
}

const JOB: &str = r#"
job "tls-hello" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo hello-over-tls; sleep 30"]
      }
      resources {
        cpu    = 100
        memory = 32
      }
    }
  }
}
"#;

#[test]
fn tls_refuses_plaintext_and_callers_without_the_role_and_runs_a_job() {
    let certs = Certs::new();
    let dev = tls_cluster(&certs);
    let rt = rt();

    // Plaintext is refused: the CLI without certificates, and a plaintext HTTP request.
    let out = Command::new(mlp()).args(["node", "status"]).env("MLP_ADDR", &dev.grpc).stdin(Stdio::null()).output().expect("run mlp");
    assert!(!out.status.success(), "a plaintext CLI call succeeded: {}", String::from_utf8_lossy(&out.stdout));
    let (status, _) = common::http_request(&dev.http, "GET", "/v1/status/leader", None, b"");
    assert_ne!(status, 200, "the HTTP API answered plaintext");
    // An https:// address without certificates says what to set.
    let out = Command::new(mlp())
        .args(["node", "status"])
        .env("MLP_ADDR", format!("https://{}", dev.grpc))
        .stdin(Stdio::null())
        .output()
        .expect("run mlp");
    assert!(String::from_utf8_lossy(&out.stderr).contains("MLP_CLIENT_CERT"), "{}", String::from_utf8_lossy(&out.stderr));

    // The HTTP API over TLS with the client certificate.
    let client = certs.identity("client");
    let (host, port) = host_port(&dev.http);
    let body = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = mlp_tls::net::connect(&host, port, &client, Role::Server).await.expect("TLS to the HTTP API");
        s.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: mlp\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    rt.block_on(async {
        let ch = channel(&dev.grpc, Some(&client), Role::Server).await.expect("client certificate connects");
        // Server-to-server RPCs refuse a client certificate: Raft, Join, a forged Forward.
        let r = RaftServiceClient::new(ch.clone()).append_entries(RaftPayload { data: b"{}".to_vec() }).await;
        assert_eq!(code(r), Code::PermissionDenied, "AppendEntries from a client certificate");
        // Artifact blobs travel between servers only.
        let r = RaftServiceClient::new(ch.clone()).get_blob(GetBlobRequest { sha256: "0".repeat(64) }).await;
        assert_eq!(code(r), Code::PermissionDenied, "GetBlob from a client certificate");
        let r = ClusterServiceClient::new(ch.clone()).join(JoinRequest { id: 4242, addr: "127.0.0.1:1".into() }).await;
        assert_eq!(code(r), Code::PermissionDenied, "Join from a client certificate");
        let forged = br#"{"now_ms":1,"command":{"UpsertEvals":{"evals":[]}}}"#.to_vec();
        let r = ClusterServiceClient::new(ch.clone()).forward(ForwardRequest { request: forged.clone() }).await;
        assert_eq!(code(r), Code::PermissionDenied, "Forward from a client certificate");
        // Agent RPCs need the agent role.
        let r = AgentServiceClient::new(ch.clone()).register(RegisterNodeRequest { node: Some(Node::default()) }).await;
        assert_eq!(code(r), Code::PermissionDenied, "Register from a client certificate");
        // The operator's and the public API's RPCs take any certificate of the CA.
        let r = ClusterServiceClient::new(ch.clone()).list_peers(ListPeersRequest {}).await;
        assert_eq!(code(r), Code::Ok, "ListPeers from a client certificate");

        // An agent certificate cannot forge a Forward either.
        let agent = certs.identity("agent");
        let ch = channel(&dev.grpc, Some(&agent), Role::Server).await.expect("agent certificate connects");
        let r = ClusterServiceClient::new(ch).forward(ForwardRequest { request: forged }).await;
        assert_eq!(code(r), Code::PermissionDenied, "Forward from an agent certificate");

        // A certificate of another CA does not even connect.
        let other = Certs::new();
        let stranger = other.identity("server");
        let r = match channel(&dev.grpc, Some(&stranger), Role::Server).await {
            Err(_) => Code::Unavailable,
            Ok(ch) => code(NodeServiceClient::new(ch).list(ListNodesRequest::default()).await),
        };
        assert_ne!(r, Code::Ok, "a certificate of another CA was accepted");
    });

    // An agent with its certificate registered and runs a job; logs and exec reach it through
    // the server over TLS.
    let job = dev.write_job("tls.hcl", JOB);
    dev.ok(&["job", "run", job.to_str().expect("path")]);
    let allocs =
        dev.wait_allocs("tls-hello", "the job to run", Duration::from_secs(60), |a| a.iter().any(|a| common::status(a) == "running"));
    let id = allocs[0]["id"].as_str().expect("alloc id").to_string();
    wait_for("the task's output through the server", Duration::from_secs(20), || {
        dev.ok(&["alloc", "logs", &id]).contains("hello-over-tls").then_some(())
    });
    let out = dev.ok(&["alloc", "exec", &id, "/bin/echo", "exec-over-tls"]);
    assert!(out.contains("exec-over-tls"), "{out}");

    // The agent's own listener serves servers only.
    rt.block_on(async {
        let ch = channel(&dev.grpc, Some(&client), Role::Server).await.expect("connect");
        let nodes = NodeServiceClient::new(ch).list(ListNodesRequest::default()).await.expect("list nodes").into_inner().nodes;
        let agent_addr = nodes[0].rpc_addr.clone();
        let req = LogsRequest { alloc_id: id.clone(), ..Default::default() };
        let ch = channel(&agent_addr, Some(&client), Role::Agent).await.expect("the agent's listener");
        let r = ClientServiceClient::new(ch).logs(req.clone()).await;
        assert_eq!(code(r), Code::PermissionDenied, "the agent served logs to a client certificate");
        let server = certs.identity("server");
        let ch = channel(&agent_addr, Some(&server), Role::Agent).await.expect("the agent's listener");
        let r = ClientServiceClient::new(ch).logs(req).await;
        assert_eq!(code(r), Code::Ok, "the agent refused a server certificate");
    });
    dev.ok(&["job", "stop", "tls-hello"]);
}

/// Replaces `dst` (cert and key) with `src`'s, each by an atomic rename.
fn install(certs: &Certs, src: &str, dst: &str) {
    for (s, d) in [(format!("{src}.pem"), format!("{dst}.pem")), (format!("{src}-key.pem"), format!("{dst}-key.pem"))] {
        let tmp = certs.path(&format!("{d}.tmp"));
        std::fs::copy(certs.path(&s), &tmp).expect("copy");
        std::fs::rename(&tmp, certs.path(&d)).expect("rename");
    }
}

fn der(path: &Path) -> Vec<u8> {
    use mlp_tls::pki_types::pem::PemObject;
    mlp_tls::pki_types::CertificateDer::from_pem_file(path).expect("certificate file").to_vec()
}

fn sighup(child: &Option<Child>) {
    let pid = child.as_ref().expect("process").id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

#[test]
fn tls_certificates_rotate_on_sighup_while_requests_flow() {
    let certs = Certs::new();
    let dev = tls_cluster(&certs);
    let rt = rt();
    let before = der(&certs.path("mlp-server.pem"));

    // Requests keep flowing (a new CLI process, so a new TLS connection, each time).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let (grpc, env) = (dev.grpc.clone(), certs.cli_env());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let out = Command::new(mlp())
                    .args(["node", "status"])
                    .env("MLP_ADDR", &grpc)
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdin(Stdio::null())
                    .output()
                    .expect("run mlp");
                if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ready") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.lock().expect("lock").push(format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        })
    };
    wait_for("requests before the rotation", Duration::from_secs(30), || (ok.load(Ordering::Relaxed) >= 3).then_some(()));

    // New server and agent certificates from the same CA, installed over the old files, then
    // SIGHUP to both processes.
    mlp_in(certs.dir.path(), &["tls", "cert", "create", "-server"]);
    mlp_in(certs.dir.path(), &["tls", "cert", "create", "-agent"]);
    install(&certs, "mlp-server-1", "mlp-server");
    install(&certs, "mlp-agent-1", "mlp-agent");
    let after = der(&certs.path("mlp-server.pem"));
    assert_ne!(before, after);
    sighup(&dev.child);
    sighup(&dev.agent);

    let client = certs.identity("client");
    let (host, port) = host_port(&dev.grpc);
    wait_for("the server to present its new certificate", Duration::from_secs(10), || {
        let now = rt.block_on(mlp_tls::net::peer_certificate(&host, port, &client, Role::Server)).expect("TLS to the server");
        (now.to_vec() == after).then_some(())
    });
    let n = ok.load(Ordering::Relaxed);
    wait_for("requests after the rotation", Duration::from_secs(30), || (ok.load(Ordering::Relaxed) >= n + 3).then_some(()));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rotation: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed) + failures.len(),
        failures.first()
    );

    // The agent's listener presents its new certificate too, and the agent still heartbeats.
    let server = certs.identity("server");
    let agent_addr = rt.block_on(async {
        let ch = channel(&dev.grpc, Some(&client), Role::Server).await.expect("connect");
        NodeServiceClient::new(ch).list(ListNodesRequest::default()).await.expect("list").into_inner().nodes[0].rpc_addr.clone()
    });
    let (ahost, aport) = host_port(&agent_addr);
    let agent_now = rt.block_on(mlp_tls::net::peer_certificate(&ahost, aport, &server, Role::Agent)).expect("TLS to the agent");
    assert_eq!(agent_now.to_vec(), der(&certs.path("mlp-agent.pem")));
    assert!(dev.ok(&["node", "status"]).contains("ready"));
}

/// A process killed when the guard drops.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn with_secret<T>(msg: T, secret: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(mlp_tls::secret::METADATA_KEY, secret.parse().expect("ascii"));
    r
}

#[test]
fn node_secret_keeps_a_node_id_and_its_allocations_to_its_agent() {
    // No TLS: node secrets are issued and required all the same.
    let mut dev = Dev::start_split();
    wait_for("the agent's node to be ready", Duration::from_secs(60), || dev.ok(&["node", "status"]).contains("ready").then_some(()));
    let agent_dir = dev.data_dir().join("agent");
    let node_id = std::fs::read_to_string(agent_dir.join("node-id")).expect("node-id").trim().to_string();
    let secret_file = agent_dir.join("node-secret");
    // The agent made it and wrote it before it first registered.
    let secret = wait_for("the agent to keep its node secret", Duration::from_secs(10), || {
        std::fs::read_to_string(&secret_file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    });
    assert_eq!(secret.len(), 64, "{secret:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&secret_file).expect("stat").permissions().mode() & 0o777, 0o600);

    let rt = rt();
    rt.block_on(async {
        let ch = channel(&dev.grpc, None, Role::Server).await.expect("connect");
        let node: Node = NodeServiceClient::new(ch.clone())
            .get(GetNodeRequest { node_id: node_id.clone(), ..Default::default() })
            .await
            .expect("get node")
            .into_inner()
            .node
            .expect("node");
        let mut agents = AgentServiceClient::new(ch.clone());
        // Registering the node id again without its secret, or with a wrong one: refused.
        let r = agents.register(RegisterNodeRequest { node: Some(node.clone()) }).await;
        assert_eq!(code(r), Code::PermissionDenied, "a second registration of the node id without its secret");
        let wrong = "0".repeat(64);
        let r = agents.register(with_secret(RegisterNodeRequest { node: Some(node.clone()) }, &wrong)).await;
        assert_eq!(code(r), Code::PermissionDenied, "a registration with a wrong secret");
        // Heartbeats and the allocation stream need it too.
        let hb = HeartbeatRequest { node_id: node_id.clone(), gpu_stats: vec![] };
        assert_eq!(code(agents.heartbeat(hb.clone()).await), Code::PermissionDenied);
        assert_eq!(code(agents.heartbeat(with_secret(hb.clone(), &wrong)).await), Code::PermissionDenied);
        let r = agents.watch_allocations(WatchAllocationsRequest { node_id: node_id.clone() }).await;
        assert_eq!(code(r), Code::PermissionDenied, "the node's allocation stream without its secret");

        // Another node's agent, with its own valid secret, cannot read this node's allocations
        // or report for it.
        let mut intruder = node.clone();
        intruder.id = "intruder-node".into();
        intruder.name = "intruder".into();
        intruder.overlay = None;
        let issued = agents
            .register(RegisterNodeRequest { node: Some(intruder) })
            .await
            .expect("a fresh node id registers")
            .into_inner()
            .node_secret;
        assert_eq!(issued.len(), 64, "a fresh registration is issued a secret");
        // A fresh node id claimed with a secret the agent made: nothing is issued; a malformed
        // one is refused.
        let mut own_claim = node.clone();
        own_claim.id = "self-made-node".into();
        own_claim.name = "self-made".into();
        own_claim.overlay = None;
        let made = "ab".repeat(32);
        let resp =
            agents.register(with_secret(RegisterNodeRequest { node: Some(own_claim.clone()) }, &made)).await.expect("claim").into_inner();
        assert!(resp.node_secret.is_empty(), "a secret was issued to an agent that brought one");
        let hb_own = HeartbeatRequest { node_id: "self-made-node".into(), gpu_stats: vec![] };
        assert_eq!(code(agents.heartbeat(with_secret(hb_own, &made)).await), Code::Ok);
        own_claim.id = "malformed-node".into();
        let r = agents.register(with_secret(RegisterNodeRequest { node: Some(own_claim) }, "not-a-secret")).await;
        assert_eq!(code(r), Code::InvalidArgument, "a malformed node secret");
        let r = agents.watch_allocations(with_secret(WatchAllocationsRequest { node_id: node_id.clone() }, &issued)).await;
        assert_eq!(code(r), Code::PermissionDenied, "another node's allocation stream with this node's secret");
        let r = agents.update_allocs(with_secret(UpdateAllocsRequest { node_id: node_id.clone(), updates: vec![] }, &issued)).await;
        assert_eq!(code(r), Code::PermissionDenied, "updates for another node");
        let mut own = agents
            .watch_allocations(with_secret(WatchAllocationsRequest { node_id: "intruder-node".into() }, &issued))
            .await
            .expect("its own stream")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), own.message()).await.expect("first message in time");
        assert!(first.expect("stream").is_some());
        // The real agent's secret works.
        assert_eq!(code(agents.heartbeat(with_secret(hb, &secret)).await), Code::Ok);
    });

    // A second agent process claiming the node id (its node-id file, not its secret) is refused.
    let twin_dir = dev.dir.path().join("twin");
    std::fs::create_dir_all(&twin_dir).expect("mkdir");
    std::fs::write(twin_dir.join("node-id"), format!("{node_id}\n")).expect("write node-id");
    let twin_log = dev.dir.path().join("twin.log");
    let _twin = agent_process(&dev.grpc, "twin", &twin_dir, &twin_log);
    wait_for("the twin's registration to be refused", Duration::from_secs(30), || {
        std::fs::read_to_string(&twin_log).unwrap_or_default().contains("node registration refused").then_some(())
    });
    let text = std::fs::read_to_string(&twin_log).unwrap_or_default();
    assert!(!text.contains("node registered"), "the twin registered the node id:\n{text}");
    // The twin made a secret of its own, which the servers do not take for this node id.
    let twins = std::fs::read_to_string(twin_dir.join("node-secret")).unwrap_or_default();
    assert!(twins.trim() != secret, "the twin holds the node's secret");
    drop(_twin);

    // The real agent, restarted, keeps its identity (its secret file) and registers again.
    let registered = |log: &str| log.matches("node registered").count();
    let before = registered(&dev.agent_log());
    dev.kill9_agent();
    dev.spawn_agent();
    wait_for("the restarted agent to register again", Duration::from_secs(30), || (registered(&dev.agent_log()) > before).then_some(()));
    assert!(!dev.agent_log().contains("registration refused"), "{}", dev.agent_log());
    assert_eq!(std::fs::read_to_string(&secret_file).expect("secret").trim(), secret, "the secret changed across a restart");
}

/// An agent keeps its node secret before it first registers: one killed before any server
/// answered (here: none could be reached) comes back with the same secret, claims its node id
/// with it, and a later restart presents it again. An agent that waited for the servers to
/// issue its secret lost its node id for good when it died between their commit of the claim
/// and its write of the file (the acl test that failed once in CI).
#[test]
fn an_agent_keeps_its_node_secret_before_it_first_registers() {
    let dev = Dev::start_split();
    let dir = dev.dir.path().join("early");
    let log_path = dev.dir.path().join("early.log");
    let spawn = |servers: &str| agent_process(servers, "early", &dir, &log_path);
    let secret_file = dir.join("node-secret");
    let read = || std::fs::read_to_string(&secret_file).ok().map(|s| s.trim().to_string()).filter(|s| s.len() == 64);
    // No server listens on port 1 of loopback: the agent can only make and keep its secret.
    let unreachable = spawn("127.0.0.1:1");
    let secret = wait_for("the agent to keep a node secret before any server answered", Duration::from_secs(20), read);
    drop(unreachable); // kill -9
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!log().contains("node registered"), "{}", log());

    let registrations = || log().matches("node registered").count();
    let first = spawn(&dev.grpc);
    wait_for("the agent to register with the secret it kept", Duration::from_secs(30), || (registrations() >= 1).then_some(()));
    assert_eq!(read().as_deref(), Some(secret.as_str()), "the secret changed when the node was first registered");
    assert!(!log().contains("node secret issued"), "the servers issued a secret to an agent that had one:\n{}", log());
    drop(first);
    let before = registrations();
    let _again = spawn(&dev.grpc);
    wait_for("the restarted agent to register again", Duration::from_secs(30), || (registrations() > before).then_some(()));
    assert!(!log().contains("registration refused"), "{}", log());
    assert_eq!(read().as_deref(), Some(secret.as_str()));
    let nodes = dev.ok(&["node", "status"]);
    assert!(nodes.lines().any(|l| l.contains("early") && l.contains("ready")), "{nodes}");
}

/// An `mlp agent` process for node `name` on `data_dir` against `servers`, its output appended
/// to `log`; killed on drop.
fn agent_process(servers: &str, name: &str, data_dir: &Path, log: &Path) -> Guard {
    Guard(common::agent_process(servers, name, data_dir, log, &[]))
}

/// Free loopback ports (bound, then released for the servers to take).
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<std::net::TcpListener> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// What [`spawn_tls_servers`] started: the gRPC and HTTP addresses, and the guards (killed on
/// drop).
struct TlsServers {
    grpc: Vec<String>,
    http: Vec<String>,
    guards: Vec<Guard>,
}

/// Three `mlp server`s with the server certificate forming one cluster (`--bootstrap-expect 3`)
/// on free loopback ports, data and logs under `dir`, with `extra` flags.
fn spawn_tls_servers(certs: &Certs, dir: &Path, extra: &[&str]) -> TlsServers {
    let ports = free_ports(6);
    let join: Vec<String> = ports[..3].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let http: Vec<String> = ports[3..].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let guards = (0..3)
        .map(|i| {
            let log = std::fs::File::create(dir.join(format!("s{i}.log"))).expect("log");
            let child = Command::new(mlp())
                .args(["server", "--grpc-addr", &join[i], "--http-addr", &http[i], "--bootstrap-expect", "3"])
                .args(["--join", &join.join(",")])
                .args(extra)
                .arg("--data-dir")
                .arg(dir.join(format!("s{i}")))
                .args(certs.flags("server"))
                .env("MLP_LOG", "info,openraft=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn server");
            Guard(child)
        })
        .collect();
    TlsServers { grpc: join, http, guards }
}

#[test]
fn tls_three_servers_form_a_cluster_and_forward_over_tls() {
    let certs = Certs::new();
    let dir = tempfile::Builder::new().prefix("mlp-tls-ha-").tempdir().expect("tempdir");
    let TlsServers { grpc: join, http, guards: servers } = spawn_tls_servers(&certs, dir.path(), &[]);
    let cli = |addr: &str, args: &[&str]| {
        Command::new(mlp()).args(args).env("MLP_ADDR", addr).envs(certs.cli_env()).stdin(Stdio::null()).output().expect("run mlp")
    };
    // Formation (Info, Raft votes and appends between the servers) runs over TLS.
    let leader = wait_for("a leader among three TLS servers", Duration::from_secs(60), || {
        let out = cli(&join[0], &["operator", "raft", "list-peers"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.lines().filter(|l| l.contains("true")).count() == 3)
            .then(|| text.lines().find(|l| l.contains("leader")).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string))
            .flatten()
    });
    // A write sent to a follower is forwarded to the leader, a read confirmed with it.
    let follower = join.iter().find(|a| **a != leader).expect("a follower").clone();
    let job = dir.path().join("job.hcl");
    std::fs::write(&job, JOB).expect("write job");
    let out = cli(&follower, &["job", "run", "--detach", job.to_str().expect("path")]);
    assert!(out.status.success(), "job run through a follower: {}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&follower, &["job", "status", "tls-hello"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tls-hello"), "{}", String::from_utf8_lossy(&out.stderr));
    // An MLflow artifact uploaded over HTTPS to a follower is pushed to another server over
    // mutual TLS (RaftService.PutBlob, server role) before it is acknowledged.
    let fi = join.iter().position(|a| *a == follower).expect("follower index");
    let (host, port) = host_port(&http[fi]);
    let client = certs.identity("client");
    let payload = b"artifact bytes over mutual TLS";
    let answer = rt().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = mlp_tls::net::connect(&host, port, &client, Role::Server).await.expect("TLS to the HTTP API");
        let head = format!(
            "PUT /api/2.0/mlflow-artifacts/artifacts/0/tls/artifacts/a.bin HTTP/1.1\r\nHost: mlp\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            payload.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(payload).await.expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "artifact upload over TLS: {answer}");
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect();
    let holders = (0..3).filter(|i| dir.path().join(format!("s{i}/artifacts/blobs/{}/{sha}", &sha[..2])).exists()).count();
    assert!(holders >= 2, "the acknowledged artifact is on {holders} servers");
    drop(servers);
}

/// Issue 15's "done when": a three-server cluster with mutual TLS **and** ACLs on runs the main
/// paths. Three `mlp server`s (TLS, `--acl-enabled`) and one `mlp agent` (agent certificate);
/// every CLI call carries the client certificate and a token. ACLs are bootstrapped through a
/// follower; a namespace with a CPU quota and a policy for it; with the team's token:
/// `job run --wait` of an isolated `exec` batch job returns the task's exit code, logs, `alloc
/// exec` into a running task, a job over the quota waits blocked with the reason; anonymous and
/// out-of-namespace calls are refused. Then the leader is killed (-9): through a survivor the
/// same token still works, and a new job runs to its exit code.
#[test]
fn three_servers_with_tls_and_acls_run_the_main_paths() {
    assert!(prereq::require(&[prereq::Need::Root, prereq::Need::Cgroups]), "prerequisites missing");
    let certs = Certs::new();
    let dir = tempfile::Builder::new().prefix("mlp-tls-acl-ha-").tempdir().expect("tempdir");
    let TlsServers { grpc: join, guards, .. } = spawn_tls_servers(&certs, dir.path(), &["--acl-enabled"]);
    let mut servers: Vec<Option<Guard>> = guards.into_iter().map(Some).collect();
    let agent_log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let _agent = Guard(
        Command::new(mlp())
            .args(["agent", "--servers", &join.join(","), "--node-name", "tls-acl", "--rpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("agent"))
            .args(certs.flags("agent"))
            .env("MLP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(agent_log))
            .spawn()
            .expect("spawn agent"),
    );
    let cli = |addr: &str, token: &str, args: &[&str]| {
        let mut c = Command::new(mlp());
        c.args(args).env("MLP_ADDR", addr).envs(certs.cli_env()).env_remove("MLP_TOKEN").stdin(Stdio::null());
        if !token.is_empty() {
            c.env("MLP_TOKEN", token);
        }
        c.output().expect("run mlp")
    };
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let ok = |addr: &str, token: &str, args: &[&str]| {
        let out = cli(addr, token, args);
        assert!(out.status.success(), "mlp {args:?} via {addr}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let field = |out: &str, name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().strip_prefix('=')).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    // The leader as a server sees it (list-peers needs operator read: the management token).
    let leader_via = |addr: &str, token: &str| {
        let out = cli(addr, token, &["operator", "raft", "list-peers"]);
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && t.lines().filter(|l| l.contains("true")).count() >= 2)
            .then(|| t.lines().find(|l| l.contains("leader")).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string))
            .flatten()
    };
    // ACLs: bootstrapped (forwarded to the leader over TLS when join[0] is not it); then the
    // rest goes through a follower. Anonymous calls are refused.
    let root = wait_for("the ACL bootstrap once the cluster formed", Duration::from_secs(60), || {
        let out = cli(&join[0], "", &["acl", "bootstrap"]);
        out.status.success().then(|| field(&String::from_utf8_lossy(&out.stdout), "Secret ID"))
    });
    let first_leader = wait_for("the leader", Duration::from_secs(30), || leader_via(&join[0], &root));
    let follower = join.iter().find(|a| **a != first_leader).expect("a follower").clone();
    let anon = cli(&follower, "", &["job", "status"]);
    assert!(!anon.status.success() && text(&anon).contains("permission denied"), "{}", text(&anon));
    ok(&follower, &root, &["namespace", "apply", "team-a", "-cpu", "300"]);
    let policy = dir.path().join("team-a.hcl");
    std::fs::write(
        &policy,
        "namespace \"team-a\" {\n  capabilities = [\"submit-job\", \"read-job\", \"list-jobs\", \"read-logs\", \"alloc-exec\"]\n}\n",
    )
    .expect("policy");
    ok(&follower, &root, &["acl", "policy", "apply", "team-a", policy.to_str().expect("path")]);
    let team = field(&ok(&follower, &root, &["acl", "token", "create", "-policy", "team-a", "-name", "team-a"]), "Secret ID");
    wait_for("the TLS agent's node to be ready", Duration::from_secs(60), || {
        ok(&follower, &root, &["node", "status"]).contains("ready").then_some(())
    });

    let write_job = |name: &str, ty: &str, cpu: u32, script: &str| {
        let path = dir.path().join(format!("{name}.hcl"));
        let body = format!(
            "job \"{name}\" {{\n  namespace = \"team-a\"\n  type = \"{ty}\"\n  group \"g\" {{\n    restart {{\n      attempts = 0\n      mode = \"fail\"\n    }}\n    \
             task \"t\" {{\n      driver = \"exec\"\n      config {{\n        command = \"/bin/sh\"\n        args = [\"-c\", {script:?}]\n      }}\n      \
             resources {{\n        cpu = {cpu}\n        memory = 32\n      }}\n    }}\n  }}\n}}\n"
        );
        std::fs::write(&path, body).expect("job file");
        path.to_str().expect("path").to_string()
    };
    // `job run --wait` of an isolated batch job: the task's exit code is the CLI's.
    let batch = write_job("main-path", "batch", 100, "echo main-path-output; exit 3");
    let out = cli(&follower, &team, &["job", "run", "--wait", &batch]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let st: serde_json::Value =
        serde_json::from_str(&ok(&follower, &team, &["job", "status", "main-path", "--namespace", "team-a", "--json"])).expect("json");
    let alloc = st["allocations"][0]["id"].as_str().expect("alloc id").to_string();
    let logs = ok(&follower, &team, &["alloc", "logs", &alloc, "t"]);
    assert!(logs.contains("main-path-output"), "{logs}");
    // Out of its namespace the team's token is refused.
    let other = cli(&follower, &team, &["job", "status", "--namespace", "default"]);
    assert!(!other.status.success() && text(&other).contains("permission denied"), "{}", text(&other));

    // alloc exec into a running task, through the servers to the agent, over TLS.
    let svc = write_job("svc", "service", 100, "sleep 300");
    ok(&follower, &team, &["job", "run", "--detach", &svc]);
    let running = wait_for("svc running", Duration::from_secs(60), || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&follower, &team, &["job", "status", "svc", "--namespace", "team-a", "--json"])).ok()?;
        v["allocations"].as_array()?.iter().find(|a| status(a) == "running").and_then(|a| a["id"].as_str()).map(str::to_string)
    });
    let exec = ok(&follower, &team, &["alloc", "exec", "-i=false", &running, "--", "/bin/echo", "exec-with-tls-and-acls"]);
    assert!(exec.contains("exec-with-tls-and-acls"), "{exec}");

    // Over the namespace's CPU quota (100 held + 250 asked > 300): blocked, with the reason.
    let big = write_job("too-big", "batch", 250, "true");
    ok(&follower, &team, &["job", "run", "--detach", &big]);
    wait_for("the over-quota job blocked on the quota", Duration::from_secs(60), || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&follower, &team, &["job", "status", "too-big", "--namespace", "team-a", "--json"])).ok()?;
        v["evaluations"]
            .as_array()?
            .iter()
            .any(|e| e["status"] == "blocked" && e["quota_limit_reached"].as_str().is_some_and(|r| r.contains("cpu")))
            .then_some(())
    });

    // kill -9 the leader: through a survivor, the same token works and a new job runs.
    let i = join.iter().position(|a| *a == first_leader).expect("leader index");
    // The guard's drop is a SIGKILL and a wait.
    servers[i] = None;
    let survivor = join.iter().find(|a| **a != first_leader).expect("survivor").clone();
    wait_for("a new leader", Duration::from_secs(60), || leader_via(&survivor, &root).filter(|l| *l != first_leader));
    let again = write_job("after-failover", "batch", 100, "echo after-failover; exit 5");
    wait_for("job run --wait through a survivor with the same token", Duration::from_secs(60), || {
        (cli(&survivor, &team, &["job", "run", "--wait", &again]).status.code() == Some(5)).then_some(())
    });
    let st: serde_json::Value =
        serde_json::from_str(&ok(&survivor, &team, &["job", "status", "after-failover", "--namespace", "team-a", "--json"])).expect("json");
    let alloc = st["allocations"][0]["id"].as_str().expect("alloc id").to_string();
    assert!(ok(&survivor, &team, &["alloc", "logs", &alloc, "t"]).contains("after-failover"));
    let anon = cli(&survivor, "", &["job", "status", "--namespace", "team-a"]);
    assert!(!anon.status.success(), "ACLs are still on after the failover: {}", text(&anon));
    // Tasks outlive their agent by design: the service's task is stopped before the agent goes.
    ok(&survivor, &team, &["job", "stop", "svc", "--namespace", "team-a", "--purge"]);
    drop(servers);
}

/// Writes a config file into the certificates' directory whose `tls` block names `role`'s files
/// by relative paths (resolved against the file's directory, not the daemon's working one).
fn config_in(certs: &Certs, name: &str, role: &str, extra: &str) -> String {
    let text = format!(
        "tls {{\n  ca_file   = \"mlp-ca.pem\"\n  cert_file = \"mlp-{role}.pem\"\n  key_file  = \"./mlp-{role}-key.pem\"\n}}\n{extra}"
    );
    let path = certs.path(name);
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

#[test]
fn dev_config_file_turns_on_tls_and_acls() {
    let certs = Certs::new();
    let config = config_in(&certs, "dev.hcl", "server", "acl {\n  enabled = true\n}\n");
    let mut dev = Dev::start_with(&["--config", &config]);

    // Plaintext is refused: the CLI without certificates, and the HTTP API.
    let out = Command::new(mlp()).args(["node", "status"]).env("MLP_ADDR", &dev.grpc).stdin(Stdio::null()).output().expect("run mlp");
    assert!(!out.status.success(), "a plaintext CLI call succeeded: {}", String::from_utf8_lossy(&out.stdout));
    let (status, _) = common::http_request(&dev.http, "GET", "/v1/status/leader", None, b"");
    assert_ne!(status, 200, "the HTTP API answered plaintext");

    // With the client certificate: ACLs are on, so no token is denied; bootstrap, then allowed.
    dev.cli_env = certs.cli_env();
    let out = dev.cli(&["job", "status"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("permission denied"), "an unauthenticated request was not denied: {text}");
    let boot = dev.ok(&["acl", "bootstrap"]);
    let secret = boot
        .lines()
        .find_map(|l| l.strip_prefix("Secret ID").and_then(|r| r.trim().strip_prefix('=')).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no secret in {boot}"));
    dev.cli_env.push(("MLP_TOKEN".into(), secret));
    wait_for("the node to be ready", Duration::from_secs(60), || dev.ok(&["node", "status"]).contains("ready").then_some(()));
    dev.ok(&["job", "status"]);
}

#[test]
fn flags_win_over_the_config_file_field_by_field() {
    let certs = Certs::new();
    // The file names a client certificate (wrong for a server) and turns ACLs on.
    let server_config = config_in(&certs, "server.hcl", "client", "acl {\n  enabled = true\n}\n");
    // Without flags the server refuses to start, saying where the file named the certificate.
    let out = Command::new(mlp())
        .args(["server", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--config", &server_config, "--data-dir"])
        .arg(certs.path("refused-data"))
        .stdin(Stdio::null())
        .output()
        .expect("run mlp server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a server started with a client certificate");
    assert!(
        err.contains(&format!("{server_config}:3:15: tls.cert_file")) && err.contains("needs a certificate with the server role"),
        "{err}"
    );
    // A `client` block is refused by a server, never ignored.
    let with_client = config_in(&certs, "server-client.hcl", "server", "client {\n  refused_users = [\"root\"]\n}\n");
    let out = Command::new(mlp())
        .args(["server", "--config", &with_client, "--data-dir"])
        .arg(certs.path("refused-data"))
        .stdin(Stdio::null())
        .output()
        .expect("run mlp server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("{with_client}:6:1: client: unknown block")), "{err}");

    // The certificate and key flags replace the file's two fields (the CA stays the file's),
    // and --acl-enabled=false the file's acl block. The agent takes its identity from its file.
    let agent_config = config_in(&certs, "agent.hcl", "agent", "");
    let cert = certs.p("mlp-server.pem");
    let key = certs.p("mlp-server-key.pem");
    let server_flags = ["--config", &server_config, "--cert-file", &cert, "--key-file", &key, "--acl-enabled=false"];
    let mut dev = Dev::start_split_with(&server_flags, &["--config", &agent_config]);
    dev.cli_env = certs.cli_env();
    // No token needed (ACLs off), the agent registered over TLS with its file's certificate.
    wait_for("the agent's node to be ready", Duration::from_secs(60), || dev.ok(&["node", "status"]).contains("ready").then_some(()));
    dev.ok(&["job", "status"]);
    let out = Command::new(mlp()).args(["node", "status"]).env("MLP_ADDR", &dev.grpc).stdin(Stdio::null()).output().expect("run mlp");
    assert!(!out.status.success(), "a plaintext CLI call succeeded");
}
