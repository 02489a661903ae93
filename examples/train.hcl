# A toy training run: five "epochs" with a falling loss, then a clean exit.
#   mlp job run examples/train.hcl
job "train" {
  type     = "batch"
  priority = 50

  meta {
    team = "ml"
  }

  group "trainer" {
    count = 1

    # One retry within Nomad's default batch window; a real trainer would resume from a
    # checkpoint.
    restart {
      attempts = 1
      mode     = "fail"
    }

    task "train" {
      driver = "exec"

      config {
        command = "/bin/sh"
        # Plain `$VAR` is fine in HCL strings; only `${` would start an interpolation.
        args = ["-c", <<-EOF
          echo "starting training lr=$LEARNING_RATE"
          for i in 1 2 3 4 5; do
            loss=$(awk -v e="$i" 'BEGIN { printf "%.4f", 0.9 / e }')
            echo "epoch $i/5 loss=$loss"
            if [ "$i" -lt 5 ]; then sleep 1; fi
          done
          echo "training complete"
          EOF
        ]
      }

      env {
        LEARNING_RATE = "0.01"
        EPOCHS        = 5
      }

      resources {
        cpu    = 500
        memory = 256
      }

      kill_timeout     = "5s"
      max_run_duration = "10m"
    }
  }
}
