//! `mlp operator snapshot save | restore` on `mlp dev`: a state larger than one gRPC message
//! (4 MiB) saves and restores (both stream), and after a restore the agent stops the allocations
//! the restored state no longer has; metric points save and restore exactly.

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

/// An MLflow API call on the dev server; panics unless it answers 200.
fn mlflow(dev: &Dev, endpoint: &str, body: serde_json::Value) -> serde_json::Value {
    let (code, resp) = mlflow_try(dev, endpoint, body.clone());
    assert_eq!(code, 200, "{endpoint} {body}: {resp}");
    resp
}

fn mlflow_try(dev: &Dev, endpoint: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (code, resp) =
        dev.http("POST", &format!("/api/2.0/mlflow/{endpoint}"), Some("application/json"), &serde_json::to_vec(&body).expect("json"));
    (code, serde_json::from_str(&resp).unwrap_or(serde_json::Value::String(resp)))
}

/// Logs `n` points of `key` to `run` from step `from`, in batches of 1,000 (MLflow's limit):
/// timestamps go down while steps go up, and every fifth step repeats, so logged order, steps
/// and timestamps all have to come back as they were.
fn log_points(dev: &Dev, run: &str, key: &str, from: i64, n: i64) {
    let points: Vec<serde_json::Value> = (from..from + n)
        .map(|i| {
            let step = i - i64::from(i % 5 == 4);
            serde_json::json!({ "key": key, "value": (i as f64) * 0.25 - 7.0, "timestamp": 1_000_000_000 - i, "step": step })
        })
        .collect();
    for batch in points.chunks(1000) {
        mlflow(dev, "runs/log-batch", serde_json::json!({ "run_id": run, "metrics": batch }));
    }
}

/// `run`'s whole history of `key` as the API answers it (key, value, timestamp, step per point),
/// or None when the run does not exist.
fn history(dev: &Dev, run: &str, key: &str) -> Option<serde_json::Value> {
    let (code, resp) = mlflow_try(dev, "metrics/get-history", serde_json::json!({ "run_id": run, "metric_key": key }));
    match code {
        200 => Some(resp["metrics"].clone()),
        404 => None,
        _ => panic!("get-history {run} {key}: {code} {resp}"),
    }
}

type Histories = std::collections::BTreeMap<(String, String), Option<serde_json::Value>>;

fn histories(dev: &Dev, runs: &[&String], keys: &[&str]) -> Histories {
    runs.iter().flat_map(|r| keys.iter().map(move |k| ((r.to_string(), k.to_string()), history(dev, r, k)))).collect()
}

/// A snapshot file of the given payload, as the CLI writes one.
fn write_snapshot_file(path: &std::path::Path, version: &str, index: u64, payload: &[u8]) {
    let mut bytes =
        format!("mlp-snapshot {version} index={index} len={} crc32={:08x}\n", payload.len(), crc32fast::hash(payload)).into_bytes();
    bytes.extend_from_slice(payload);
    std::fs::write(path, bytes).expect("write snapshot");
}

/// A snapshot file's header fields and payload.
fn read_snapshot_file(path: &std::path::Path) -> (String, u64, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read snapshot");
    let nl = bytes.iter().position(|b| *b == b'\n').expect("header line");
    let header = String::from_utf8(bytes[..nl].to_vec()).expect("header");
    let index = header.split_whitespace().find_map(|f| f.strip_prefix("index=")).and_then(|i| i.parse().ok()).expect("index");
    (header, index, bytes[nl + 1..].to_vec())
}

/// `mlp operator snapshot save` carries every metric point and `restore` brings them back
/// exactly (later points, runs and changes gone), committing them in several Raft entries; a
/// file of the older format (the state alone) still restores, keeping the points of the runs it
/// has; a file whose points section does not decode (with a valid checksum) changes nothing.
#[test]
fn snapshot_restore_brings_back_every_metric_point_exactly() {
    let dev = Dev::start();
    let exp = mlflow(&dev, "experiments/create", serde_json::json!({ "name": "snap" }))["experiment_id"].as_str().expect("id").to_string();
    let new_run = |dev: &Dev| {
        mlflow(dev, "runs/create", serde_json::json!({ "experiment_id": exp, "start_time": 1 }))["run"]["info"]["run_id"]
            .as_str()
            .expect("run_id")
            .to_string()
    };
    let (big, small, gone) = (new_run(&dev), new_run(&dev), new_run(&dev));
    // About 1.3 MB of points section for `big`: more than one `RestorePoints` chunk (512 KiB).
    log_points(&dev, &big, "loss", 0, 60_000);
    log_points(&dev, &big, "acc", 0, 2_500);
    for (i, r) in [&small, &gone].into_iter().enumerate() {
        log_points(&dev, r, "loss", 10 * i as i64, 1_200);
        log_points(&dev, r, "acc", 0, 37);
        log_points(&dev, r, "lr", 5, 3);
    }
    let keys = ["loss", "acc", "lr"];
    let runs = [&big, &small, &gone];
    let saved = histories(&dev, &runs, &keys);
    let total: usize = saved.values().map(|h| h.as_ref().and_then(|h| h.as_array()).map_or(0, Vec::len)).sum();
    assert_eq!(total, 60_000 + 2_500 + 2 * (1_200 + 37 + 3));

    let file = dev.dir.path().join("points.snap");
    let out = dev.ok(&["operator", "snapshot", "save", file.to_str().expect("path")]);
    assert!(out.contains("with every metric point"), "{out}");
    let inspect = dev.json(&["operator", "snapshot", "inspect", "--json", file.to_str().expect("path")]);
    assert_eq!(inspect["metric_points"], total as u64, "{inspect}");

    // Afterwards: more points, a new key, a run deleted, a new run.
    log_points(&dev, &big, "loss", 60_000, 500);
    log_points(&dev, &small, "new-key", 0, 10);
    mlflow(&dev, "runs/delete", serde_json::json!({ "run_id": gone }));
    let later = new_run(&dev);
    log_points(&dev, &later, "loss", 0, 50);
    assert_ne!(histories(&dev, &runs, &keys), saved);

    let out = dev.ok(&["operator", "snapshot", "restore", file.to_str().expect("path")]);
    assert!(out.contains(&format!("and {total} metric points")), "{out}");
    assert_eq!(histories(&dev, &runs, &keys), saved, "every history exactly as saved");
    assert_eq!(history(&dev, &small, "new-key").map(|h| h.as_array().map_or(0, Vec::len)), Some(0), "a later key is gone");
    assert_eq!(history(&dev, &later, "loss"), None, "a run created later is gone");
    let gone_run = mlflow(&dev, "runs/get", serde_json::json!({ "run_id": gone }));
    assert_eq!(gone_run["run"]["info"]["lifecycle_stage"], "active");
    let log = dev.log();
    let chunks = log
        .lines()
        .filter(|l| l.contains("metric points restored from an operator's snapshot"))
        .find_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("chunks=")).and_then(|n| n.parse::<u32>().ok()));
    assert!(chunks.is_some_and(|n| n >= 2), "the points took several Raft entries: {chunks:?}");
    // The cluster keeps logging after a restore, after the restored points.
    log_points(&dev, &big, "acc", 2_500, 5);
    let acc = history(&dev, &big, "acc").expect("big");
    assert_eq!(acc.as_array().map(Vec::len), Some(2_505));
    assert_eq!(acc[2_504]["timestamp"], 1_000_000_000 - 2_504, "the new point comes last");

    // The older format: the same state without its points section.
    let (_, index, payload) = read_snapshot_file(&file);
    assert!(payload.starts_with(b"MLPSNAP2"));
    let state_len = u64::from_le_bytes(payload[8..16].try_into().expect("length")) as usize;
    let state = &payload[16..16 + state_len];
    let old = dev.dir.path().join("old.snap");
    write_snapshot_file(&old, "v1", index, state);
    log_points(&dev, &small, "loss", 5_000, 7);
    let later = new_run(&dev);
    log_points(&dev, &later, "loss", 0, 50);
    let before = history(&dev, &small, "loss").expect("small");
    let out = dev.ok(&["operator", "snapshot", "restore", old.to_str().expect("path")]);
    assert!(out.contains("and 0 metric points"), "{out}");
    assert_eq!(history(&dev, &later, "loss"), None, "a run the old state does not have is gone");
    assert_eq!(history(&dev, &small, "loss"), Some(before), "an older snapshot keeps the points of the runs it has");
    assert_eq!(history(&dev, &big, "loss"), saved[&(big.clone(), "loss".to_string())]);

    // A points section that does not decode (the checksum matches): refused, nothing changes.
    let marker = new_run(&dev);
    log_points(&dev, &marker, "loss", 0, 3);
    let current = histories(&dev, &[&big, &small, &marker], &keys);
    let corrupt = dev.dir.path().join("corrupt.snap");
    write_snapshot_file(&corrupt, "v2", index, &payload[..payload.len() - 3]);
    let out = dev.cli(&["operator", "snapshot", "restore", corrupt.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("metric points do not decode") && err.contains("nothing was changed"), "{err}");
    assert_eq!(histories(&dev, &[&big, &small, &marker], &keys), current, "a refused restore changed nothing");
}
