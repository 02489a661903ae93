//! End-to-end garbage collection: finished batch jobs disappear with their evaluations and
//! allocations on `mlp system gc`, a live job is untouched (its task keeps running), and a
//! restart on the same data dir keeps the result.

mod common;

use std::time::Duration;

use common::{status, wait_for, Dev};
use serde_json::Value;

const BATCH: [&str; 3] = ["short-1", "short-2", "short-3"];

fn batch_job(name: &str) -> String {
    format!(
        r#"job "{name}" {{
  type = "batch"
  group "g" {{
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "/bin/true"
      }}
      resources {{
        cpu    = 10
        memory = 8
      }}
    }}
  }}
}}
"#
    )
}

const LIVE: &str = r#"job "live" {
  type = "service"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["600"]
      }
      resources {
        cpu    = 10
        memory = 8
      }
    }
  }
}
"#;

fn job_names(dev: &Dev) -> Vec<String> {
    let list = dev.json(&["job", "status", "--json"]);
    let mut names: Vec<String> = list.as_array().into_iter().flatten().filter_map(|j| j["name"].as_str().map(String::from)).collect();
    names.sort();
    names
}

fn eval_jobs(dev: &Dev) -> Vec<String> {
    let list = dev.json(&["eval", "status", "--json"]);
    let mut jobs: Vec<String> = list.as_array().into_iter().flatten().filter_map(|e| e["job_id"].as_str().map(String::from)).collect();
    jobs.sort();
    jobs.dedup();
    jobs
}

/// The live job's one running allocation id.
fn live_alloc(dev: &Dev) -> String {
    let allocs = dev.wait_allocs("live", "the live job to run", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "running");
    allocs[0]["id"].as_str().unwrap_or_default().to_string()
}

#[test]
fn system_gc_removes_finished_jobs_keeps_live_ones_and_survives_a_restart() {
    let mut dev = Dev::start();
    let live = dev.write_job("live.hcl", LIVE);
    dev.ok(&["job", "run", "--detach", live.to_str().unwrap_or_default()]);
    let mut batch_allocs = Vec::new();
    for name in BATCH {
        let f = dev.write_job(&format!("{name}.hcl"), &batch_job(name));
        dev.ok(&["job", "run", "--detach", f.to_str().unwrap_or_default()]);
    }
    for name in BATCH {
        let allocs =
            dev.wait_allocs(name, "the batch job to complete", Duration::from_secs(60), |a| a.len() == 1 && status(&a[0]) == "complete");
        batch_allocs.push(allocs[0]["id"].as_str().unwrap_or_default().to_string());
        wait_for("the batch job to be dead", Duration::from_secs(30), || (dev.job(name)["job"]["status"] == "dead").then_some(()));
    }
    let running = live_alloc(&dev);
    let mut all = BATCH.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    all.push("live".into());
    all.sort();
    assert_eq!(job_names(&dev), all);
    assert_eq!(eval_jobs(&dev), all);

    // The periodic collection (default thresholds: hours) leaves fresh objects alone; a forced
    // one takes everything eligible.
    let r: Value = dev.json(&["system", "gc", "--json"]);
    assert_eq!(r["jobs"], 3, "{r}");
    assert_eq!(r["allocs"], 3, "{r}");
    assert!(r["evals"].as_u64().unwrap_or(0) >= 3, "{r}");
    assert_eq!(r["nodes"], 0, "{r}");

    assert_eq!(job_names(&dev), ["live"]);
    assert_eq!(eval_jobs(&dev), ["live"], "the live job keeps its evaluation");
    for name in BATCH {
        let out = dev.cli(&["job", "status", name]);
        assert!(!out.status.success(), "job {name} is gone");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for id in &batch_allocs {
        assert!(!dev.cli(&["alloc", "status", id]).status.success(), "allocation {id} is gone");
    }
    // The agent hears of it (a smaller set comes whole) and deletes their directories.
    let allocs_dir = dev.data_dir().join("agent/allocs");
    wait_for("the agent to delete the collected allocations' dirs", Duration::from_secs(30), || {
        batch_allocs.iter().all(|id| !allocs_dir.join(id).exists()).then_some(())
    });
    assert!(allocs_dir.join(&running).exists(), "the live allocation's dir stays");
    assert_eq!(live_alloc(&dev), running, "the live job's allocation is untouched");
    let job = dev.job("live");
    assert_eq!(job["job"]["status"], "running");

    // Nothing is left to collect; the HTTP mirror says so too; metrics count what went.
    assert!(dev.ok(&["system", "gc"]).contains("Nothing to collect"));
    let (code, body) = dev.http("POST", "/v1/system/gc", None, b"");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["jobs"], 0, "{body}");
    let (_, metrics) = dev.http("GET", "/v1/metrics", None, b"");
    assert!(metrics.contains("mlp_gc_jobs_collected_total 3"), "{metrics}");
    assert!(metrics.contains("mlp_gc_allocs_collected_total 3"), "{metrics}");

    // The agent stopped nothing it should not have, and a restart keeps the result.
    dev.kill9();
    dev.spawn();
    assert_eq!(job_names(&dev), ["live"]);
    assert_eq!(eval_jobs(&dev), ["live"]);
    assert_eq!(live_alloc(&dev), running, "the live task was reattached, not replaced");
}

#[test]
fn bad_gc_flags_are_refused() {
    for (flags, says) in [
        (&["--gc-interval", "0s"][..], "--gc-interval must be between 1s and 720h"),
        (&["--gc-interval", "1000h"][..], "--gc-interval must be between 1s and 720h"),
        (&["--eval-gc-threshold", "soon"][..], "--eval-gc-threshold"),
        (&["--job-gc-threshold=-1h"][..], "--job-gc-threshold"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new(common::mlp())
            .args(["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(flags)
            .output()
            .expect("run mlp dev");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{flags:?}: {err}");
    }
}
