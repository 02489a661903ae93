//! Bad input gets a precise error and changes nothing: job files (exact messages, snapshot
//! tested), HTTP requests (4xx with a JSON error), CLI flags.

mod common;

use std::process::Command;

use common::{mlp, Dev};

/// Runs `mlp job validate FILE` in a temp dir with a relative file name; returns (code, stderr).
fn validate(name: &str, body: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(name), body).expect("write");
    let out = Command::new(mlp()).args(["job", "validate", name]).current_dir(dir.path()).output().expect("run");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_job_files_give_exact_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "typo.hcl",
            r#"job "a" {
  group "g" {
    task "t" {
      driver = "exec"
      config { command = "/bin/true" }
      resources { memroy = 10 }
    }
  }
}
"#,
        ),
        (
            "types.hcl",
            r#"job "a" {
  priority = "high"
  group "g" {
    count = -1
    task "t" {
      config { command = "/bin/true" }
      kill_timeout = "5 parsecs"
    }
  }
}
"#,
        ),
        ("syntax.hcl", "job \"a\" {\n  group \"g\" {\n    task \"t\" {\n      driver = \n"),
        (
            "driver.hcl",
            r#"job "a" {
  type = "cron"
  group "g" {
    task "t" {
      driver = "docker"
      config { command = "/bin/true" }
    }
    task "t" {
      driver = "exec"
      config { command = "/bin/true" }
    }
  }
}
"#,
        ),
    ];
    let mut all = String::new();
    for (name, body) in cases {
        let (code, err) = validate(name, body);
        assert_eq!(code, 1, "{name} must fail: {err}");
        all.push_str(&format!("--- {name}\n{err}"));
    }
    insta::assert_snapshot!(all);
}

#[test]
fn valid_example_files_validate() {
    for f in ["examples/train.hcl", "examples/serve.hcl", "examples/mlflow-train.hcl"] {
        let out = Command::new(mlp()).args(["job", "validate", f]).current_dir(common::repo_root()).output().expect("run");
        assert!(out.status.success(), "{f}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
    }
}

#[test]
fn bad_cli_flags_are_rejected() {
    let out = Command::new(mlp()).args(["job", "status", "--bogus"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    let out = Command::new(mlp()).args(["dev", "--heartbeat-ttl", "0"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat-ttl"));
    for (flags, says) in [
        (&["--exec-bind-ro", "relative/dir"][..], "--exec-bind-ro relative/dir: must be an absolute path"),
        (&["--exec-bind-ro", "/no/such/mlp/path"][..], "no such file or directory"),
        (&["--exec-default-user", "root"][..], "--exec-default-user root is also in --exec-refused-users"),
        (&["--exec-default-pids", "0"][..], "--exec-default-pids must be at least 1"),
        (&["--exec-refused-users", "a b"][..], "is not a user name"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(mlp()).arg("dev").args(flags).arg("--data-dir").arg(dir.path()).output().expect("run");
        assert!(!out.status.success(), "{flags:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flags:?}: {err}");
        // Nothing started: no server or agent state written.
        assert!(!dir.path().join("server").exists(), "{flags:?} started the server");
    }
    let out = Command::new(mlp()).args(["job", "status"]).env("MLP_ADDR", "127.0.0.1:1").output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the mlp server"));
}

#[test]
fn http_api_rejects_bad_requests_and_changes_nothing() {
    let dev = Dev::start();
    let json = Some("application/json");
    let (code, body) = dev.http("POST", "/v1/jobs", json, b"{not json");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");

    let (code, body) = dev.http("POST", "/v1/jobs", json, br#"{"job": {"name": 5}}"#);
    assert_eq!(code, 422, "wrong type: {body}");

    let (code, body) = dev.http("POST", "/v1/jobs", json, br#"{"jobb": {}}"#);
    assert_eq!(code, 422, "unknown field: {body}");
    assert!(body.contains("jobb"), "{body}");

    let (code, body) = dev.http("POST", "/v1/jobs", None, br#"{"job": {}}"#);
    assert_eq!(code, 415, "missing content type: {body}");

    let (code, body) = dev.http("POST", "/v1/jobs", json, br#"{"job": {"name": "x", "type": "batch", "groups": []}}"#);
    assert_eq!(code, 400, "semantically invalid: {body}");
    assert!(body.contains("group"), "{body}");

    let (code, body) = dev.http("POST", "/v1/jobs", json, br#"{"hcl": "job \"x\" {\n  bogus = 1\n}\n"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("<request>:2:3"), "HCL errors carry positions: {body}");

    let big = vec![b'x'; 2 * 1024 * 1024];
    let (code, _) = dev.http("POST", "/v1/jobs", json, &big);
    assert_eq!(code, 413, "oversized body");

    let (code, body) = dev.http("GET", "/v1/job/nope", None, b"");
    assert_eq!(code, 404, "{body}");
    let (code, _) = dev.http("GET", "/v1/nothing-here", None, b"");
    assert_eq!(code, 404);

    let (code, body) = dev.http("GET", "/v1/jobs", None, b"");
    assert_eq!((code, body.trim()), (200, "[]"), "nothing was registered");

    // A good submission through HTTP works and is visible over gRPC.
    let hcl = std::fs::read_to_string(common::repo_root().join("examples/train.hcl")).expect("read");
    let body = serde_json::json!({ "hcl": hcl }).to_string();
    let (code, resp) = dev.http("POST", "/v1/jobs", json, body.as_bytes());
    assert_eq!(code, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    assert!(v["eval_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(dev.job("train")["job"]["name"], "train");
    // A minimal JSON job gets the same defaults a job file would.
    let (code, resp) = dev.http(
        "POST",
        "/v1/jobs",
        json,
        br#"{"job": {"name": "mini", "groups": [{"name": "g", "count": 1, "tasks": [{"name": "t", "driver": "exec", "config": {"command": "/bin/true"}}]}]}}"#,
    );
    assert_eq!(code, 200, "{resp}");
    let mini = dev.job("mini");
    assert_eq!(mini["job"]["type"], "service");
    assert_eq!(mini["job"]["priority"], 50);
    assert_eq!(mini["job"]["groups"][0]["tasks"][0]["resources"]["memory_mib"], 300);
    let (code, body) = dev.http("GET", "/v1/status/leader", None, b"");
    assert_eq!(code, 200);
    assert!(body.contains(&dev.grpc), "{body}");
    let (code, body) = dev.http("GET", "/v1/metrics", None, b"");
    assert_eq!(code, 200);
    assert!(body.contains("mlp_job_registrations_total 2"), "{body}");
    assert!(body.contains("mlp_raft_is_leader 1"), "{body}");
}
