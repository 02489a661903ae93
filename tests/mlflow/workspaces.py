"""MLflow's own client in one MLflow workspace (an mlp namespace), chosen the way MLflow's users
choose one: `MLFLOW_WORKSPACE` (the client sends it as `X-MLFLOW-WORKSPACE`). Run once per
workspace by tests/mlflow_workspaces.rs with the same names each time: every name here must be
free in every workspace, and every read must see only this workspace's objects.

Prints one JSON line of the ids it made, then "workspace ok".
"""

import json
import os
import sys
import tempfile

import mlflow
from mlflow import MlflowClient

ws = os.environ.get("MLFLOW_WORKSPACE", "default")
client = MlflowClient()

exp = mlflow.set_experiment("shared-name")
with mlflow.start_run(run_name=f"in-{ws}") as run:
    mlflow.log_param("workspace", ws)
    for step in range(3):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    d = tempfile.mkdtemp()
    path = os.path.join(d, "weights.txt")
    with open(path, "w") as f:
        f.write(f"weights of {ws}\n")
    mlflow.log_artifact(path)
run_id = run.info.run_id

# No experiment named: MLflow's Default experiment "0", which every workspace has.
with mlflow.start_run(experiment_id="0") as run0:
    mlflow.log_metric("default_metric", 2.0)
assert run0.info.experiment_id == "0", run0.info.experiment_id

# Only this workspace's runs, experiments and models are seen.
runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list")
assert [r.info.run_id for r in runs] == [run_id], [r.info.run_id for r in runs]
assert runs[0].data.params["workspace"] == ws, runs[0].data.params
names = sorted(e.name for e in client.search_experiments())
assert names == ["Default", "shared-name"], names
zero = mlflow.search_runs(experiment_ids=["0"], output_format="list")
assert [r.info.run_id for r in zero] == [run0.info.run_id], [r.info.run_id for r in zero]
history = client.get_metric_history(run_id, "loss")
assert [m.step for m in history] == [0, 1, 2], history

# The registry: the same model name in every workspace.
client.create_registered_model("shared-model")
mv = client.create_model_version("shared-model", f"runs:/{run_id}/weights.txt", run_id=run_id)
client.set_registered_model_alias("shared-model", "champion", mv.version)
assert mv.version == "1", mv.version
assert client.get_model_version_by_alias("shared-model", "champion").run_id == run_id
models = [m.name for m in client.search_registered_models()]
assert models == ["shared-model"], models

# Artifacts: listed and read back from this workspace.
files = [f.path for f in client.list_artifacts(run_id)]
assert files == ["weights.txt"], files
out = client.download_artifacts(run_id, "weights.txt", tempfile.mkdtemp())
with open(out) as f:
    assert f.read() == f"weights of {ws}\n"

print(json.dumps({"experiment_id": exp.experiment_id, "run_id": run_id, "run0": run0.info.run_id}))
print("workspace ok")
sys.stdout.flush()
