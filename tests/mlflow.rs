//! MLflow's tracking, registry and artifact API on `mlp dev` (issue 17): the real client
//! (mlflow-skinny from PyPI, in a virtualenv that `.ci/run` creates) drives it end to end, and
//! raw HTTP checks MLflow's error shape, limits, and that refused input changes nothing.

mod common;

use std::time::Duration;

use common::Dev;
use serde_json::{json, Value};

#[test]
fn mlflow_client_end_to_end() {
    let python = common::mlflow_python();
    let dev = Dev::start();
    let script = common::repo_root().join("tests").join("mlflow").join("client.py");
    let (status, out, err) = common::run_mlflow_script(&python, &script, &[], &dev.http, 30);
    let ok = status.is_some_and(|s| s.success()) && out.contains("mlflow client e2e: ok");
    assert!(
        ok,
        "the MLflow client script failed ({status:?}):\nstdout:\n{out}\nstderr:\n{}\nserver log:\n{}",
        common::tail(&err, 8000),
        common::tail(&dev.log(), 4000)
    );
}

fn call(dev: &Dev, method: &str, endpoint: &str, body: &Value) -> (u16, Value) {
    let (code, text) = dev.http(method, &format!("/api/2.0/mlflow/{endpoint}"), Some("application/json"), body.to_string().as_bytes());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{endpoint}: not JSON ({e}): {text:?}"));
    (code, v)
}

fn refused(dev: &Dev, endpoint: &str, body: &Value, status: u16, code: &str) -> String {
    let (s, v) = call(dev, "POST", endpoint, body);
    assert_eq!((s, v["error_code"].as_str()), (status, Some(code)), "{endpoint} {body}: {v}");
    v["message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn mlflow_http_errors_limits_and_refusals_change_nothing() {
    let dev = Dev::start();
    let (s, v) = call(&dev, "POST", "experiments/create", &json!({ "name": "limits" }));
    assert_eq!(s, 200, "{v}");
    let exp = v["experiment_id"].as_str().expect("experiment_id").to_string();
    let (s, v) = call(&dev, "POST", "runs/create", &json!({ "experiment_id": exp, "start_time": 1 }));
    assert_eq!(s, 200, "{v}");
    let run = v["run"]["info"]["run_id"].as_str().expect("run_id").to_string();
    assert_eq!(v["run"]["info"]["status"], "RUNNING");
    let (s, _) = call(&dev, "POST", "runs/log-parameter", &json!({ "run_id": run, "key": "lr", "value": "0.1" }));
    assert_eq!(s, 200);
    let (_, before) = call(&dev, "GET", &format!("runs/get?run_id={run}"), &json!({}));

    // Unknown paths: MLflow's JSON 404, never an HTML or empty one.
    for path in ["/api/2.0/mlflow/nope", "/api/2.0/mlflow/runs/nope", "/api/2.0/mlflow-artifacts/nope", "/api/3.0/mlflow/traces/x"] {
        let (s, text) = dev.http("GET", path, None, b"");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text:?}"));
        assert_eq!((s, v["error_code"].as_str()), (404, Some("ENDPOINT_NOT_FOUND")), "{path}: {v}");
    }
    // Missing things.
    refused(&dev, "runs/get", &json!({ "run_id": "nope" }), 404, "RESOURCE_DOES_NOT_EXIST");
    refused(&dev, "experiments/get-by-name", &json!({ "experiment_name": "nope" }), 404, "RESOURCE_DOES_NOT_EXIST");
    refused(&dev, "runs/log-metric", &json!({ "run_id": "nope", "key": "m", "value": 1, "timestamp": 1 }), 404, "RESOURCE_DOES_NOT_EXIST");
    refused(&dev, "experiments/create", &json!({ "name": "limits" }), 400, "RESOURCE_ALREADY_EXISTS");
    refused(&dev, "experiments/create", &json!({}), 400, "INVALID_PARAMETER_VALUE");
    refused(&dev, "experiments/create", &json!({ "name": "x".repeat(251) }), 400, "INVALID_PARAMETER_VALUE");
    refused(&dev, "runs/update", &json!({ "run_id": run, "status": "SLEEPY" }), 400, "INVALID_PARAMETER_VALUE");
    refused(&dev, "runs/search", &json!({ "experiment_ids": [exp], "filter": "metrics.m > 'a'" }), 400, "INVALID_PARAMETER_VALUE");
    // Params are immutable.
    let m = refused(&dev, "runs/log-parameter", &json!({ "run_id": run, "key": "lr", "value": "0.2" }), 400, "INVALID_PARAMETER_VALUE");
    assert!(m.contains("Changing param values is not allowed"), "{m}");
    // log-batch limits: 1,000 metrics, 100 params, 100 tags, 1,000 items, 1 MB.
    let metric = |i: usize| json!({ "key": format!("m{i}"), "value": 1.0, "timestamp": 1, "step": 0 });
    let kv = |p: &str, i: usize| json!({ "key": format!("{p}{i}"), "value": "v" });
    let metrics: Vec<Value> = (0..1001).map(metric).collect();
    refused(&dev, "runs/log-batch", &json!({ "run_id": run, "metrics": metrics }), 400, "INVALID_PARAMETER_VALUE");
    let params: Vec<Value> = (0..101).map(|i| kv("p", i)).collect();
    refused(&dev, "runs/log-batch", &json!({ "run_id": run, "params": params }), 400, "INVALID_PARAMETER_VALUE");
    let tags: Vec<Value> = (0..101).map(|i| kv("t", i)).collect();
    refused(&dev, "runs/log-batch", &json!({ "run_id": run, "tags": tags }), 400, "INVALID_PARAMETER_VALUE");
    let metrics: Vec<Value> = (0..950).map(metric).collect();
    let params: Vec<Value> = (0..60).map(|i| kv("p", i)).collect();
    refused(&dev, "runs/log-batch", &json!({ "run_id": run, "metrics": metrics, "params": params }), 400, "INVALID_PARAMETER_VALUE");
    let big = "v".repeat(6001);
    refused(&dev, "runs/log-parameter", &json!({ "run_id": run, "key": "big", "value": big }), 400, "INVALID_PARAMETER_VALUE");
    let huge = json!({ "run_id": run, "tags": [kv("t", 1)], "padding": "x".repeat(1024 * 1024) });
    let m = refused(&dev, "runs/log-batch", &huge, 400, "INVALID_PARAMETER_VALUE");
    assert!(m.contains("larger than the limit"), "{m}");
    // A batch whose param conflicts is refused whole: its metric and tag are not logged.
    let mixed = json!({ "run_id": run, "metrics": [metric(7)], "params": [{ "key": "lr", "value": "0.5" }], "tags": [kv("t", 1)] });
    refused(&dev, "runs/log-batch", &mixed, 400, "INVALID_PARAMETER_VALUE");
    let (_, after) = call(&dev, "GET", &format!("runs/get?run_id={run}"), &json!({}));
    assert_eq!(before, after, "refused requests changed the run");

    // A full batch at the limits is accepted.
    let metrics: Vec<Value> = (0..900).map(metric).collect();
    let params: Vec<Value> = (0..50).map(|i| kv("p", i)).collect();
    let tags: Vec<Value> = (0..50).map(|i| kv("t", i)).collect();
    let (s, v) = call(&dev, "POST", "runs/log-batch", &json!({ "run_id": run, "metrics": metrics, "params": params, "tags": tags }));
    assert_eq!(s, 200, "{v}");
    let (_, got) = call(&dev, "GET", &format!("runs/get?run_id={run}"), &json!({}));
    assert_eq!(got["run"]["data"]["metrics"].as_array().map(Vec::len), Some(900));
    assert_eq!(got["run"]["data"]["params"].as_array().map(Vec::len), Some(51));

    // Artifacts: paths that escape are refused; an upload reads back.
    let (s, text) = dev.http("PUT", "/api/2.0/mlflow-artifacts/artifacts/a/../b", Some("text/plain"), b"x");
    assert_eq!(s, 400, "{text}");
    let (s, text) = dev.http("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/r/f.txt", Some("text/plain"), b"data");
    assert_eq!(s, 200, "{text}");
    let (s, text) = dev.http("GET", "/api/2.0/mlflow-artifacts/artifacts/0/r/f.txt", None, b"");
    assert_eq!((s, text.as_str()), (200, "data"));
    let (s, text) = dev.http("GET", "/api/2.0/mlflow-artifacts/artifacts?path=0/r", None, b"");
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v, json!({ "files": [{ "path": "f.txt", "is_dir": false, "file_size": 4 }] }));
    let (s, text) = dev.http("GET", "/api/2.0/mlflow-artifacts/artifacts/0/r/missing", None, b"");
    assert_eq!(s, 404, "{text}");
}

/// A job whose task logs with MLflow and has no tracking configuration (issue 17 §3): the
/// agent gives it `MLFLOW_TRACKING_URI` (the server it registered with) and
/// `MLFLOW_RUN_CONTEXT`, so the run lands on the cluster tagged with the job, its version, the
/// allocation and the node that produced it. A task that sets its own variable keeps it.
#[test]
fn a_job_logs_to_the_cluster_with_lineage_and_no_configuration() {
    let python = common::mlflow_python();
    let dev = Dev::start();
    let train = r#"
import mlflow, os
mlflow.set_experiment("from-a-job")
with mlflow.start_run():
    mlflow.log_param("lr", "0.01")
    for step in range(3):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
"#;
    let job = format!(
        r#"
job "trainer" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    task "train" {{
      driver = "raw_exec"
      config {{
        command = "{python}"
        args    = ["-c", {script}]
      }}
      env {{
        MLFLOW_DISABLE_TELEMETRY = "true"
        DO_NOT_TRACK             = "true"
      }}
    }}
    task "own" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", "echo \"$MLFLOW_TRACKING_URI\" > $MLP_TASK_DIR/uri"]
      }}
      env {{
        MLFLOW_TRACKING_URI = "http://elsewhere.invalid:5000"
      }}
    }}
  }}
}}
"#,
        python = python.display(),
        script = serde_json::to_string(train).expect("json string"),
    );
    dev.ok(&["job", "run", dev.write_job("trainer.hcl", &job).to_str().expect("path")]);
    let done = dev.wait_allocs("trainer", "the training job to finish", Duration::from_secs(120), |a| {
        a.len() == 1 && ["complete", "failed"].contains(&common::status(&a[0]))
    });
    let alloc = &done[0];
    let alloc_id = alloc["id"].as_str().expect("alloc id").to_string();
    let task_log = |task: &str, stream: &str| {
        let p = dev.data_dir().join("agent").join("allocs").join(&alloc_id).join(task).join("logs").join(format!("{task}.{stream}.0"));
        std::fs::read_to_string(&p).unwrap_or_default()
    };
    assert_eq!(
        common::status(alloc),
        "complete",
        "the job failed: {alloc}\ntrain stderr:\n{}",
        common::tail(&task_log("train", "stderr"), 4000)
    );

    // The run is on the cluster, with the job's lineage as tags.
    let (s, v) = call(&dev, "POST", "experiments/get-by-name", &json!({ "experiment_name": "from-a-job" }));
    assert_eq!(s, 200, "{v}");
    let exp = v["experiment"]["experiment_id"].as_str().expect("experiment_id").to_string();
    let (s, v) = call(&dev, "POST", "runs/search", &json!({ "experiment_ids": [exp], "filter": "tags.`mlp.job` = 'trainer'" }));
    assert_eq!(s, 200, "{v}");
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(runs.len(), 1, "{v}");
    let tags: std::collections::BTreeMap<String, String> = runs[0]["data"]["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| (t["key"].as_str().unwrap_or_default().to_string(), t["value"].as_str().unwrap_or_default().to_string()))
        .collect();
    let node_id = alloc["node_id"].as_str().expect("node_id");
    for (k, want) in [
        ("mlp.job", "trainer"),
        ("mlp.job_version", "0"),
        ("mlp.namespace", "default"),
        ("mlp.group", "g"),
        ("mlp.task", "train"),
        ("mlp.alloc", alloc_id.as_str()),
        ("mlp.node", node_id),
    ] {
        assert_eq!(tags.get(k).map(String::as_str), Some(want), "tag {k}: {tags:?}");
    }
    let (_, hist) = call(
        &dev,
        "GET",
        &format!("metrics/get-history?run_id={}&metric_key=loss", runs[0]["info"]["run_id"].as_str().unwrap_or_default()),
        &json!({}),
    );
    assert_eq!(hist["metrics"].as_array().map(Vec::len), Some(3), "{hist}");

    // The task that set its own tracking URI kept it.
    let uri = std::fs::read_to_string(dev.data_dir().join("agent").join("allocs").join(&alloc_id).join("own").join("local").join("uri"))
        .expect("the own task's output");
    assert_eq!(uri.trim(), "http://elsewhere.invalid:5000");

    // The CLI views: `mlp run list|show`, `mlp model list|show|alias`.
    let run_id = runs[0]["info"]["run_id"].as_str().expect("run_id").to_string();
    let listed = dev.json(&["run", "list", "--experiment", "from-a-job", "--filter", "tags.`mlp.job` = 'trainer'", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["run_id"], run_id.as_str());
    assert_eq!(listed[0]["tags"]["mlp.alloc"], alloc_id.as_str());
    assert_eq!(listed[0]["metrics"]["loss"], json!(1.0 / 3.0));
    let none = dev.json(&["run", "list", "--filter", "tags.`mlp.job` = 'nobody'", "--json"]);
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let shown = dev.ok(&["run", "show", &run_id]);
    assert!(shown.contains("mlp.node") && shown.contains(node_id) && shown.contains("lr") && shown.contains("0.01"), "{shown}");
    let bad = dev.cli(&["run", "list", "--filter", "metrics.loss >"]);
    assert!(!bad.status.success(), "a bad filter is refused");
    assert!(String::from_utf8_lossy(&bad.stderr).to_lowercase().contains("filter") || !bad.stderr.is_empty());

    let (s, v) = call(&dev, "POST", "registered-models/create", &json!({ "name": "trainer-model" }));
    assert_eq!(s, 200, "{v}");
    for _ in 0..2 {
        let (s, v) = call(
            &dev,
            "POST",
            "model-versions/create",
            &json!({ "name": "trainer-model", "source": "mlflow-artifacts:/x", "run_id": run_id }),
        );
        assert_eq!(s, 200, "{v}");
    }
    let out = dev.ok(&["model", "alias", "trainer-model", "champion", "1"]);
    assert!(out.contains("champion"), "{out}");
    let m = dev.json(&["model", "show", "trainer-model", "--json"]);
    assert_eq!(m["aliases"]["champion"], json!(1), "{m}");
    assert_eq!(m["versions"][0]["version"], json!(2), "newest first: {m}");
    assert_eq!(m["versions"][1]["run_id"], run_id.as_str(), "a version leads back to its run: {m}");
    let listed = dev.json(&["model", "list", "--json"]);
    assert!(listed.as_array().is_some_and(|a| a.iter().any(|m| m["name"] == "trainer-model")), "{listed}");
    // Refused: a reserved alias, a version that does not exist; neither changes the model.
    assert!(!dev.cli(&["model", "alias", "trainer-model", "latest", "1"]).status.success());
    assert!(!dev.cli(&["model", "alias", "trainer-model", "champion", "9"]).status.success());
    assert_eq!(dev.json(&["model", "show", "trainer-model", "--json"]), m);
    let text = dev.ok(&["model", "show", "trainer-model"]);
    assert!(text.contains("champion -> 1"), "{text}");
}
