//! Namespaces and quotas end to end through the real binary (issue 15 §5): `mlp namespace
//! apply|list|status|delete` and the HTTP mirror, jobs refused in namespaces that do not exist,
//! a GPU quota that blocks (never fails) what does not fit with a reason naming the quota,
//! blocked work unblocked when the quota is raised or an allocation of the namespace finishes,
//! and ACLs (management is operator write; reads are per namespace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{mlp, repo_root, status, wait_for, Dev};
use serde_json::Value;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs the CLI and insists that it fails; returns stdout and stderr.
fn fails(dev: &Dev, args: &[&str]) -> String {
    let out = dev.cli(args);
    assert!(!out.status.success(), "mlp {args:?} should have failed: {}", text(&out));
    text(&out)
}

/// A batch job of `count` allocations of one GPU each, whose task runs `script`.
fn gpu_job(name: &str, namespace: &str, count: u32, script: &str) -> String {
    format!(
        "job \"{name}\" {{\n  namespace = \"{namespace}\"\n  type = \"batch\"\n  group \"g\" {{\n    count = {count}\n    \
         task \"t\" {{\n      driver = \"exec\"\n      config {{\n        command = \"/bin/sh\"\n        args = [\"-c\", {script:?}]\n      }}\n      \
         resources {{\n        cpu = 50\n        memory = 32\n        gpu {{ count = 1 }}\n      }}\n    }}\n  }}\n}}\n"
    )
}

fn run(dev: &Dev, name: &str, body: &str) {
    let file = dev.write_job(&format!("{name}.hcl"), body);
    dev.ok(&["job", "run", "--detach", file.to_str().unwrap()]);
}

fn job_in(dev: &Dev, ns: &str, name: &str) -> Value {
    dev.json(&["job", "status", name, "--namespace", ns, "--json"])
}

fn live(job: &Value) -> usize {
    job["allocations"].as_array().map_or(0, |a| a.iter().filter(|a| ["pending", "running"].contains(&status(a))).count())
}

/// The blocked evaluation's quota reason, if the job has a blocked evaluation.
fn blocked_reason(job: &Value) -> Option<String> {
    job["evaluations"]
        .as_array()?
        .iter()
        .find(|e| e["status"] == "blocked")
        .map(|e| e["quota_limit_reached"].as_str().unwrap_or("").to_string())
}

fn h100x8() -> String {
    repo_root().join("examples/gpus-h100x8.json").to_string_lossy().into_owned()
}

#[test]
fn namespaces_quotas_block_and_unblock_and_delete_rules() {
    if !common::require_exec() {
        return;
    }
    let dev = Dev::start_with(&["--simulated-gpus", &h100x8()]);

    // A job in a namespace that does not exist is refused, with what to do.
    let f = dev.write_job("train.hcl", &gpu_job("train", "team-a", 3, "exec sleep 600"));
    let t = fails(&dev, &["job", "run", "--detach", f.to_str().unwrap()]);
    assert!(t.contains("namespace \"team-a\" does not exist; create it first with `mlp namespace apply team-a`"), "{t}");

    // Invalid input is refused, saying what and where.
    let t = fails(&dev, &["namespace", "apply", "Team_A"]);
    assert!(t.contains("must be a DNS label"), "{t}");
    let q = dev.write_job("bad-quota.hcl", "gpus = 2\ncpus = 4\n");
    let t = fails(&dev, &["namespace", "apply", "team-a", "-quota-file", q.to_str().unwrap()]);
    assert!(t.contains("bad-quota.hcl:2:1: cpus: unknown field \"cpus\""), "{t}");
    let t = fails(&dev, &["namespace", "apply", "team-a", "-gpus", "2", "-gpu-milli", "500"]);
    assert!(t.contains("cannot be used with"), "{t}");

    // Nomad's single-dash flags; the quota in whole GPUs.
    dev.ok(&["namespace", "apply", "team-a", "-description", "Team A", "-gpus", "2"]);
    let list = dev.ok(&["namespace", "list"]);
    assert!(list.contains("default") && list.contains("team-a") && list.contains("gpus 2"), "{list}");

    // Three one-GPU allocations against a quota of two: two run, the third waits, blocked
    // (not failed) with a reason that names the namespace and the dimension.
    dev.ok(&["job", "run", "--detach", f.to_str().unwrap()]);
    let why = "quota of namespace \"team-a\" exhausted: gpus 2/2 in use, 1 more asked";
    let j = wait_for("two allocations and a blocked evaluation naming the quota", Duration::from_secs(60), || {
        let j = job_in(&dev, "team-a", "train");
        (live(&j) == 2 && blocked_reason(&j).as_deref() == Some(why)).then_some(j)
    });
    assert_ne!(j["job"]["status"], "dead", "{j}");
    let human = dev.ok(&["job", "status", "train", "--namespace", "team-a"]);
    assert!(human.contains(&format!("Quota: {why}")), "{human}");
    let st = dev.json(&["namespace", "status", "team-a", "--json"]);
    assert_eq!(st["usage"]["gpu_milli"], 2000, "{st}");
    assert_eq!(st["usage"]["blocked_evaluations"], 1, "{st}");
    let human = dev.ok(&["namespace", "status", "team-a"]);
    assert!(human.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["gpus", "2", "2"]), "{human}");

    // Another namespace is not held back by team-a's quota.
    run(&dev, "other", &gpu_job("other", "default", 4, "exec sleep 600"));
    wait_for("default's four allocations", Duration::from_secs(60), || (live(&job_in(&dev, "default", "other")) == 4).then_some(()));

    // Raising the quota unblocks the waiting allocation (the description and the limits not
    // named are kept).
    dev.ok(&["namespace", "apply", "team-a", "-cpu", "100000"]);
    dev.ok(&["namespace", "apply", "team-a", "-gpus", "3"]);
    wait_for("the third allocation after the quota was raised", Duration::from_secs(60), || {
        let j = job_in(&dev, "team-a", "train");
        (live(&j) == 3 && blocked_reason(&j).is_none()).then_some(())
    });
    let st = dev.json(&["namespace", "status", "team-a", "--json"]);
    assert_eq!(st["namespace"]["description"], "Team A", "{st}");
    assert_eq!(st["namespace"]["quota"]["cpu_mhz"], 100000, "{st}");
    assert_eq!(st["namespace"]["quota"]["gpus"], 3, "{st}");

    // An allocation of the namespace finishing unblocks the next one (quota of one GPU; each
    // task runs a few seconds).
    dev.ok(&["namespace", "apply", "team-b", "-gpu-milli", "1000"]);
    run(&dev, "short", &gpu_job("short", "team-b", 2, "sleep 3"));
    wait_for("one runs, one waits on team-b's quota", Duration::from_secs(60), || {
        let j = job_in(&dev, "team-b", "short");
        (live(&j) == 1 && blocked_reason(&j).is_some_and(|r| r.contains("team-b"))).then_some(())
    });
    wait_for("both finished, one after the other", Duration::from_secs(90), || {
        let j = job_in(&dev, "team-b", "short");
        let done = j["allocations"].as_array().map_or(0, |a| a.iter().filter(|a| status(a) == "complete").count());
        (done == 2).then_some(())
    });

    // Delete: refused for default and while jobs are not dead; allowed once they are gone.
    let t = fails(&dev, &["namespace", "delete", "default"]);
    assert!(t.contains("namespace \"default\" cannot be deleted"), "{t}");
    let t = fails(&dev, &["namespace", "delete", "team-a"]);
    assert!(t.contains("has 1 job(s) that are not dead (train)"), "{t}");
    dev.ok(&["job", "stop", "train", "--namespace", "team-a", "--purge", "--detach"]);
    dev.ok(&["namespace", "delete", "team-a"]);
    let t = fails(&dev, &["namespace", "status", "team-a"]);
    assert!(t.contains("namespace \"team-a\" not found"), "{t}");

    // The HTTP mirror.
    let (code, body) = dev.http("GET", "/v1/namespaces", None, b"");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["namespaces"].as_array().unwrap().iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["default", "team-b"], "{body}");
    let (code, body) = dev.http("PUT", "/v1/namespace/team-c", Some("application/json"), br#"{"quota": {"gpus": 1, "gpu_count": 2}}"#);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("invalid request body: quota.gpu_count: unknown field"), "{body}");
    let (code, body) = dev.http("PUT", "/v1/namespace/team-c", Some("application/json"), br#"{"name": "team-x"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("differs from the path"), "{body}");
    let (code, body) = dev.http(
        "PUT",
        "/v1/namespace/team-c",
        Some("application/json"),
        br#"{"description": "c", "quota": {"cpu_mhz": 1000, "gpu_models": [{"model": "H100-SXM5-80GB", "gpu_milli": 2000}]}}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = dev.http("GET", "/v1/namespace/team-c", None, b"");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["namespace"]["quota"]["gpu_models"][0]["gpu_milli"], 2000, "{body}");
    // Borrowing limits in JSON: an unknown field inside is refused with its path; good ones
    // read back.
    let (code, body) =
        dev.http("PUT", "/v1/namespace/team-c", Some("application/json"), br#"{"quota": {"gpus": 2, "borrow": {"gpus": 2, "gpu": 1}}}"#);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("invalid request body: quota.borrow.gpu: unknown field"), "{body}");
    let (code, body) =
        dev.http("PUT", "/v1/namespace/team-c", Some("application/json"), br#"{"quota": {"gpus": 2, "borrow": {"gpus": 3}}}"#);
    assert_eq!(code, 200, "{body}");
    let (_, body) = dev.http("GET", "/v1/namespace/team-c", None, b"");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["namespace"]["quota"]["borrow"]["gpus"], 3, "{body}");
    let (code, body) = dev.http("PUT", "/v1/namespace/team-d", Some("application/json"), br#"{"quota": {"gpus": 1, "gpu_milli": 5}}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not both"), "{body}");
    let (code, body) = dev.http("DELETE", "/v1/namespace/team-c", None, b"");
    assert_eq!(code, 200, "{body}");
    let (code, _) = dev.http("GET", "/v1/namespace/team-c", None, b"");
    assert_eq!(code, 404);
}

fn as_(dev: &Dev, token: &str, args: &[&str]) -> Output {
    let mut c = Command::new(mlp());
    c.args(args).env("MLP_ADDR", &dev.grpc).env_remove("MLP_TOKEN").stdin(Stdio::null());
    if !token.is_empty() {
        c.env("MLP_TOKEN", token);
    }
    c.output().expect("run mlp")
}

fn ok_as(dev: &Dev, token: &str, args: &[&str]) -> String {
    let out = as_(dev, token, args);
    assert!(out.status.success(), "mlp {args:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Secret ID").and_then(|r| r.trim().strip_prefix('=')).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no secret in {out}"))
}

#[test]
fn namespace_management_needs_operator_write_and_reads_are_per_namespace() {
    let dev = Dev::start_with(&["--acl-enabled"]);
    let root = secret(&ok_as(&dev, "", &["acl", "bootstrap"]));
    ok_as(&dev, &root, &["namespace", "apply", "team-a"]);
    ok_as(&dev, &root, &["namespace", "apply", "team-b"]);
    let policy = dev.write_job("team-a.hcl", "namespace \"team-a\" { policy = \"write\" }\n");
    ok_as(&dev, &root, &["acl", "policy", "apply", "team-a", policy.to_str().unwrap()]);
    let token = secret(&ok_as(&dev, &root, &["acl", "token", "create", "-policy", "team-a"]));

    // Writing jobs in a namespace is not managing namespaces.
    let out = as_(&dev, &token, &["namespace", "apply", "team-c"]);
    assert!(!out.status.success() && text(&out).contains("permission denied"), "{}", text(&out));
    let out = as_(&dev, &token, &["namespace", "delete", "team-b"]);
    assert!(!out.status.success() && text(&out).contains("permission denied"), "{}", text(&out));
    // Lists show the namespaces the token may read; status of another one is refused.
    let list = ok_as(&dev, &token, &["namespace", "list"]);
    assert!(list.contains("team-a") && !list.contains("team-b") && !list.contains("default"), "{list}");
    ok_as(&dev, &token, &["namespace", "status", "team-a"]);
    let out = as_(&dev, &token, &["namespace", "status", "team-b"]);
    assert!(!out.status.success() && text(&out).contains("permission denied"), "{}", text(&out));
    // HTTP: the same rules.
    let (code, _) = http_as(&dev.http, &token, "PUT", "/v1/namespace/team-c", Some("{}"));
    assert_eq!(code, 403);
    let (code, body) = http_as(&dev.http, &token, "GET", "/v1/namespaces", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("team-a") && !body.contains("team-b"), "{body}");
    let (code, _) = http_as(&dev.http, &token, "GET", "/v1/namespace/team-b", None);
    assert_eq!(code, 403);
    let (code, _) = http_as(&dev.http, "", "GET", "/v1/namespaces", None);
    assert_eq!(code, 403, "anonymous reads are refused");
    let (code, body) = http_as(&dev.http, &root, "PUT", "/v1/namespace/team-c", Some("{}"));
    assert_eq!(code, 200, "{body}");
}

fn http_as(addr: &str, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body = body.unwrap_or("");
    let content_type = (!body.is_empty()).then_some("application/json");
    common::http_request_as(addr, token, method, path, content_type, body.as_bytes())
}

/// A [`gpu_job`] at `priority` (instead of the default 50).
fn with_priority(job: &str, priority: i32) -> String {
    job.replace("type = \"batch\"", &format!("type = \"batch\"\n  priority = {priority}"))
}

/// The allocations of a job that were evicted (taken back by another namespace).
fn evicted(job: &Value) -> usize {
    job["allocations"].as_array().map_or(0, |a| a.iter().filter(|a| a["client_status"] == "preempted").count())
}

/// Fair share (issue 15 §6) on 8 simulated GPUs: two namespaces with a quota of 4 GPUs each
/// and 4 more to borrow. team-a takes all 8 while team-b is idle; team-b's jobs take their 4
/// back (team-a's borrowed allocations evicted, whatever the priorities), and the shares
/// converge to 4 and 4. When team-b's job ends, the freed GPUs go first to the namespace with the
/// smaller dominant share (team-b's newer job, not team-a's older blocked evaluation), so that
/// nothing is evicted a second time.
#[test]
fn borrowed_gpus_are_taken_back_and_freed_ones_go_by_dominant_share() {
    let dev = Dev::start_with(&["--simulated-gpus", &h100x8()]);
    let q = dev.write_job("share.hcl", "gpus = 4\nborrow {\n  gpus = 4\n}\n");
    for ns in ["team-a", "team-b"] {
        dev.ok(&["namespace", "apply", ns, "-quota-file", q.to_str().unwrap()]);
    }
    let human = dev.ok(&["namespace", "status", "team-a"]);
    assert!(human.contains("4 (may borrow 4)"), "{human}");
    let list = dev.ok(&["namespace", "list"]);
    assert!(list.contains("gpus 4, may borrow gpus 4"), "{list}");

    // team-a borrows the idle half: 8 of 8, at a high priority.
    run(&dev, "train", &with_priority(&gpu_job("train", "team-a", 8, "sleep 600"), 90));
    wait_for("team-a on all 8 GPUs", Duration::from_secs(60), || (live(&job_in(&dev, "team-a", "train")) == 8).then_some(()));

    // team-b, at a low priority, takes its quota back: four of team-a's allocations go.
    run(&dev, "eval", &with_priority(&gpu_job("eval", "team-b", 4, "sleep 600"), 10));
    let share = |ns: &str| dev.json(&["namespace", "status", ns, "--json"])["usage"]["gpu_milli"].as_u64().unwrap_or(0);
    wait_for("the shares converge to 4 and 4", Duration::from_secs(60), || {
        let (ja, jb) = (job_in(&dev, "team-a", "train"), job_in(&dev, "team-b", "eval"));
        (live(&ja) == 4 && live(&jb) == 4 && evicted(&ja) == 4).then_some(())
    });
    assert_eq!((share("team-a"), share("team-b")), (4000, 4000));
    // team-a's evicted work waits, blocked (nothing is idle to borrow).
    wait_for("team-a's replacements blocked", Duration::from_secs(30), || {
        job_in(&dev, "team-a", "train")["evaluations"].as_array().is_some_and(|e| e.iter().any(|e| e["status"] == "blocked")).then_some(())
    });

    // team-b submits one more (it would borrow: blocked too), then its first job ends: four
    // GPUs free. team-b's share (0) is below team-a's (4 of 8), so its newer job goes first and
    // team-a borrows the other three; team-a loses nothing more.
    // (Same priority as its first job, which it would otherwise preempt within team-b.)
    run(&dev, "eval2", &with_priority(&gpu_job("eval2", "team-b", 1, "sleep 600"), 10));
    wait_for("team-b's second job blocked", Duration::from_secs(30), || {
        job_in(&dev, "team-b", "eval2")["evaluations"].as_array().is_some_and(|e| e.iter().any(|e| e["status"] == "blocked")).then_some(())
    });
    dev.ok(&["job", "stop", "eval", "--namespace", "team-b", "--detach"]);
    wait_for("team-b 1, team-a 7", Duration::from_secs(60), || {
        (live(&job_in(&dev, "team-b", "eval2")) == 1 && live(&job_in(&dev, "team-a", "train")) == 7).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let ja = job_in(&dev, "team-a", "train");
    assert_eq!(evicted(&ja), 4, "no second eviction: the freed GPUs went by dominant share: {ja}");
    assert_eq!((share("team-a"), share("team-b")), (7000, 1000));
    // A purge followed to the end (no --detach): the job is gone, the command still succeeds
    // once its allocations stopped.
    let out = dev.ok(&["job", "stop", "train", "--namespace", "team-a", "--purge"]);
    assert!(out.contains("All allocations of \"train\" have stopped"), "{out}");
    dev.ok(&["job", "stop", "eval2", "--namespace", "team-b", "--purge", "--detach"]);
}
