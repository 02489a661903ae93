//! `mlp operator snapshot save | restore` on `mlp dev`: a state larger than one gRPC message
//! (4 MiB) saves and restores (both stream), and after a restore the agent stops the allocations
//! the restored state no longer has.

mod common;

use std::time::Duration;

use common::{wait_for, Dev};

#[test]
fn snapshots_stream_and_a_restore_stops_what_the_state_no_longer_has() {
    let dev = Dev::start();
    wait_for("the dev node to be ready", Duration::from_secs(30), || {
        let nodes = dev.json(&["node", "status", "--json"]);
        nodes.as_array().is_some_and(|n| n.iter().any(|n| n["status"] == "ready")).then_some(())
    });
    let empty = dev.dir.path().join("empty.snap");
    dev.ok(&["operator", "snapshot", "save", empty.to_str().expect("path")]);

    // 50 jobs with 60 KB of meta each: the saved state (jobs and their versions) is over 4 MiB.
    let meta = "m".repeat(60_000);
    for i in 0..50 {
        let body = serde_json::json!({ "job": {
            "name": format!("big-{i}"), "type": "batch", "meta": { "blob": meta },
            "groups": [{ "name": "g", "count": 0, "tasks": [{ "name": "t", "driver": "raw_exec", "config": { "command": "/bin/true" } }] }]
        }});
        let (code, resp) = dev.http("POST", "/v1/jobs", Some("application/json"), &serde_json::to_vec(&body).expect("json"));
        assert_eq!(code, 200, "{resp}");
    }
    let job = dev.write_job(
        "sleeper.hcl",
        r#"job "sleeper" {
  type = "service"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["300"]
      }
    }
  }
}
"#,
    );
    dev.ok(&["job", "run", job.to_str().expect("path")]);
    let running = wait_for("the sleeper's process", Duration::from_secs(30), || {
        let pids = common::processes_under(dev.dir.path());
        pids.iter()
            .any(|&p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with("/bin/sleep")))
            .then_some(pids)
    });
    assert!(!running.is_empty());

    let big = dev.dir.path().join("big.snap");
    dev.ok(&["operator", "snapshot", "save", big.to_str().expect("path")]);
    let size = std::fs::metadata(&big).expect("snapshot file").len();
    assert!(size > 4 * 1024 * 1024, "the saved state is {size} bytes; the test needs more than one gRPC message");

    // Back to the state without the sleeper: its task must stop.
    dev.ok(&["operator", "snapshot", "restore", empty.to_str().expect("path")]);
    let jobs = dev.json(&["job", "status", "--json"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");
    wait_for("the agent to stop the allocation the restored state no longer has", Duration::from_secs(60), || {
        let sleeping = common::processes_under(dev.dir.path())
            .into_iter()
            .any(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with("/bin/sleep")));
        (!sleeping).then_some(())
    });

    // And the large state restores whole.
    dev.ok(&["operator", "snapshot", "restore", big.to_str().expect("path")]);
    let jobs = dev.json(&["job", "status", "--json"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(51), "every job of the large state is back");
    dev.ok(&["job", "stop", "sleeper"]);
}
