#!/usr/bin/env bash
# Dispatches per second of a parameterized job (issue 16 §2) against one `mlp dev`:
#   cli        N_CLI sequential `mlp job dispatch --detach --meta …` calls, a process per call
#              (as a shell pipeline or a trigger script would dispatch)
#   api-seq    N_API sequential POST /v1/job/NAME/dispatch over one keep-alive HTTP connection
#              (one API client: Python's http.client)
#   api-par    N_API of the same over 8 connections in parallel threads
# Each dispatched child really runs (raw_exec /bin/true), so the agent and scheduler work while
# the dispatches come in. Children are counted afterwards: every acknowledged dispatch must exist.
#
# Usage: scripts/bench-dispatch.sh    (MLP_BIN=path, default the release build; N_CLI=100, N_API=500)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N_CLI=${N_CLI:-100}
N_API=${N_API:-500}
bench_setup dispatch

machine_line
echo "== binary: $MLP"
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=$GRPC
MLP_LOG=warn "$MLP" dev --data-dir "$out/data" --grpc-addr "$GRPC" --http-addr "$HTTP" >"$out/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 300); do grep -q "==> try:" "$out/dev.log" 2>/dev/null && break; sleep 0.1; done
grep -q "==> try:" "$out/dev.log" || { cat "$out/dev.log"; exit 1; }

cat > "$out/train.hcl" <<'HCL'
job "train" {
  type = "batch"
  parameterized {
    payload       = "optional"
    meta_required = ["dataset"]
  }
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/true"
      }
      resources {
        cpu    = 1
        memory = 1
      }
    }
  }
}
HCL
"$MLP" job run "$out/train.hcl" >/dev/null
echo "bench payload" > "$out/payload"

start=$(date +%s.%N)
for i in $(seq 1 "$N_CLI"); do
  "$MLP" job dispatch --detach --meta "dataset=d$i" train "$out/payload" >/dev/null
done
end=$(date +%s.%N)
python3 -c "import sys; n=$N_CLI; s=$end-$start; print(f'cli      {n} dispatches in {s:.2f} s: {n/s:.1f} dispatches/s ({1000*s/n:.1f} ms each)')"

HTTP="$HTTP" N_API="$N_API" python3 - <<'PY'
import http.client, json, os, threading, time
host, port = os.environ["HTTP"].split(":")
n = int(os.environ["N_API"])
def run(count, tag, errors):
    c = http.client.HTTPConnection(host, int(port))
    for i in range(count):
        body = json.dumps({"meta": {"dataset": f"{tag}-{i}"}, "payload": "bench payload"})
        c.request("POST", "/v1/job/train/dispatch", body, {"Content-Type": "application/json"})
        r = c.getresponse(); data = r.read()
        if r.status != 200:
            errors.append((r.status, data[:200]))
errors = []
t = time.time(); run(n, "seq", errors); s = time.time() - t
print(f"api-seq  {n} dispatches in {s:.2f} s: {n/s:.1f} dispatches/s ({1000*s/n:.2f} ms each; one HTTP keep-alive client)")
threads = [threading.Thread(target=run, args=(n // 8, f"par{k}", errors)) for k in range(8)]
t = time.time()
for th in threads: th.start()
for th in threads: th.join()
s = time.time() - t
m = (n // 8) * 8
print(f"api-par  {m} dispatches in {s:.2f} s: {m/s:.1f} dispatches/s (8 HTTP keep-alive clients in parallel)")
if errors:
    raise SystemExit(f"{len(errors)} dispatches failed, first: {errors[0]}")
PY

want=$((N_CLI + N_API + (N_API / 8) * 8))
have=$(curl -sf "http://$HTTP/v1/job/train/children" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["children"]))')
echo "children: $have of $want acknowledged dispatches"
[ "$have" -eq "$want" ] || { echo "acknowledged dispatches are missing" >&2; exit 1; }
