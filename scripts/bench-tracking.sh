#!/usr/bin/env bash
# mlp's MLflow API against MLflow's own server (issue 17 §4), the same client script
# (scripts/bench-tracking-client.py, MLflow's MlflowClient) against each, one run, one machine.
#
#   MLflow: `mlflow server` with its SQLite backend store and a local artifact root (its
#           defaults otherwise), from a virtualenv this script creates (pip install mlflow).
#   mlp:    `mlp dev` (one server, fsync'd Raft log), its MLflow API on the HTTP address.
#
# Per backend, with THREADS client threads: runs logged per second (create + log-batch of 10
# metrics + terminate), a filtered search_runs, and listing every run of the experiment, at
# N_SMALL runs, through two clients (bench-tracking-client.py): MLflow's own MlflowClient
# (experiment `bench`), and `raw`, the same REST requests without MlflowClient's conversions
# (experiment `bench-raw`), whose own CPU does not hide the server's. Then, in the raw
# experiment, at each of MLFLOW_RAW_BIG runs (MLflow; default 10,000: its server logs a few
# dozen runs a second here, so 100,000 would take about an hour) and RAW_BIG (mlp; default
# 10,000 and 100,000), and with MlflowClient at each of BIG (mlp only). Also RSS and disk.
#
# The THREADS client threads run in PROCS processes (Python's GIL makes one client process the
# bottleneck of a fast server), the same split for both backends.
#
# Usage: scripts/bench-tracking.sh   (MLP_BIN=path, N_SMALL=3000, THREADS=16, PROCS=4, BIG="10000",
#        RAW_BIG="10000 100000", MLFLOW_RAW_BIG="10000", SKIP_MLFLOW=1 for mlp alone)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N_SMALL=${N_SMALL:-3000}
THREADS=${THREADS:-16}
PROCS=${PROCS:-4}
BIG=${BIG-"10000"}
RAW_BIG=${RAW_BIG-"10000 100000"}
MLFLOW_RAW_BIG=${MLFLOW_RAW_BIG-"10000"}
VENV=${MLP_BENCH_MLFLOW_VENV:-/var/cache/mlp-bench/mlflow-server-venv}
release_mlp
if ! "$VENV/bin/python" -c "import mlflow.server" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q mlflow >&2
fi
PY="$VENV/bin/python"
out=$(mktemp -d /tmp/mlp-bench-tracking.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not up: $1" >&2; return 1; }
# RSS (KiB) of a process and its descendants.
rss_tree() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true) $(for c in $(pgrep -P "$1" || true); do pgrep -P "$c" || true; done); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
client() { MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 \
  "$PY" scripts/bench-tracking-client.py "$@" | tail -n 1; }

machine_line
mlflow_version=$("$PY" -c "import mlflow; print(mlflow.__version__)")
echo "== MLflow $mlflow_version, mlp $("$MLP" --version)"

# ---- MLflow's own server (SKIP_MLFLOW=1: mlp only) ----
if [ -z "${SKIP_MLFLOW:-}" ]; then
MP=$(free_port)
"$PY" -m mlflow server --backend-store-uri "sqlite:///$out/mlflow.db" --default-artifact-root "$out/mlflow-artifacts" \
  --host 127.0.0.1 --port "$MP" >"$out/mlflow.log" 2>&1 &
pids+=($!)
mlflow_pid=$!
wait_http "http://127.0.0.1:$MP/health"
echo "mlflow_small $(client "http://127.0.0.1:$MP" bench "$N_SMALL" "$THREADS" "$PROCS")"
echo "mlflow_raw_small $(client "http://127.0.0.1:$MP" bench-raw "$N_SMALL" "$THREADS" "$PROCS" 0 raw)"
done_runs=$N_SMALL
for n in $MLFLOW_RAW_BIG; do
  echo "mlflow_raw_$n $(client "http://127.0.0.1:$MP" bench-raw $((n - done_runs)) "$THREADS" "$PROCS" "$done_runs" raw)"
  done_runs=$n
done
echo "mlflow_rss_kib $(rss_tree "$mlflow_pid")"
echo "mlflow_disk_kib $(du -sk "$out/mlflow.db" | cut -f1)"
pkill -TERM -P "$mlflow_pid" 2>/dev/null || true; kill "$mlflow_pid"  # its workers first: once it is gone they are no longer its children
fi

# ---- mlp ----
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
MLP_LOG=warn "$MLP" dev --data-dir "$out/mlp" --grpc-addr "$GRPC" --http-addr "$HTTP" >"$out/dev.log" 2>&1 &
pids+=($!)
mlp_pid=$!
wait_http "http://$HTTP/v1/status/leader"
echo "mlp_small $(client "http://$HTTP" bench "$N_SMALL" "$THREADS" "$PROCS")"
echo "mlp_raw_small $(client "http://$HTTP" bench-raw "$N_SMALL" "$THREADS" "$PROCS" 0 raw)"
echo "mlp_small_rss_kib $(rss_tree "$mlp_pid")"
echo "mlp_small_disk_kib $(du -sk "$out/mlp" | cut -f1)"
# grow LABEL EXPERIMENT CLIENT SIZES...: continues the experiment (N_SMALL runs so far) to each
# size, printing the client's figures and mlp's RSS and disk at each.
grow() {
  local label=$1 exp=$2 mode=$3 done_runs=$N_SMALL n
  shift 3
  for n in "$@"; do
    echo "${label}_$n $(client "http://$HTTP" "$exp" $((n - done_runs)) "$THREADS" "$PROCS" "$done_runs" "$mode")"
    done_runs=$n
    echo "${label}_${n}_rss_kib $(rss_tree "$mlp_pid")"
    echo "${label}_${n}_disk_kib $(du -sk "$out/mlp" | cut -f1)"
  done
}
# shellcheck disable=SC2086  # the sizes are words
grow mlp bench mlflow $BIG
# shellcheck disable=SC2086
grow mlp_raw bench-raw raw $RAW_BIG
