#!/usr/bin/env bash
# Metric points on disk (issue 17 §2): logs POINTS metric points to `mlp dev` through its MLflow
# API (log-batch of 1,000, MLflow's limit, from THREADS client threads; 1,000,000 points per
# run, one key), and after every million records the server's RSS (now and peak: VmRSS and
# VmHWM), its data dir on disk, and the Raft snapshots built (their size). Then the time of
# metrics/get-history of a 10,000-point metric (median of 5, the whole answer read and parsed
# by the client), and the same after a restart (SIGTERM, start again on the same data dir).
#
# Usage: scripts/bench-tracking-points.sh   (MLP_BIN=path, POINTS=1000000, THREADS=4)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

POINTS=${POINTS:-1000000}
THREADS=${THREADS:-4}
PER_RUN=1000000
bench_setup tracking-points
py() { python3 scripts/bench-tracking-points.py "$@"; }
wait_http() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$dev_pid/status"; }
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
start_dev() {
  MLP_LOG=info,openraft=warn "$MLP" dev --data-dir "$out/mlp" --grpc-addr "$GRPC" --http-addr "$HTTP" >>"$out/dev.log" 2>&1 &
  dev_pid=$!
  wait_http "http://$HTTP/v1/status/leader"
}
api() { curl -sf -X POST -H 'Content-Type: application/json' "http://$HTTP/api/2.0/mlflow/$1" -d "$2"; }
new_run() { api runs/create "{\"experiment_id\": \"$exp\", \"start_time\": 1}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["info"]["run_id"])'; }

machine_line
echo "== mlp $("$MLP" --version), $POINTS points, $THREADS client threads"
start_dev
exp=$(api experiments/create '{"name": "points"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["experiment_id"])')
echo "start rss_kib $(kib VmRSS) disk_kib $(du -sk "$out/mlp" | cut -f1)"
done_points=0
while [ "$done_points" -lt "$POINTS" ]; do
  run=$(new_run)
  n=$(( POINTS - done_points < PER_RUN ? POINTS - done_points : PER_RUN ))
  echo "$(py "http://$HTTP" log "$run" 0 "$n" "$THREADS")"
  done_points=$((done_points + n))
  echo "points $done_points rss_kib $(kib VmRSS) peak_kib $(kib VmHWM) disk_kib $(du -sk "$out/mlp" | cut -f1) raft_kib $(du -sk "$out/mlp/server/raft" | cut -f1)"
done
grep -o 'built raft snapshot.*' "$out/dev.log" | sed 's/^/snapshot: /' || echo "snapshot: none built"

hist=$(new_run)
py "http://$HTTP" log "$hist" 0 10000 1 >/dev/null
echo "get_history_10k $(py "http://$HTTP" history "$hist" m 5)"

kill -TERM "$dev_pid"; wait "$dev_pid" 2>/dev/null || true
t0=$(date +%s.%N)
start_dev
echo "restart_s $(python3 -c "import time; print(round(time.time() - $t0, 2))")"
echo "after_restart rss_kib $(kib VmRSS) peak_kib $(kib VmHWM)"
echo "get_history_10k_after_restart $(py "http://$HTTP" history "$hist" m 5)"
