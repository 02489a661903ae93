# A long-running service: two copies that print a heartbeat every 2s until stopped.
#   mlp job run examples/serve.hcl
job "serve" {
  type = "service"

  group "api" {
    count = 2

    task "server" {
      driver = "exec"

      config {
        command = "/bin/sh"
        # The TERM trap makes `mlp job stop` graceful: the loop exits 0 well inside kill_timeout.
        args = ["-c", <<-EOF
          trap 'echo shutting down; exit 0' TERM
          n=0
          while true; do
            n=$((n + 1))
            echo "heartbeat $n from $(hostname) pid $$"
            sleep 2 &
            wait $!
          done
          EOF
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }

      kill_timeout = "5s"
    }
  }
}
