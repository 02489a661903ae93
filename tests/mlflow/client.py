"""Drives mlp's MLflow API with MLflow's own client (mlflow-skinny) and checks every value read
back. Run by tests/mlflow.rs with MLFLOW_TRACKING_URI=http://<mlp dev http addr>; exits non-zero
(an AssertionError or MlflowException) on any difference."""

import os
import sys
import tempfile
import time

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

uri = os.environ["MLFLOW_TRACKING_URI"]
mlflow.set_tracking_uri(uri)
client = MlflowClient()


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except MlflowException as e:
        assert e.error_code == code, f"expected {code}, got {e.error_code}: {e}"
        return e
    raise AssertionError(f"expected {code} from {fn.__name__}")


# ---- experiments ----
exp_id = mlflow.create_experiment("mlp-e2e", tags={"team": "ml"})
exp = client.get_experiment(exp_id)
assert exp.name == "mlp-e2e" and exp.lifecycle_stage == "active", exp
assert exp.tags == {"team": "ml"}, exp.tags
assert exp.artifact_location == f"mlflow-artifacts:/{exp_id}", exp.artifact_location
assert client.get_experiment_by_name("mlp-e2e").experiment_id == exp_id
assert client.get_experiment_by_name("no-such-experiment") is None
expect_error("RESOURCE_ALREADY_EXISTS", mlflow.create_experiment, "mlp-e2e")
client.set_experiment_tag(exp_id, "team", "platform")
assert client.get_experiment(exp_id).tags["team"] == "platform"
other = client.create_experiment("to-rename")
client.rename_experiment(other, "renamed")
assert client.get_experiment(other).name == "renamed"
client.delete_experiment(other)
assert client.get_experiment(other).lifecycle_stage == "deleted"
names = {e.name for e in client.search_experiments()}
assert "mlp-e2e" in names and "renamed" not in names and "Default" in names, names
client.restore_experiment(other)
assert client.get_experiment(other).lifecycle_stage == "active"
found = client.search_experiments(filter_string="name = 'mlp-e2e'")
assert [e.experiment_id for e in found] == [exp_id], found

# ---- a run with params, metrics over several steps, tags, log_batch ----
mlflow.set_experiment("mlp-e2e")
with mlflow.start_run(run_name="train") as run:
    run_id = run.info.run_id
    mlflow.log_param("lr", "0.1")
    mlflow.log_params({"epochs": 3, "optimizer": "adam"})
    for step, loss in enumerate([0.9, 0.5, 0.25]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.set_tag("stage", "dev")
    mlflow.set_tag("stage", "prod")  # tags overwrite
    ts = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("acc", 0.8, ts, 0), Metric("acc", 0.93, ts + 1, 1)],
        params=[Param("batch", "32")],
        tags=[RunTag("owner", "e2e")],
    )
    # params are immutable: the same value is fine, another value is refused and changes nothing
    mlflow.log_param("lr", "0.1")
    expect_error("INVALID_PARAMETER_VALUE", client.log_param, run_id, "lr", "0.2")
    expect_error(
        "INVALID_PARAMETER_VALUE",
        client.log_batch,
        run_id,
        metrics=[Metric("never", 1.0, ts, 0)],
        params=[Param("lr", "0.3")],
    )
    # the artifact goes up through mlp
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notes.txt")
        with open(path, "w") as f:
            f.write("hello from mlp\n")
        mlflow.log_artifact(path)
        mlflow.log_artifact(path, artifact_path="model")

r = client.get_run(run_id)
assert r.info.status == "FINISHED" and r.info.end_time, r.info
assert r.info.run_name == "train", r.info.run_name
assert r.info.experiment_id == exp_id
assert r.info.artifact_uri == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts", r.info.artifact_uri
assert r.data.params == {"lr": "0.1", "epochs": "3", "optimizer": "adam", "batch": "32"}, r.data.params
assert r.data.metrics == {"loss": 0.25, "acc": 0.93}, r.data.metrics
assert r.data.tags["stage"] == "prod" and r.data.tags["owner"] == "e2e", r.data.tags
assert r.data.tags["mlflow.runName"] == "train", r.data.tags
history = client.get_metric_history(run_id, "loss")
assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.25)], history
assert [m.value for m in client.get_metric_history(run_id, "acc")] == [0.8, 0.93]
client.delete_tag(run_id, "owner")
assert "owner" not in client.get_run(run_id).data.tags
expect_error("RESOURCE_DOES_NOT_EXIST", client.get_run, "0123456789abcdef0123456789abcdef")

# a second and third run for search
with mlflow.start_run(run_name="small") as r2:
    mlflow.log_param("lr", "0.01")
    mlflow.log_metric("acc", 0.4)
    mlflow.set_tag("stage", "dev")
with mlflow.start_run(run_name="failed") as r3:
    mlflow.log_param("lr", "0.1")
    mlflow.log_metric("acc", 0.7)
client.set_terminated(r3.info.run_id, status="FAILED")

hits = mlflow.search_runs(
    experiment_ids=[exp_id],
    filter_string="metrics.acc > 0.5 and params.lr = '0.1' and tags.stage != 'dev' and attributes.status = 'FINISHED'",
    output_format="list",
)
assert [h.info.run_id for h in hits] == [run_id], hits
ordered = client.search_runs([exp_id], order_by=["metrics.acc DESC"])
assert [x.info.run_name for x in ordered] == ["train", "failed", "small"], [x.info.run_name for x in ordered]
page1 = client.search_runs([exp_id], max_results=2, order_by=["metrics.acc ASC"])
assert len(page1) == 2 and page1.token, page1
page2 = client.search_runs([exp_id], max_results=2, order_by=["metrics.acc ASC"], page_token=page1.token)
assert [x.info.run_name for x in list(page1) + list(page2)] == ["small", "failed", "train"]
expect_error("INVALID_PARAMETER_VALUE", client.search_runs, [exp_id], filter_string="metrics.acc > 'x'")
client.delete_run(r2.info.run_id)
assert len(client.search_runs([exp_id])) == 2
client.restore_run(r2.info.run_id)
assert len(client.search_runs([exp_id])) == 3

# ---- artifacts: list and download through mlp ----
names = sorted(f.path for f in client.list_artifacts(run_id))
assert names == ["model", "notes.txt"], names
inner = client.list_artifacts(run_id, "model")
assert [(f.path, f.is_dir, f.file_size) for f in inner] == [("model/notes.txt", False, 15)], inner
with tempfile.TemporaryDirectory() as d:
    local = client.download_artifacts(run_id, "notes.txt", d)
    with open(local) as f:
        assert f.read() == "hello from mlp\n"
    local = client.download_artifacts(run_id, "model", d)
    with open(os.path.join(local, "notes.txt")) as f:
        assert f.read() == "hello from mlp\n"

# ---- model registry ----
rm = client.create_registered_model("mlp-model", tags={"k": "v"}, description="first")
assert rm.name == "mlp-model" and rm.description == "first" and rm.tags == {"k": "v"}, rm
expect_error("RESOURCE_ALREADY_EXISTS", client.create_registered_model, "mlp-model")
source = f"{r.info.artifact_uri}/model"
mv = client.create_model_version("mlp-model", source, run_id=run_id, tags={"t": "1"})
assert mv.version == "1" and mv.status == "READY" and mv.source == source and mv.run_id == run_id, mv
mv2 = client.create_model_version("mlp-model", source, run_id=run_id)
assert mv2.version == "2", mv2
client.set_registered_model_alias("mlp-model", "champion", "1")
by_alias = client.get_model_version_by_alias("mlp-model", "champion")
assert by_alias.version == "1" and by_alias.run_id == run_id, by_alias
assert client.get_registered_model("mlp-model").aliases == {"champion": "1"}
expect_error("INVALID_PARAMETER_VALUE", client.set_registered_model_alias, "mlp-model", "latest", "1")
assert client.get_model_version_download_uri("mlp-model", "2") == source
client.update_model_version("mlp-model", "2", description="better")
assert client.get_model_version("mlp-model", "2").description == "better"
client.set_model_version_tag("mlp-model", "2", "validated", "yes")
assert client.get_model_version("mlp-model", "2").tags == {"validated": "yes"}
client.set_registered_model_tag("mlp-model", "owner", "e2e")
client.update_registered_model("mlp-model", description="second")
got = client.get_registered_model("mlp-model")
assert got.description == "second" and got.tags == {"k": "v", "owner": "e2e"}, got
assert [m.name for m in client.search_registered_models(filter_string="name LIKE 'mlp-%'")] == ["mlp-model"]
versions = client.search_model_versions("name = 'mlp-model'")
assert sorted(v.version for v in versions) == ["1", "2"], versions
with tempfile.TemporaryDirectory() as d:
    local = mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri("mlp-model", "1"), dst_path=d)
    with open(os.path.join(local, "notes.txt")) as f:
        assert f.read() == "hello from mlp\n"
client.delete_registered_model_alias("mlp-model", "champion")
expect_error("RESOURCE_DOES_NOT_EXIST", client.get_model_version_by_alias, "mlp-model", "champion")
client.rename_registered_model("mlp-model", "mlp-model-2")
assert client.get_model_version("mlp-model-2", "1").source == source
client.delete_model_version("mlp-model-2", "1")
expect_error("RESOURCE_DOES_NOT_EXIST", client.get_model_version, "mlp-model-2", "1")
client.delete_registered_model("mlp-model-2")
expect_error("RESOURCE_DOES_NOT_EXIST", client.get_registered_model, "mlp-model-2")

# ---- MLflow's error shape on paths mlp does not serve ----
resp = requests.get(f"{uri}/api/2.0/mlflow/no-such/endpoint")
assert resp.status_code == 404 and resp.json()["error_code"] == "ENDPOINT_NOT_FOUND", (resp.status_code, resp.text)

print("mlflow client e2e: ok")
sys.exit(0)
