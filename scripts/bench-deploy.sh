#!/usr/bin/env bash
# What a health-gated rolling update costs beyond the waiting it asks for (issue 16 §1): a
# service job of N instances (Python http.server with an http check every 250 ms) is updated
# with `update { max_parallel = 1, min_healthy_time = M }`; the time from `mlp job run` of the
# new version to its deployment's `successful` is compared with N × M, the sum of the
# min_healthy_times the update must wait by construction. The overhead per step is what mlp adds:
# scheduling, the task's start, the first passing check, the watcher's 200 ms tick, Raft commits.
#
# Usage: scripts/bench-deploy.sh     (MLP_BIN=path, N=10, MIN_HEALTHY=2s, RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N=${N:-10}
MIN_HEALTHY=${MIN_HEALTHY:-2s}
RUNS=${RUNS:-3}
bench_setup deploy
bench_teardown() { [ -n "${dev_pid:-}" ] && "$MLP" job stop --purge web >/dev/null 2>&1; }
min_ms=$(python3 -c "import sys; s='$MIN_HEALTHY'; print(int(float(s[:-2]) if s.endswith('ms') else float(s[:-1])*1000))")

job() { # VERSION
  cat <<HCL
job "web" {
  type = "service"
  update {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "$MIN_HEALTHY"
    healthy_deadline = "1m"
  }
  group "web" {
    count = $N
    network {
      port "http" {}
    }
    service {
      name = "web"
      port = "http"
      check {
        type     = "http"
        path     = "/"
        interval = "250ms"
        timeout  = "250ms"
      }
    }
    task "srv" {
      driver = "raw_exec"
      env {
        VERSION = "$1"
      }
      config {
        command = "/bin/sh"
        args    = ["-c", "exec /usr/bin/python3 -m http.server \$MLP_PORT_http --bind 127.0.0.1"]
      }
      resources {
        cpu    = 20
        memory = 32
      }
    }
  }
}
HCL
}

machine_line
echo "== $N instances, max_parallel 1, min_healthy_time $MIN_HEALTHY: sum of min_healthy_times $((N * min_ms)) ms"
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=$GRPC
"$MLP" dev --data-dir "$out/data" --grpc-addr "$GRPC" --http-addr "$HTTP" --network-port-range 41000-41999 >"$out/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 100); do grep -q "try:" "$out/dev.log" && break; sleep 0.2; done

# Waits for the deployment of job version $1 to reach "successful"; prints the ms it took from $2.
wait_successful() {
  local v=$1 t0=$2 st
  for _ in $(seq 1 3000); do
    st=$("$MLP" deployment list --job web --json | python3 -c "import json,sys; print(next((d['status'] for d in json.load(sys.stdin) if d['job_version']==$v), ''))")
    case $st in
      successful) echo $(( $(date +%s%3N) - t0 )); return 0 ;;
      failed|cancelled) echo "deployment of version $v is $st" >&2; return 1 ;;
    esac
    sleep 0.1
  done
  echo "deployment of version $v did not finish" >&2; return 1
}

job v0 >"$out/job.hcl"
"$MLP" job run --detach "$out/job.hcl" >/dev/null
wait_successful 0 "$(date +%s%3N)" >/dev/null
results=()
for r in $(seq 1 "$RUNS"); do
  job "v$r" >"$out/job.hcl"
  t0=$(date +%s%3N)
  "$MLP" job run --detach "$out/job.hcl" >/dev/null
  ms=$(wait_successful "$r" "$t0")
  results+=("$ms")
  echo "run $r: rolling update of $N took $ms ms; overhead $(( ms - N * min_ms )) ms, $(( (ms - N * min_ms) / N )) ms per instance"
done
python3 - "$N" "$min_ms" "${results[@]}" <<'PY'
import statistics, sys
n, m = int(sys.argv[1]), int(sys.argv[2])
runs = [int(x) for x in sys.argv[3:]]
med = statistics.median(runs)
print(f"median: {med:.0f} ms for {n} instances = {med / (n * m):.2f}x the sum of min_healthy_times; overhead {(med - n * m) / n:.0f} ms per instance")
PY
