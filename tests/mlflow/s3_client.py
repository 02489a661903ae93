"""MLflow's own client against `mlp dev --artifact-store s3://...` (tests/mlflow_artifacts.rs):
log_artifact uploads through mlp into the S3-compatible bucket; list_artifacts and
download_artifacts read them back. argv[1]: a work directory (the Rust test reads model.bin)."""
import os
import sys
import tempfile

import mlflow
from mlflow import MlflowClient

work = sys.argv[1]
model = os.path.join(work, "model.bin")
data = os.urandom(9 * 1024 * 1024 + 5)  # over mlp's 8 MiB part size: a multipart upload to S3
with open(model, "wb") as f:
    f.write(data)
notes = os.path.join(work, "notes.txt")
with open(notes, "w") as f:
    f.write("stored in S3 through mlp\n")

with mlflow.start_run() as run:
    mlflow.log_param("store", "s3")
    mlflow.log_artifact(model)
    mlflow.log_artifact(notes, artifact_path="docs")
run_id = run.info.run_id
print(f"run_id={run_id}", flush=True)

client = MlflowClient()
names = sorted(f.path for f in client.list_artifacts(run_id))
assert names == ["docs", "model.bin"], names
sizes = {f.path: f.file_size for f in client.list_artifacts(run_id)}
assert sizes["model.bin"] == len(data), sizes
inner = [f.path for f in client.list_artifacts(run_id, "docs")]
assert inner == ["docs/notes.txt"], inner

with tempfile.TemporaryDirectory() as d:
    local = client.download_artifacts(run_id, "model.bin", d)
    with open(local, "rb") as f:
        assert f.read() == data, "model.bin differs after the round trip"
with tempfile.TemporaryDirectory() as d:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="docs", dst_path=d)
    with open(os.path.join(local, "notes.txt")) as f:
        assert f.read() == "stored in S3 through mlp\n"

print("mlflow s3 artifacts: ok")
