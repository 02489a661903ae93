# A training run that logs to the cluster's own MLflow tracking server, with no tracking
# configuration here: the agent gives every task MLFLOW_TRACKING_URI (the server it registered
# with) and MLFLOW_RUN_CONTEXT, so the run is tagged mlp.job, mlp.job_version, mlp.alloc,
# mlp.node, ... (docs/tracking.md). The node needs MLflow's client for its python3:
#   pip install mlflow-skinny
#   mlp job run examples/mlflow-train.hcl
#   curl -s localhost:7646/api/2.0/mlflow/runs/search -d '{"filter": "tags.`mlp.job` = '"'"'mlflow-train'"'"'"}'
job "mlflow-train" {
  type = "batch"

  group "trainer" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    task "train" {
      # raw_exec: the node's own python3 and its site-packages (an `exec` task sees the
      # host's /usr too, but not a virtualenv elsewhere).
      driver = "raw_exec"

      config {
        command = "/usr/bin/env"
        args = ["python3", "-c", <<-EOF
          import mlflow
          mlflow.set_experiment("mlflow-train")
          with mlflow.start_run():
              mlflow.log_param("lr", 0.01)
              for epoch in range(5):
                  mlflow.log_metric("loss", 0.9 / (epoch + 1), step=epoch)
          print("logged to", mlflow.get_tracking_uri())
        EOF
        ]
      }

      env {
        MLFLOW_DISABLE_TELEMETRY = "true"
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
