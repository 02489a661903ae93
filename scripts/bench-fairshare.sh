#!/usr/bin/env bash
# How fast borrowed GPUs come back (issue 15 §6): on a `mlp dev` with G simulated GPUs, two
# namespaces with a quota of G/2 GPUs each and G/2 more to borrow. team-a fills the cluster
# (G one-GPU allocations, half of them borrowed); then team-b submits G/2 one-GPU allocations,
# and the time from that `mlp job run` to both namespaces holding G/2 running allocations is
# measured: the evaluation, the eviction of team-a's borrowed allocations (their tasks get
# SIGTERM; they exit at once), team-b's placements starting. Repeated RUNS times; the median.
#
# Usage: scripts/bench-fairshare.sh     (MLP_BIN=path, RUNS=5; G is 8, the h100x8 example)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

RUNS=${RUNS:-5}
G=8
HALF=$((G / 2))
bench_setup fairshare
bench_teardown() {
  [ -n "${dev_pid:-}" ] || return 0
  "$MLP" job stop --purge fill --namespace team-a >/dev/null 2>&1
  "$MLP" job stop --purge claim --namespace team-b >/dev/null 2>&1
}

job() { # NAME NAMESPACE COUNT
  cat <<HCL
job "$1" {
  namespace = "$2"
  type      = "batch"
  group "g" {
    count = $3
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
      resources {
        cpu    = 20
        memory = 16
        gpu {
          count = 1
        }
      }
    }
  }
}
HCL
}

# Running allocations of job $1 in namespace $2.
running() {
  "$MLP" job status "$1" --namespace "$2" --json 2>/dev/null |
    python3 -c "import json,sys; print(sum(a['client_status']=='running' for a in json.load(sys.stdin).get('allocations', [])))" 2>/dev/null || echo 0
}
# Waits until job $1 of namespace $2 has $3 running allocations (up to 60 s).
wait_running() {
  for _ in $(seq 1 1200); do
    [ "$(running "$1" "$2")" = "$3" ] && return 0
    sleep 0.05
  done
  echo "job $2/$1 never had $3 running allocations" >&2
  return 1
}

machine_line
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=$GRPC
"$MLP" dev --data-dir "$out/data" --grpc-addr "$GRPC" --http-addr "$HTTP" --network-port-range 42000-42999 \
  --simulated-gpus examples/gpus-h100x8.json >"$out/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 100); do grep -q "try:" "$out/dev.log" && break; sleep 0.2; done
printf 'gpus = %d\nborrow {\n  gpus = %d\n}\n' "$HALF" "$HALF" >"$out/quota.hcl"
for ns in team-a team-b; do "$MLP" namespace apply "$ns" -quota-file "$out/quota.hcl" >/dev/null; done
job fill team-a "$G" >"$out/fill.hcl"
job claim team-b "$HALF" >"$out/claim.hcl"
echo "== $G simulated GPUs; team-a and team-b: quota $HALF GPUs, may borrow $HALF; team-a fills all $G, then team-b asks for $HALF"

results=()
for r in $(seq 1 "$RUNS"); do
  "$MLP" job run --detach "$out/fill.hcl" >/dev/null
  wait_running fill team-a "$G"
  t0=$(date +%s%3N)
  "$MLP" job run --detach "$out/claim.hcl" >/dev/null
  wait_running claim team-b "$HALF"
  wait_running fill team-a "$HALF"
  ms=$(($(date +%s%3N) - t0))
  results+=("$ms")
  echo "run $r: shares $HALF and $HALF after $ms ms"
  "$MLP" job stop --purge claim --namespace team-b >/dev/null
  "$MLP" job stop --purge fill --namespace team-a >/dev/null
  for _ in $(seq 1 200); do
    [ "$(running fill team-a)" = 0 ] && [ "$(running claim team-b)" = 0 ] && break
    sleep 0.05
  done
done
python3 - "${results[@]}" <<'PY'
import statistics, sys
runs = [int(x) for x in sys.argv[1:]]
print(f"median: {statistics.median(runs):.0f} ms from team-b's submit to equal shares (min {min(runs)}, max {max(runs)}; includes this script's 50 ms polling)")
PY
