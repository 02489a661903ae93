#!/usr/bin/env bash
# Garbage-collection benchmark (issue 10 §3, "state stays bounded"), release build, real processes.
#
#   1. `mlp server` and `mlp agent` (the two halves of `mlp dev`, run as two processes so that
#      each one's RSS is its own): agent RSS idle, server RSS empty.
#   2. N short batch jobs (raw_exec /bin/true, cpu 10, memory 8), submitted over one keep-alive
#      HTTP connection (POST /v1/jobs, the gRPC API's mirror) in rounds of ROUND jobs, each
#      round waited on until every allocation is complete: the time, server RSS, data-dir
#      size and state size (`mlp operator snapshot save`) before GC.
#   3. `mlp system gc`: its time, what it removed, the same figures after it, after a restart
#      of the server on the same data dir, and after a snapshot with the log compacted.
#   4. LIVE service jobs with `count = 0` (registered and evaluated, nothing to place) on a fresh
#      server and data dir: server RSS.
#
# Usage: scripts/bench-gc.sh [N]     (N = 2000 by default; MLP_BENCH_LIVE_JOBS=10000,
#                                     MLP_BENCH_ROUND=200, MLP_BIN=path for another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N=${1:-2000}
LIVE=${MLP_BENCH_LIVE_JOBS:-10000}
ROUND=${MLP_BENCH_ROUND:-200}

# MLP_BIN=path runs a given binary instead (A/B comparisons); else the release build.
release_mlp
out=$(mktemp -d /tmp/mlp-bench-gc.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=$GRPC

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
du_mib() { du -sb "$1" | awk '{printf "%.1f", $1/1048576}'; }
# The state's serialized size (what a Raft snapshot holds), in KiB; SnapshotSave answers at
# most 16 MiB (the server's gRPC message limit), so a larger state reports "over-16MiB".
state_kib() {
  rm -f "$out/state.snap"
  if "$MLP" operator snapshot save "$out/state.snap" >/dev/null 2>"$out/snap.err"; then
    stat -c %s "$out/state.snap" | awk '{printf "%.1f", $1/1024}'
  else
    echo "over-16MiB"
  fi
}
now() { date +%s.%N; }

server_pid=
start_server() {
  MLP_LOG=warn "$MLP" server --data-dir "$out/server" --grpc-addr "$GRPC" --http-addr "$HTTP" "$@" >>"$out/server.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 1 300); do
    curl -sf "http://$HTTP/v1/status/leader" | grep -q leader_addr && return 0
    sleep 0.1
  done
  echo "server did not start:"; tail -20 "$out/server.log"; exit 1
}

# Waits until /v1/metrics says `$1` is at least `$2` and nothing is live or pending.
wait_metrics() {
  python3 - "$HTTP" "$1" "$2" <<'PY'
import sys, time, urllib.request
http, key, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 3600
while time.time() < deadline:
    m = {}
    for line in urllib.request.urlopen(f"http://{http}/v1/metrics").read().decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            m[k] = float(v)
    if m.get(key, 0) >= want and m.get("mlp_allocations_live", 0) == 0 and m.get('mlp_evaluations{status="pending"}', 0) == 0:
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"timed out waiting for {key} >= {want}")
PY
}

# submit KIND COUNT: registers COUNT jobs over one keep-alive connection, in rounds of ROUND
# (batch: each round waited on until its allocations completed).
submit() {
  python3 - "$HTTP" "$1" "$2" "$ROUND" <<'PY'
import http.client, json, sys, time, urllib.request
addr, kind, n, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection(addr)
def metric(key):
    for line in urllib.request.urlopen(f"http://{addr}/v1/metrics").read().decode().splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
batch = '''job "%s" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config { command = "/bin/true" }
      resources {
        cpu    = 10
        memory = 8
      }
    }
  }
}'''
live = '''job "%s" {
  type = "service"
  group "g" {
    count = 0
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
    }
  }
}'''
base = metric('mlp_allocations{status="complete"}')
for i in range(n):
    name = f"{kind}-{i:06d}"
    body = json.dumps({"hcl": (batch if kind == "batch" else live) % name})
    conn.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"{name}: HTTP {r.status}: {data[:300]!r}")
    if kind == "batch" and ((i + 1) % rnd == 0 or i + 1 == n):
        # /v1/metrics walks every allocation; a slow poll keeps it off the measured CPU.
        while metric('mlp_allocations{status="complete"}') < base + i + 1:
            time.sleep(0.25)
PY
}

machine_line
echo "== mlp (release build): server + agent, N=$N batch jobs, LIVE=$LIVE count=0 service jobs"
start_server
MLP_LOG=warn "$MLP" agent --enable-raw-exec --data-dir "$out/agent" --servers "$GRPC" >>"$out/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
python3 - "$HTTP" <<'PY'
import json, sys, time, urllib.request
for _ in range(300):
    if json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/v1/nodes")):
        sys.exit(0)
    time.sleep(0.1)
sys.exit("the agent did not register")
PY
sleep 5
echo "gc_agent_idle_rss_mib $(rss_mib "$agent_pid")"
echo "gc_server_empty_rss_mib $(rss_mib "$server_pid")"

t0=$(now)
submit batch "$N"
wait_metrics 'mlp_allocations{status="complete"}' "$N"
t1=$(now)
echo "gc_batch_jobs $N"
echo "gc_batch_run_s $(echo "$t1 - $t0" | bc)"
echo "gc_batch_jobs_per_s $(echo "$N / ($t1 - $t0)" | bc -l | xargs printf '%.1f')"
echo "gc_before_server_rss_mib $(rss_mib "$server_pid")"
echo "gc_before_agent_rss_mib $(rss_mib "$agent_pid")"
echo "gc_before_data_dir_mib $(du_mib "$out/server")"
echo "gc_before_state_kib $(state_kib)"

t0=$(now)
"$MLP" system gc --json >"$out/gc.json"
t1=$(now)
echo "gc_system_gc_s $(echo "$t1 - $t0" | bc)"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("gc_collected jobs=%s evals=%s allocs=%s" % (r.get("jobs",0), r.get("evals",0), r.get("allocs",0)))' "$out/gc.json"
sleep 2
echo "gc_after_server_rss_mib $(rss_mib "$server_pid")"
echo "gc_after_data_dir_mib $(du_mib "$out/server")"
echo "gc_after_state_kib $(state_kib)"

kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
start_server
sleep 2
echo "gc_after_restart_server_rss_mib $(rss_mib "$server_pid")"
echo "gc_after_restart_data_dir_mib $(du_mib "$out/server")"

# A snapshot of the collected state and a compacted log: restarted with a snapshot after every
# entry and no log kept behind it (then restarted with the defaults again).
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
start_server --raft-snapshot-logs 1 --raft-keep-logs 0
sleep 3
echo "gc_after_snapshot_data_dir_mib $(du_mib "$out/server")"
# Live jobs on a fresh server and data dir, so that the history above (replayed from the log
# on a restart) does not count; no agent is needed for `count = 0` jobs.
echo "gc_after_all_agent_rss_mib $(rss_mib "$agent_pid")"
kill "$server_pid" "$agent_pid"; wait "$server_pid" "$agent_pid" 2>/dev/null || true
rm -rf "$out/server"
start_server

t0=$(now)
submit live "$LIVE"
wait_metrics 'mlp_jobs{status="pending"}' "$LIVE"
t1=$(now)
echo "gc_live_jobs $LIVE"
echo "gc_live_register_s $(echo "$t1 - $t0" | bc)"
sleep 2
echo "gc_live_server_rss_mib $(rss_mib "$server_pid")"
echo "gc_live_data_dir_mib $(du_mib "$out/server")"
