//! MLflow workspaces are mlp namespaces (issue 17 §3): MLflow's own client, pointed at a
//! workspace with `MLFLOW_WORKSPACE`, sees and changes only that namespace's experiments, runs,
//! models and artifacts; tasks log into their job's namespace with no configuration; ACL
//! tokens (sent as MLflow sends `MLFLOW_TRACKING_TOKEN`) are checked in the workspace's
//! namespace.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Dev;
use serde_json::{json, Value};

/// Runs tests/mlflow/workspaces.py against `dev` with `env`; answers the ids it printed.
fn client_in(dev: &Dev, env: &[(&str, &str)]) -> Value {
    let python = common::mlflow_python();
    let script = common::repo_root().join("tests").join("mlflow").join("workspaces.py");
    let (status, out, err) = common::run_mlflow_script_env(&python, &script, &[], &dev.http, 30, env);
    let ok = status.is_some_and(|s| s.success()) && out.contains("workspace ok");
    assert!(
        ok,
        "the MLflow client in {env:?} failed ({status:?}):\nstdout:\n{out}\nstderr:\n{}\nserver log:\n{}",
        common::tail(&err, 8000),
        common::tail(&dev.log(), 3000)
    );
    let line = out.lines().find(|l| l.starts_with('{')).expect("the ids line");
    serde_json::from_str(line).expect("ids JSON")
}

/// A raw MLflow call in workspace `ws` ("" = no header) with `token` as a bearer ("" = none).
fn call(dev: &Dev, ws: &str, token: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![];
    if !ws.is_empty() {
        headers.push(("X-MLFLOW-WORKSPACE", ws));
    }
    if !token.is_empty() {
        headers.push(("Authorization", bearer.as_str()));
    }
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let ct = (!body.is_empty()).then_some("application/json");
    let (code, text) = common::http_request_with(&dev.http, &headers, method, path, ct, body.as_bytes());
    let v = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
    (code, v)
}

fn id(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}")).to_string()
}

#[test]
fn mlflow_workspaces_keep_namespaces_apart() {
    let dev = Dev::start();
    let (s, info) = call(&dev, "", "", "GET", "/api/3.0/mlflow/server-info", &Value::Null);
    assert_eq!((s, &info["workspaces_enabled"]), (200, &json!(true)), "{info}");
    dev.ok(&["namespace", "apply", "team-a", "-description", "Team A"]);
    let (_, v) = call(&dev, "", "", "GET", "/api/3.0/mlflow/workspaces", &Value::Null);
    let names: Vec<&str> = v["workspaces"].as_array().map(|w| w.iter().filter_map(|w| w["name"].as_str()).collect()).unwrap_or_default();
    assert_eq!(names, ["default", "team-a"], "{v}");
    let (s, v) = call(&dev, "", "", "GET", "/api/3.0/mlflow/workspaces/team-a", &Value::Null);
    assert_eq!((s, &v["workspace"]["description"]), (200, &json!("Team A")), "{v}");
    assert_eq!(call(&dev, "", "", "GET", "/api/3.0/mlflow/workspaces/nope", &Value::Null).0, 404);
    let (s, v) = call(&dev, "", "", "POST", "/api/3.0/mlflow/workspaces", &json!({ "name": "team-b" }));
    assert_eq!((s, v["error_code"].as_str()), (404, Some("ENDPOINT_NOT_FOUND")), "{v}");

    // The same script, names and all, in two workspaces: neither sees the other.
    let a = client_in(&dev, &[("MLFLOW_WORKSPACE", "team-a")]);
    let d = client_in(&dev, &[]);
    let (a_run, a_exp, d_run) = (id(&a, "run_id"), id(&a, "experiment_id"), id(&d, "run_id"));
    assert_ne!(a_exp, id(&d, "experiment_id"));

    let get = |ws: &str, run: &str| call(&dev, ws, "", "GET", &format!("/api/2.0/mlflow/runs/get?run_id={run}"), &Value::Null);
    assert_eq!(get("team-a", &a_run).0, 200);
    assert_eq!(get("default", &d_run).0, 200);
    for (ws, run) in [("", a_run.as_str()), ("default", a_run.as_str()), ("team-a", d_run.as_str())] {
        let (s, v) = get(ws, run);
        assert_eq!((s, v["error_code"].as_str()), (404, Some("RESOURCE_DOES_NOT_EXIST")), "run {run} read from {ws:?}: {v}");
    }
    // Writes too: another workspace's run cannot be logged to, deleted or tagged.
    for (endpoint, body) in [
        ("runs/log-metric", json!({ "run_id": a_run, "key": "x", "value": 1.0, "timestamp": 1 })),
        ("runs/delete", json!({ "run_id": a_run })),
        ("runs/set-tag", json!({ "run_id": a_run, "key": "k", "value": "v" })),
    ] {
        let (s, v) = call(&dev, "default", "", "POST", &format!("/api/2.0/mlflow/{endpoint}"), &body);
        assert_eq!((s, v["error_code"].as_str()), (404, Some("RESOURCE_DOES_NOT_EXIST")), "{endpoint}: {v}");
    }
    let (_, v) = get("team-a", &a_run);
    assert_eq!(v["run"]["info"]["lifecycle_stage"], "active", "{v}");
    assert!(v["run"]["data"]["metrics"].as_array().is_some_and(|m| m.iter().all(|m| m["key"] != "x")), "{v}");

    // Searches, histories, models and artifacts, each from its own workspace only.
    let (_, v) = call(&dev, "default", "", "POST", "/api/2.0/mlflow/runs/search", &json!({ "experiment_ids": [a_exp] }));
    assert!(v["runs"].as_array().is_none_or(Vec::is_empty), "default searched team-a's experiment: {v}");
    let (s, _) = call(&dev, "", "", "GET", &format!("/api/2.0/mlflow/metrics/get-history?run_id={a_run}&metric_key=loss"), &Value::Null);
    assert_eq!(s, 404);
    let (_, v) = call(&dev, "team-a", "", "GET", "/api/2.0/mlflow/registered-models/get?name=shared-model", &Value::Null);
    assert_eq!(v["registered_model"]["latest_versions"][0]["run_id"], json!(a_run), "{v}");
    let (_, v) = call(&dev, "", "", "GET", "/api/2.0/mlflow/registered-models/get?name=shared-model", &Value::Null);
    assert_eq!(v["registered_model"]["latest_versions"][0]["run_id"], json!(d_run), "{v}");
    let listing = |ws: &str| {
        call(&dev, ws, "", "GET", &format!("/api/2.0/mlflow-artifacts/artifacts?path={a_exp}/{a_run}/artifacts"), &Value::Null).1
    };
    assert_eq!(listing("team-a")["files"][0]["path"], json!("weights.txt"), "{}", listing("team-a"));
    assert_eq!(listing("default"), json!({}), "default lists team-a's artifacts");
    let file = format!("/api/2.0/mlflow-artifacts/artifacts/{a_exp}/{a_run}/artifacts/weights.txt");
    assert_eq!(call(&dev, "team-a", "", "GET", &file, &Value::Null).1, json!("weights of team-a\n"));
    assert_eq!(call(&dev, "default", "", "GET", &file, &Value::Null).0, 404);

    // A workspace that is no namespace: refused, and nothing made.
    let (s, v) = call(&dev, "nope", "", "POST", "/api/2.0/mlflow/experiments/create", &json!({ "name": "ghost" }));
    assert_eq!((s, v["error_code"].as_str()), (404, Some("RESOURCE_DOES_NOT_EXIST")), "{v}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("Workspace 'nope'")), "{v}");
    let (s, v) = call(&dev, "nope", "", "PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/x", &json!("data"));
    assert_eq!(s, 404, "{v}");
    let (_, v) = call(&dev, "", "", "POST", "/api/2.0/mlflow/experiments/get-by-name", &json!({ "experiment_name": "ghost" }));
    assert_eq!(v["error_code"], "RESOURCE_DOES_NOT_EXIST");
    assert_eq!(call(&dev, "bad\u{7f}", "", "GET", "/api/2.0/mlflow/experiments/search", &Value::Null).0, 400);

    // The CLI's views take the namespace.
    let out = dev.ok(&["run", "list", "--namespace", "team-a", "--json"]);
    assert!(out.contains(&a_run) && !out.contains(&d_run), "{out}");
    let out = dev.ok(&["run", "list", "--json"]);
    assert!(out.contains(&d_run) && !out.contains(&a_run), "{out}");
    assert!(dev.ok(&["run", "show", &a_run, "--namespace", "team-a"]).contains("in-team-a"));
    assert!(!dev.cli(&["run", "show", &a_run]).status.success(), "default shows team-a's run");
    dev.ok(&["model", "alias", "shared-model", "best", "1", "--namespace", "team-a"]);
    let (_, v) = call(&dev, "team-a", "", "GET", "/api/2.0/mlflow/registered-models/alias?name=shared-model&alias=best", &Value::Null);
    assert_eq!(v["model_version"]["run_id"], json!(a_run), "{v}");
    let (s, _) = call(&dev, "", "", "GET", "/api/2.0/mlflow/registered-models/alias?name=shared-model&alias=best", &Value::Null);
    assert_eq!(s, 404, "the alias went to team-a's model only");

    // A namespace whose workspace holds results is not deleted with them.
    let out = dev.cli(&["namespace", "delete", "team-a"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("tracking data"), "{text}");
    assert_eq!(get("team-a", &a_run).0, 200);
}

/// A job in namespace `team-a` logs into team-a's workspace with no tracking configuration:
/// the agent adds `MLFLOW_WORKSPACE` beside `MLFLOW_TRACKING_URI`.
#[test]
fn a_job_logs_into_its_namespace_workspace() {
    let python = common::mlflow_python();
    let dev = Dev::start();
    dev.ok(&["namespace", "apply", "team-a"]);
    let train = r#"
import mlflow, os
mlflow.set_experiment("nightly")
with mlflow.start_run():
    mlflow.log_param("ws", os.environ.get("MLFLOW_WORKSPACE", ""))
    mlflow.log_metric("loss", 0.5)
"#;
    let job = format!(
        r#"
job "trainer" {{
  namespace = "team-a"
  type      = "batch"
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
  }}
}}
"#,
        python = python.display(),
        script = serde_json::to_string(train).expect("json string"),
    );
    dev.ok(&["job", "run", dev.write_job("trainer.hcl", &job).to_str().expect("path")]);
    let allocs = common::wait_for("the training job to finish", Duration::from_secs(120), || {
        let v = dev.json(&["job", "status", "trainer", "--namespace", "team-a", "--json"]);
        let allocs = v["allocations"].as_array().cloned().unwrap_or_default();
        (allocs.len() == 1 && ["complete", "failed"].contains(&common::status(&allocs[0]))).then_some(allocs)
    });
    assert_eq!(common::status(&allocs[0]), "complete", "{}", allocs[0]);
    let status = allocs[0].to_string();
    let (s, v) = call(&dev, "team-a", "", "POST", "/api/2.0/mlflow/experiments/get-by-name", &json!({ "experiment_name": "nightly" }));
    assert_eq!(s, 200, "no experiment in team-a: {v}\njob: {status}\nlog: {}", common::tail(&dev.log(), 3000));
    let exp = v["experiment"]["experiment_id"].as_str().expect("experiment_id").to_string();
    let (_, v) = call(&dev, "team-a", "", "POST", "/api/2.0/mlflow/runs/search", &json!({ "experiment_ids": [exp] }));
    let run = &v["runs"][0];
    let tag = |k: &str| {
        run["data"]["tags"].as_array().and_then(|t| t.iter().find(|t| t["key"] == k)).map(|t| t["value"].clone()).unwrap_or(Value::Null)
    };
    assert_eq!(tag("mlp.namespace"), json!("team-a"), "{v}");
    assert_eq!(run["data"]["params"][0], json!({ "key": "ws", "value": "team-a" }), "{v}");
    let (s, _) = call(&dev, "", "", "POST", "/api/2.0/mlflow/experiments/get-by-name", &json!({ "experiment_name": "nightly" }));
    assert_eq!(s, 404, "the run landed in default too");
}

/// With ACLs on, MLflow's client authenticates as MLflow's users do (`MLFLOW_TRACKING_TOKEN`,
/// sent as `Authorization: Bearer`), and its token is checked in the workspace's namespace.
#[test]
fn acl_tokens_reach_mlflow_through_its_own_variables_per_workspace() {
    let dev = Dev::start_with(&["--acl-enabled"]);
    let mlp = |token: &str, args: &[&str]| {
        let mut c = Command::new(common::mlp());
        c.args(args).env("MLP_ADDR", &dev.grpc).env_remove("MLP_TOKEN").stdin(Stdio::null());
        if !token.is_empty() {
            c.env("MLP_TOKEN", token);
        }
        let out = c.output().expect("run mlp");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "mlp {args:?}: {text}");
        text
    };
    let secret = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("Secret ID").and_then(|r| r.trim().strip_prefix('=')).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no secret in {out}"))
    };
    let root = secret(&mlp("", &["acl", "bootstrap"]));
    mlp(&root, &["namespace", "apply", "team-a"]);
    let policy = dev.write_job("team-a.policy.hcl", "namespace \"team-a\" {\n  policy = \"write\"\n}\n");
    mlp(&root, &["acl", "policy", "apply", "team-a", policy.to_str().expect("path")]);
    let token = secret(&mlp(&root, &["acl", "token", "create", "-policy", "team-a"]));

    // The real client, in its workspace, with its token.
    let a = client_in(&dev, &[("MLFLOW_WORKSPACE", "team-a"), ("MLFLOW_TRACKING_TOKEN", &token)]);
    let run = id(&a, "run_id");
    let path = format!("/api/2.0/mlflow/runs/get?run_id={run}");
    assert_eq!(call(&dev, "team-a", &token, "GET", &path, &Value::Null).0, 200);
    // The same token outside its namespace, and no token: refused before anything is read.
    assert_eq!(call(&dev, "", &token, "GET", "/api/2.0/mlflow/experiments/search", &Value::Null).0, 403);
    assert_eq!(call(&dev, "default", &token, "POST", "/api/2.0/mlflow/experiments/create", &json!({ "name": "x" })).0, 403);
    assert_eq!(call(&dev, "team-a", "", "GET", &path, &Value::Null).0, 403);
    assert_eq!(call(&dev, "team-a", "not-a-token", "GET", &path, &Value::Null).0, 403);
    // The token lists the workspaces it may read.
    let (_, v) = call(&dev, "", &token, "GET", "/api/3.0/mlflow/workspaces", &Value::Null);
    assert_eq!(v["workspaces"], json!([{ "name": "team-a", "description": "" }]), "{v}");
    assert_eq!(call(&dev, "", &token, "GET", "/api/3.0/mlflow/workspaces/default", &Value::Null).0, 404);
    // The management token reads it there, and not from default.
    assert_eq!(call(&dev, "team-a", &root, "GET", &path, &Value::Null).0, 200);
    assert_eq!(call(&dev, "", &root, "GET", &path, &Value::Null).0, 404);
}
