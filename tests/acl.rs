//! ACL tokens and policies end to end through the real binary (issue 15 §2), and the agent's
//! driver configuration (§4): `mlp dev --acl-enabled`, `mlp acl ...` with `MLP_TOKEN`, the
//! `X-MLP-Token` header on HTTP, env redaction, the audit log, token expiry, a three-server
//! cluster that keeps its tokens across a leader kill, and `raw_exec` refused unless enabled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{mlp, status, wait_for, Dev};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The CLI against `addr` with `token` in MLP_TOKEN ("" = none).
fn cli_at(addr: &str, token: &str, args: &[&str]) -> Output {
    let mut c = Command::new(mlp());
    c.args(args).env("MLP_ADDR", addr).env_remove("MLP_TOKEN").stdin(Stdio::null());
    if !token.is_empty() {
        c.env("MLP_TOKEN", token);
    }
    c.output().expect("run mlp")
}

fn as_(dev: &Dev, token: &str, args: &[&str]) -> Output {
    cli_at(&dev.grpc, token, args)
}

fn ok_as(dev: &Dev, token: &str, args: &[&str]) -> String {
    let out = as_(dev, token, args);
    assert!(out.status.success(), "mlp {args:?} failed: {}\ndev log: {}", text(&out), common::tail(&dev.log(), 2000));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn denied_as(dev: &Dev, token: &str, args: &[&str]) -> String {
    let out = as_(dev, token, args);
    let t = text(&out);
    assert!(!out.status.success(), "mlp {args:?} should have been denied: {t}");
    assert!(t.contains("permission denied"), "mlp {args:?}: expected a permission error, got: {t}");
    t
}

/// `Accessor ID  = ...` and `Secret ID    = ...` from `mlp acl bootstrap` / `token create`.
fn token_ids(out: &str) -> (String, String) {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().strip_prefix('=')).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    (field("Accessor ID"), field("Secret ID"))
}

fn http_as(addr: &str, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body = body.unwrap_or("");
    let content_type = (!body.is_empty()).then_some("application/json");
    common::http_request_as(addr, token, method, path, content_type, body.as_bytes())
}

const POLICIES: &[(&str, &str)] = &[
    ("reader", "namespace \"default\" { policy = \"read\" }\n"),
    ("submitter", "namespace \"default\" {\n  capabilities = [\"submit-job\", \"read-job\", \"list-jobs\", \"read-job-env\"]\n}\n"),
    ("logs", "namespace \"default\" { capabilities = [\"read-logs\", \"read-job\"] }\n"),
    ("exec", "namespace \"default\" { capabilities = [\"alloc-exec\", \"read-job\"] }\n"),
    (
        "node-exec",
        "namespace \"default\" { capabilities = [\"alloc-exec\", \"alloc-node-exec\", \"read-job\"] }\nnode { policy = \"read\" }\n",
    ),
    ("other-ns", "namespace \"team-*\" { policy = \"write\" }\n"),
];

const JOB: &str = r#"job "secretive" {
  type = "service"
  group "g" {
    task "main" {
      driver = "raw_exec"
      env {
        API_KEY = "hunter2-do-not-show"
      }
      config {
        command = "/bin/sh"
        args    = ["-c", "echo hello-from-task; exec sleep 3600"]
      }
    }
  }
}
"#;

#[test]
fn acl_tokens_policies_capabilities_redaction_and_audit() {
    let dev = Dev::start_with(&["--acl-enabled"]);
    let job = dev.write_job("secretive.hcl", JOB);
    let job = job.to_str().unwrap();

    // Anonymous: refused, and nothing changes.
    denied_as(&dev, "", &["job", "status"]);
    denied_as(&dev, "", &["job", "run", "--detach", job]);
    denied_as(&dev, "", &["acl", "token", "list"]);
    let (code, _) = http_as(&dev.http, "", "GET", "/v1/jobs", None);
    assert_eq!(code, 403);
    let (code, _) = http_as(
        &dev.http,
        "",
        "POST",
        "/v1/jobs",
        Some(r#"{"hcl": "job \"x\" { group \"g\" { task \"t\" { driver = \"raw_exec\"\n config { command = \"/bin/true\" } } } }"}"#),
    );
    assert_eq!(code, 403, "an anonymous submission is refused");
    let (code, _) = http_as(&dev.http, "", "POST", "/api/2.0/mlflow/experiments/create", Some(r#"{"name": "e1"}"#));
    assert_eq!(code, 403, "MLflow writes need a token too");
    let (code, _) = http_as(&dev.http, "not-a-token", "GET", "/v1/jobs", None);
    assert_eq!(code, 403);
    // The leader status stays open (load balancers, health checks).
    let (code, _) = http_as(&dev.http, "", "GET", "/v1/status/leader", None);
    assert_eq!(code, 200);

    // Bootstrap once.
    let out = ok_as(&dev, "", &["acl", "bootstrap"]);
    let (root_accessor, root) = token_ids(&out);
    assert!(uuid::Uuid::parse_str(&root).is_ok(), "the secret is a UUID: {root}");
    let again = as_(&dev, "", &["acl", "bootstrap"]);
    assert!(!again.status.success() && text(&again).contains("already done"), "{}", text(&again));
    let again = as_(&dev, &root, &["acl", "bootstrap"]);
    assert!(!again.status.success(), "not even with the management token: {}", text(&again));
    // Nothing the anonymous calls tried exists.
    let (code, body) = http_as(&dev.http, &root, "GET", "/v1/jobs", None);
    assert_eq!((code, body.trim()), (200, "[]"), "anonymous requests changed nothing");

    // Policies (one with a problem first: file, line, column, field).
    let bad = dev.write_job("bad.hcl", "namespace \"default\" {\n  capabilities = [\"read-job\", \"fly\"]\n}\n");
    let t = text(&as_(&dev, &root, &["acl", "policy", "apply", "bad", bad.to_str().unwrap()]));
    assert!(t.contains("bad.hcl:2:31: namespace.default.capabilities[1]: unknown capability \"fly\""), "{t}");
    let mut tokens = std::collections::BTreeMap::new();
    for (name, rules) in POLICIES {
        let f = dev.write_job(&format!("{name}.policy.hcl"), rules);
        ok_as(&dev, &root, &["acl", "policy", "apply", name, f.to_str().unwrap()]);
        // Nomad's single-dash spelling works too.
        let out = ok_as(&dev, &root, &["acl", "token", "create", "-policy", name, "-name", &format!("{name}-token")]);
        tokens.insert(*name, token_ids(&out).1);
    }
    let list = ok_as(&dev, &root, &["acl", "policy", "list"]);
    assert!(POLICIES.iter().all(|(n, _)| list.contains(n)), "{list}");
    assert!(ok_as(&dev, &root, &["acl", "policy", "info", "reader"]).contains("policy = \"read\""));
    let t = |n: &str| tokens[n].clone();
    // Creating a token for a missing policy fails.
    let out = as_(&dev, &root, &["acl", "token", "create", "--policy", "nope"]);
    assert!(!out.status.success() && text(&out).contains("nope"), "{}", text(&out));

    // submit-job: allowed and denied.
    denied_as(&dev, &t("reader"), &["job", "run", "--detach", job]);
    denied_as(&dev, &t("other-ns"), &["job", "run", "--detach", job]);
    ok_as(&dev, &t("submitter"), &["job", "run", "--detach", job]);
    // The agent (no token) registered, took the allocation and reports it running.
    let allocs = wait_for("the task to run", Duration::from_secs(60), || {
        let v: serde_json::Value = serde_json::from_str(&ok_as(&dev, &root, &["job", "status", "secretive", "--json"])).ok()?;
        let a = v["allocations"].as_array()?.clone();
        (a.len() == 1 && status(&a[0]) == "running").then_some(a)
    });
    let alloc = allocs[0]["id"].as_str().unwrap().to_string();

    // read-job and list-jobs.
    ok_as(&dev, &t("reader"), &["job", "status", "secretive"]);
    ok_as(&dev, &t("reader"), &["job", "status"]);
    denied_as(&dev, &t("logs"), &["job", "status"]);
    denied_as(&dev, &t("other-ns"), &["job", "status", "secretive"]);
    let (code, _) = http_as(&dev.http, &t("reader"), "GET", "/v1/jobs", None);
    assert_eq!(code, 200);
    let (code, _) = http_as(&dev.http, &t("reader"), "GET", "/v1/jobs?namespace=team-a", None);
    assert_eq!(code, 403, "reader holds nothing in team-a");

    // Env: redacted without read-job-env (gRPC and HTTP), shown with it.
    let reader_view = ok_as(&dev, &t("reader"), &["job", "status", "secretive", "--json"]);
    assert!(!reader_view.contains("hunter2"), "env leaked to a reader: {reader_view}");
    let (code, body) = http_as(&dev.http, &t("reader"), "GET", "/v1/job/secretive", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<redacted>") && !body.contains("hunter2"), "{body}");
    let (_, body) = http_as(&dev.http, &t("reader"), "GET", "/v1/job/secretive/versions", None);
    assert!(!body.contains("hunter2"), "{body}");
    let (_, body) = http_as(&dev.http, &t("submitter"), "GET", "/v1/job/secretive", None);
    assert!(body.contains("hunter2-do-not-show"), "read-job-env shows env: {body}");
    let (_, body) = http_as(&dev.http, &root, "GET", "/v1/job/secretive", None);
    assert!(body.contains("hunter2-do-not-show"), "management shows env: {body}");

    // read-logs.
    denied_as(&dev, &t("reader"), &["alloc", "logs", &alloc]);
    let logs = wait_for("the task's output", Duration::from_secs(20), || {
        let l = ok_as(&dev, &t("logs"), &["alloc", "logs", &alloc]);
        l.contains("hello-from-task").then_some(l)
    });
    assert!(logs.contains("hello-from-task"));

    // alloc-exec: a raw_exec task also needs alloc-node-exec.
    denied_as(&dev, &t("reader"), &["alloc", "exec", "-i=false", &alloc, "--", "echo", "hi"]);
    let t_exec = denied_as(&dev, &t("exec"), &["alloc", "exec", "-i=false", &alloc, "--", "echo", "hi"]);
    assert!(t_exec.contains("alloc-node-exec"), "{t_exec}");
    let out = ok_as(&dev, &t("node-exec"), &["alloc", "exec", "-i=false", &alloc, "--", "echo", "exec-ok"]);
    assert_eq!(out.trim(), "exec-ok");

    // node and operator areas; ACL administration needs acl write (management here).
    denied_as(&dev, &t("reader"), &["node", "status"]);
    ok_as(&dev, &t("node-exec"), &["node", "status"]);
    denied_as(&dev, &t("submitter"), &["system", "gc"]);
    denied_as(&dev, &t("reader"), &["acl", "token", "list"]);
    let mine = ok_as(&dev, &t("reader"), &["acl", "token", "info"]);
    assert!(mine.contains("reader-token"), "a token may read itself: {mine}");
    let list = ok_as(&dev, &root, &["acl", "token", "list"]);
    assert!(list.contains(&root_accessor) && list.contains("reader-token"), "{list}");
    assert!(!list.contains(&root), "token list shows no secrets: {list}");

    // Token expiry: valid at first, refused once expired, collected by gc.
    let out = ok_as(&dev, &root, &["acl", "token", "create", "-policy", "reader", "-ttl", "2s", "-name", "short-lived"]);
    let (short_accessor, short) = token_ids(&out);
    ok_as(&dev, &short, &["job", "status"]);
    std::thread::sleep(Duration::from_millis(2500));
    let t_exp = denied_as(&dev, &short, &["job", "status"]);
    assert!(t_exp.contains("expired"), "{t_exp}");
    ok_as(&dev, &root, &["system", "gc"]);
    let list = ok_as(&dev, &root, &["acl", "token", "list"]);
    assert!(!list.contains(&short_accessor), "expired token not collected: {list}");

    // Deleting a token revokes it.
    let reader_accessor = {
        let v: serde_json::Value = serde_json::from_str(&ok_as(&dev, &t("reader"), &["acl", "token", "info", "--json"])).unwrap();
        v["accessor_id"].as_str().unwrap().to_string()
    };
    ok_as(&dev, &root, &["acl", "token", "delete", &reader_accessor]);
    denied_as(&dev, &t("reader"), &["job", "status"]);

    // The audit log: denied and privileged requests, by accessor, never a secret.
    let audit = std::fs::read_to_string(dev.data_dir().join("server").join("audit.log")).expect("audit.log");
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("audit line is JSON")).collect();
    assert!(lines.iter().any(|l| l["result"] == "denied" && l["accessor"] == "anonymous"), "{audit}");
    assert!(
        lines.iter().any(|l| l["result"] == "allowed"
            && l["operation"].as_str().unwrap_or("").contains("alloc exec")
            && l["target"].as_str().unwrap_or("").contains(&alloc)),
        "no audit line for the exec: {audit}"
    );
    assert!(
        lines.iter().any(|l| l["result"] == "allowed" && l["operation"].as_str().unwrap_or("").contains("AclService/TokenCreate")),
        "{audit}"
    );
    assert!(lines.iter().any(|l| l["operation"] == "acl bootstrap" && l["result"] == "allowed"), "{audit}");
    assert!(lines.iter().all(|l| l["time"].as_str().is_some_and(|t| t.ends_with('Z'))), "{audit}");
    for secret in tokens.values().chain([&root]) {
        assert!(!audit.contains(secret.as_str()), "a secret in the audit log");
    }
}

/// Free loopback ports (bound, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<std::net::TcpListener> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// Processes killed on drop.
struct Procs(Vec<Option<Child>>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn leader_of(addrs: &[String], token: &str) -> Option<String> {
    for a in addrs {
        let out = cli_at(a, token, &["operator", "raft", "list-peers", "--json"]);
        if !out.status.success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        if let Some(p) = v.as_array()?.iter().find(|p| p["leader"] == true) {
            return p["address"].as_str().map(str::to_string);
        }
    }
    None
}

#[test]
fn acl_three_servers_keep_tokens_across_a_leader_kill() {
    let dir = tempfile::Builder::new().prefix("mlp-test-").tempdir().expect("tempdir");
    let ports = free_ports(6);
    let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", ports[i])).collect();
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let log = std::fs::File::create(dir.path().join(format!("server{i}.log"))).expect("log");
        let child = Command::new(mlp())
            .args(["server", "--acl-enabled", "--bootstrap-expect", "3", "--join", &addrs.join(",")])
            .args(["--grpc-addr", &addrs[i], "--http-addr", &format!("127.0.0.1:{}", ports[3 + i])])
            .args(["--raft-heartbeat-ms", "100", "--raft-election-min-ms", "500", "--raft-election-max-ms", "1000"])
            .arg("--data-dir")
            .arg(dir.path().join(format!("server{i}")))
            .env("MLP_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn mlp server");
        procs.0.push(Some(child));
    }
    let all = addrs.join(",");
    // Bootstrap through any server once the cluster formed.
    let root = wait_for("the cluster to form and bootstrap ACLs", Duration::from_secs(60), || {
        let out = cli_at(&all, "", &["acl", "bootstrap"]);
        out.status.success().then(|| token_ids(&String::from_utf8_lossy(&out.stdout)).1)
    });
    let policy = dir.path().join("reader.hcl");
    std::fs::write(&policy, "namespace \"default\" { policy = \"read\" }\n").expect("policy");
    assert!(cli_at(&all, &root, &["acl", "policy", "apply", "reader", policy.to_str().unwrap()]).status.success());
    let out = cli_at(&all, &root, &["acl", "token", "create", "--policy", "reader"]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, reader) = token_ids(&String::from_utf8_lossy(&out.stdout));

    // Every server knows the tokens (a follower waits for the entry before it answers).
    for a in &addrs {
        let out = cli_at(a, &reader, &["job", "status"]);
        assert!(out.status.success(), "{a}: {}", text(&out));
        let out = cli_at(a, "", &["job", "status"]);
        assert!(!out.status.success() && text(&out).contains("permission denied"), "{a}: {}", text(&out));
    }

    let leader = wait_for("a leader", Duration::from_secs(30), || leader_of(&addrs, &root));
    let li = addrs.iter().position(|a| *a == leader).expect("leader is one of ours");
    if let Some(mut c) = procs.0[li].take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != leader).cloned().collect();
    let new_leader = wait_for("a new leader", Duration::from_secs(30), || leader_of(&survivors, &root).filter(|l| *l != leader));
    assert!(survivors.contains(&new_leader));
    for a in &survivors {
        let out = cli_at(a, &reader, &["job", "status"]);
        assert!(out.status.success(), "{a} after failover: {}", text(&out));
        let out = cli_at(a, &reader, &["acl", "token", "list"]);
        assert!(text(&out).contains("permission denied"), "{a}: policies still apply: {}", text(&out));
        let out = cli_at(a, "", &["job", "status"]);
        assert!(text(&out).contains("permission denied"), "{a}: {}", text(&out));
    }
    // Bootstrap stays done after failover.
    let out = cli_at(&survivors.join(","), "", &["acl", "bootstrap"]);
    assert!(!out.status.success() && text(&out).contains("already done"), "{}", text(&out));
    // The management token still administers.
    let out = cli_at(&survivors.join(","), &root, &["acl", "token", "list"]);
    assert!(out.status.success(), "{}", text(&out));
}

const RAW_JOB: &str = r#"job "rawjob" {
  type = "service"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "exec sleep 3600"]
      }
    }
  }
}
"#;

fn spawn_agent(dev: &Dev, extra: &[&str]) -> Child {
    common::agent_process(&dev.grpc, "split", &dev.data_dir().join("agent"), &dev.dir.path().join("agent.log"), extra)
}

fn job_json(dev: &Dev) -> String {
    String::from_utf8_lossy(&dev.cli(&["job", "status", "rawjob", "--json"]).stdout).into_owned()
}

#[test]
fn raw_exec_is_refused_unless_the_agent_enables_it() {
    // `mlp agent` without configuration: raw_exec is off, and placement says so.
    let mut dev = Dev::start_split();
    dev.kill9_agent();
    dev.agent = Some(spawn_agent(&dev, &[]));
    // The restarted agent re-registers its node without raw_exec.
    wait_for("the node to re-register without raw_exec", Duration::from_secs(30), || {
        let nodes = dev.json(&["node", "status", "--json"]);
        let n = &nodes[0];
        let offered = n["drivers"].as_array()?.iter().any(|d| d == "raw_exec");
        (!offered && n["attributes"]["drivers.disabled"].as_str()?.contains("raw_exec")).then_some(())
    });
    let file = dev.write_job("raw.hcl", RAW_JOB);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap()]);
    wait_for("a placement failure naming the disabled driver", Duration::from_secs(30), || {
        job_json(&dev).contains("driver raw_exec disabled on node split").then_some(())
    });

    // The same agent restarted with a config file that enables raw_exec: the job runs.
    dev.kill9_agent();
    let cfg = dev.write_job("agent.hcl", "client {\n  drivers {\n    raw_exec { enabled = true }\n  }\n  refused_users = [\"root\"]\n}\n");
    dev.agent = Some(spawn_agent(&dev, &["--config", cfg.to_str().unwrap()]));
    dev.wait_allocs("rawjob", "the raw_exec task to run", Duration::from_secs(60), |a| a.iter().any(|x| status(x) == "running"));

    // A bad config file is refused with file:line:column and the field.
    let bad = dev.write_job("bad-agent.hcl", "client {\n  drivers {\n    raw_exec { enabled = \"yes\" }\n  }\n}\n");
    let out = Command::new(mlp())
        .args(["agent", "--servers", "127.0.0.1:1", "--config", bad.to_str().unwrap(), "--data-dir"])
        .arg(dev.dir.path().join("never"))
        .output()
        .expect("run");
    let t = text(&out);
    assert!(!out.status.success() && t.contains("bad-agent.hcl:3:26: client.drivers.raw_exec.enabled: must be true or false"), "{t}");
}

#[test]
fn dev_keeps_raw_exec_unless_disabled() {
    let dev = Dev::start_with(&["--disable-raw-exec"]);
    let file = dev.write_job("raw.hcl", RAW_JOB);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap()]);
    let node = dev.json(&["node", "status", "--json"]);
    let name = node[0]["name"].as_str().unwrap_or_default().to_string();
    wait_for("a placement failure naming the disabled driver", Duration::from_secs(30), || {
        job_json(&dev).contains(&format!("driver raw_exec disabled on node {name}")).then_some(())
    });
}
