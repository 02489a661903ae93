//! MLflow metric points on disk (issue 17 §2), on a real `mlp dev`: a run's history survives
//! kill -9 and restarts (past a Raft snapshot) with nothing acknowledged lost and no point
//! twice, as MLflow's own client reads it; and the tracking GC purges deleted runs and
//! experiments (their points gone from the points tree) but not a restored run.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Dev;
use serde_json::{json, Value};

/// A POST to the MLflow API that reports failure instead of panicking (the server may be
/// killed under it): the status and JSON body, or None.
fn try_post(addr: &str, endpoint: &str, body: &Value) -> Option<(u16, Value)> {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "POST /api/2.0/mlflow/{endpoint} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let json = serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()?;
    Some((status, json))
}

fn post(dev: &Dev, endpoint: &str, body: &Value) -> (u16, Value) {
    try_post(&dev.http, endpoint, body).unwrap_or_else(|| panic!("{endpoint}: no answer\n{}", common::tail(&dev.log(), 4000)))
}

fn ok(dev: &Dev, endpoint: &str, body: &Value) -> Value {
    let (s, v) = post(dev, endpoint, body);
    assert_eq!(s, 200, "{endpoint} {body}: {v}");
    v
}

fn create_run(dev: &Dev, experiment_id: &str) -> String {
    let v = ok(dev, "runs/create", &json!({ "experiment_id": experiment_id, "start_time": 1 }));
    v["run"]["info"]["run_id"].as_str().expect("run_id").to_string()
}

fn log_steps(dev: &Dev, run: &str, steps: std::ops::Range<i64>) {
    let metrics: Vec<Value> = steps.map(|s| json!({ "key": "loss", "value": s as f64, "timestamp": 1000 + s, "step": s })).collect();
    ok(dev, "runs/log-batch", &json!({ "run_id": run, "metrics": metrics }));
}

/// The steps of `run`'s `loss` history, through every page of `metrics/get-history`.
fn history_steps(dev: &Dev, run: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let v = ok(dev, "metrics/get-history", &json!({ "run_id": run, "metric_key": "loss", "max_results": 5000, "page_token": token }));
        out.extend(v["metrics"].as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(|m| m["step"].as_i64()));
        match v["next_page_token"].as_str() {
            Some(t) => token = t.to_string(),
            None => return out,
        }
    }
}

/// The same history as MLflow's client reads it: (number of points, distinct steps).
fn client_history(dev: &Dev, run: &str) -> (usize, usize) {
    let script = "import sys, mlflow\n\
                  h = mlflow.tracking.MlflowClient().get_metric_history(sys.argv[1], 'loss')\n\
                  print(len(h), len({m.step for m in h}))";
    let out = Command::new(common::mlflow_python())
        .args(["-c", script, run])
        .env("MLFLOW_TRACKING_URI", format!("http://{}", dev.http))
        .env("MLFLOW_DISABLE_TELEMETRY", "true")
        .env("DO_NOT_TRACK", "true")
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the MLflow client failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut it = text.split_whitespace().map(|n| n.parse::<usize>().expect("a number"));
    (it.next().expect("count"), it.next().expect("distinct"))
}

/// Checks that every acknowledged step is in the history exactly once, and that nothing else
/// is, but possibly the one batch in flight when the server died.
fn assert_history(dev: &Dev, run: &str, acked: &[i64], in_flight: Option<std::ops::Range<i64>>) {
    let got = history_steps(dev, run);
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for s in &got {
        *count.entry(*s).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
    assert!(twice.is_empty(), "steps logged twice: {twice:?}");
    let lost: Vec<_> = acked.iter().filter(|s| !count.contains_key(s)).collect();
    assert!(lost.is_empty(), "{} acknowledged steps lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    let extra: Vec<_> = count.keys().filter(|s| !acked.contains(s) && !in_flight.as_ref().is_some_and(|r| r.contains(s))).collect();
    assert!(extra.is_empty(), "steps never logged: {extra:?}");
    assert_eq!(client_history(dev, run), (got.len(), got.len()), "MLflow's client reads the same history");
}

const BATCH: i64 = 5;

#[test]
fn tracking_history_survives_kill9_restarts_past_a_snapshot_without_duplicates() {
    let mut dev = Dev::start();
    let exp = ok(&dev, "experiments/create", &json!({ "name": "crash" }))["experiment_id"].as_str().expect("id").to_string();
    let run = create_run(&dev, &exp);
    // More entries than `--raft-snapshot-logs` (5,000): the restart loads a snapshot and
    // re-applies the log after it, whose points are already in the tree.
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Mutex::new(None));
    let logger = {
        let (addr, run, acked, stop, in_flight) = (dev.http.clone(), run.clone(), acked.clone(), stop.clone(), in_flight.clone());
        std::thread::spawn(move || {
            let mut step = 0;
            while !stop.load(Ordering::Relaxed) {
                let metrics: Vec<Value> =
                    (step..step + BATCH).map(|s| json!({ "key": "loss", "value": s as f64, "timestamp": 1000 + s, "step": s })).collect();
                *in_flight.lock().expect("lock") = Some(step..step + BATCH);
                match try_post(&addr, "runs/log-batch", &json!({ "run_id": run, "metrics": metrics })) {
                    Some((200, _)) => acked.lock().expect("lock").extend(step..step + BATCH),
                    _ => return,
                }
                step += BATCH;
            }
        })
    };
    common::wait_for("5,300 entries logged", Duration::from_secs(300), || {
        (acked.lock().expect("lock").len() >= 5_300 * BATCH as usize).then_some(())
    });
    dev.kill9();
    stop.store(true, Ordering::Relaxed);
    logger.join().expect("logger");
    assert!(dev.log().contains("built raft snapshot"), "a snapshot was built:\n{}", common::tail(&dev.log(), 3000));
    dev.spawn();
    let acked_steps = acked.lock().expect("lock").clone();
    let flight = in_flight.lock().expect("lock").clone();
    assert_history(&dev, &run, &acked_steps, flight.clone());

    // Logged after the restart, then killed again at once: the tree is kept across the restart
    // (not reloaded from the snapshot), and the re-applied tail adds nothing twice.
    let next = acked_steps.iter().max().map_or(0, |m| m + 1 + BATCH);
    log_steps(&dev, &run, next..next + 20);
    dev.kill9();
    dev.spawn();
    let mut all = acked_steps;
    all.extend(next..next + 20);
    assert_history(&dev, &run, &all, flight);
    assert!(dev.log().matches("load_points=false").count() >= 1, "a restart reused the tree:\n{}", common::tail(&dev.log(), 3000));
}

/// SIGTERM, then wait (bounded) for the exit.
fn stop_gracefully(mut child: std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    common::wait_for("mlp dev to exit", Duration::from_secs(30), || child.try_wait().ok().flatten().map(|_| ()));
}

/// The Raft database of a dev cluster's server.
fn raft_db(data: &Path) -> PathBuf {
    data.join("server").join("raft")
}

/// How many points of each run the stopped server's points tree holds.
fn points_on_disk(data: &Path, runs: &[&str]) -> Vec<usize> {
    let db = sled::open(raft_db(data)).expect("open the raft database");
    let tree = db.open_tree(mlp_server::tracking::points::TREE).expect("points tree");
    runs.iter().map(|r| tree.scan_prefix(mlp_server::tracking::points::run_prefix(r)).count()).collect()
}

#[test]
fn tracking_gc_purges_deleted_runs_and_experiments_but_not_a_restored_run() {
    let mut dev = Dev::start_with(&["--gc-interval", "1s", "--tracking-gc-threshold", "3s"]);
    let a = ok(&dev, "experiments/create", &json!({ "name": "keep" }))["experiment_id"].as_str().expect("id").to_string();
    let b = ok(&dev, "experiments/create", &json!({ "name": "drop" }))["experiment_id"].as_str().expect("id").to_string();
    let (deleted, restored, active, in_dropped) = (create_run(&dev, &a), create_run(&dev, &a), create_run(&dev, &a), create_run(&dev, &b));
    for r in [&deleted, &restored, &active, &in_dropped] {
        log_steps(&dev, r, 0..50);
        ok(&dev, "runs/log-parameter", &json!({ "run_id": r, "key": "lr", "value": "0.1" }));
    }
    ok(&dev, "runs/delete", &json!({ "run_id": deleted }));
    ok(&dev, "runs/delete", &json!({ "run_id": restored }));
    ok(&dev, "runs/restore", &json!({ "run_id": restored }));
    ok(&dev, "experiments/delete", &json!({ "experiment_id": b }));
    // Deleted, not yet purged: still there (MLflow's soft delete).
    assert_eq!(history_steps(&dev, &deleted).len(), 50);

    common::wait_for("the deleted run and experiment purged", Duration::from_secs(60), || {
        let gone = |endpoint: &str, body: Value| post(&dev, endpoint, &body).0 == 404;
        (gone("runs/get", json!({ "run_id": deleted }))
            && gone("experiments/get", json!({ "experiment_id": b }))
            && gone("runs/get", json!({ "run_id": in_dropped })))
        .then_some(())
    });
    let (s, v) = post(&dev, "metrics/get-history", &json!({ "run_id": deleted, "metric_key": "loss" }));
    assert_eq!((s, v["error_code"].as_str()), (404, Some("RESOURCE_DOES_NOT_EXIST")), "{v}");
    // The restored and the active run stay whole (the restored one was deleted as long ago as
    // the purged one).
    for r in [&restored, &active] {
        let v = ok(&dev, "runs/get", &json!({ "run_id": r }));
        assert_eq!(v["run"]["info"]["lifecycle_stage"], "active");
        assert_eq!(v["run"]["data"]["params"][0]["value"], "0.1");
        assert_eq!(v["run"]["data"]["metrics"][0]["step"], 49);
        assert_eq!(history_steps(&dev, r), (0..50).collect::<Vec<_>>());
    }
    // The purged runs' points are gone from the disk, the others' are not (read once the server
    // has stopped and let go of its database).
    let child = dev.child.take().expect("dev process");
    stop_gracefully(child);
    let data = dev.data_dir();
    assert_eq!(points_on_disk(&data, &[&deleted, &in_dropped, &restored, &active]), vec![0, 0, 50, 50]);
}
