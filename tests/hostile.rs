//! The hostile-input corpus (`tests/fixtures/hostile/`, written by its `generate.py`): every case
//! is refused with the error it names, offline and at every door of a running server (HTTP JSON,
//! HTTP with HCL text, gRPC `Register` and `Plan`), and afterwards the server answers, holds no
//! job, logged no panic, and comes back the same after a restart.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{mlp, Dev};
use mlp_proto::v1::job_service_client::JobServiceClient;
use mlp_proto::v1::{Job, PlanJobRequest, RegisterJobRequest};

fn corpus() -> PathBuf {
    common::repo_root().join("tests/fixtures/hostile")
}

/// (name, text, expected error) for every case with extension `ext`.
fn cases(ext: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(corpus()).expect("corpus dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        let name = path.file_stem().and_then(|s| s.to_str()).expect("name").to_string();
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read case")).into_owned();
        let expect = if ext == "hcl" {
            text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("first line `# expect: …`").to_string()
        } else {
            std::fs::read_to_string(path.with_extension("expect")).expect(".expect file").trim().to_string()
        };
        out.push((name, text, expect));
    }
    out.sort();
    assert!(out.len() >= 10, "the {ext} corpus is missing: found {} cases in {}", out.len(), corpus().display());
    out
}

#[test]
fn hcl_corpus_is_refused_offline_with_its_error() {
    for (name, _, expect) in cases("hcl") {
        let file = corpus().join(format!("{name}.hcl"));
        let out = Command::new(mlp()).args(["job", "validate"]).arg(&file).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: must be refused, got: {err}");
        assert!(err.contains(&expect), "{name}: expected an error containing {expect:?}, got: {err}");
    }
    // Too big to keep as a file.
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.hcl");
    std::fs::write(&big, format!("job \"x\" {{\n  meta {{\n    a = \"{}\"\n  }}\n}}\n", "x".repeat(1_100_000))).expect("write");
    let out = Command::new(mlp()).args(["job", "validate"]).arg(&big).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit: job spec size"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn hostile_jobs_are_refused_at_every_door_and_change_nothing() {
    let mut dev = Dev::start();
    let json = Some("application/json");

    for (name, text, expect) in cases("hcl") {
        let body = serde_json::to_vec(&serde_json::json!({ "hcl": text })).expect("encode");
        let (code, resp) = dev.http("POST", "/v1/jobs", json, &body);
        assert!((400..500).contains(&code), "{name} over HTTP (HCL): expected 4xx, got {code}: {resp}");
        assert!(resp.contains(&expect), "{name} over HTTP (HCL): expected {expect:?} in {resp}");
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut client = rt.block_on(JobServiceClient::connect(format!("http://{}", dev.grpc))).expect("connect gRPC");
    for (name, text, expect) in cases("json") {
        let (code, resp) = dev.http("POST", "/v1/jobs", json, text.as_bytes());
        assert!((400..500).contains(&code), "{name} over HTTP (JSON): expected 4xx, got {code}: {resp}");
        assert!(resp.contains(&expect), "{name} over HTTP (JSON): expected {expect:?} in {resp}");
        if !name.starts_with("job_") {
            continue;
        }
        // The same job through the API of record: one validator for every door.
        let value: serde_json::Value = serde_json::from_str(&text).expect("job_ cases are JSON");
        let job: Job = serde_json::from_value(value["job"].clone()).expect("job_ cases decode");
        let err = rt
            .block_on(client.register(RegisterJobRequest { job: Some(job.clone()), ..Default::default() }))
            .expect_err(&format!("{name}: gRPC Register must refuse"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
        assert!(err.message().contains(&expect), "{name} over gRPC Register: expected {expect:?} in {}", err.message());
        let err = rt.block_on(client.plan(PlanJobRequest { job: Some(job) })).expect_err(&format!("{name}: gRPC Plan must refuse"));
        assert!(err.message().contains(&expect), "{name} over gRPC Plan: expected {expect:?} in {}", err.message());
    }

    // A pattern that backtracking matchers take exponential time on is fine here: the regex
    // crate is linear. The job registers and the server goes on answering.
    let file = dev.write_job(
        "backtrack.hcl",
        r#"job "backtrack" {
  type = "batch"
  constraint {
    attribute = "${attr.kernel.name}"
    operator  = "regexp"
    value     = "^(a+)+$"
  }
  group "g" {
    task "t" {
      driver = "raw_exec"
      config { command = "/bin/true" }
    }
  }
}
"#,
    );
    let file = file.to_str().expect("path");
    let plan = dev.cli(&["job", "plan", file]);
    assert!(String::from_utf8_lossy(&plan.stdout).contains("filtered 1 node"), "{plan:?}");
    dev.ok(&["job", "run", "--detach", file]);

    let jobs = dev.json(&["job", "status", "--json"]);
    let names: Vec<&str> = jobs.as_array().expect("list").iter().filter_map(|j| j["name"].as_str()).collect();
    assert_eq!(names, vec!["backtrack"], "only the acceptable job was registered");
    assert!(!dev.log().contains("panicked"), "the server logged a panic:\n{}", common::tail(&dev.log(), 4000));
    assert!(!dev.log().contains('\u{1b}'), "colour codes in a log that is not a terminal");

    // The committed state replays cleanly.
    dev.kill9();
    dev.spawn();
    let jobs = dev.json(&["job", "status", "--json"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
}
