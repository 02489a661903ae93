#!/usr/bin/env bash
# The real-GPU check of issue 12, for a machine with an NVIDIA GPU, its driver, CUDA and
# PyTorch, but no Rust toolchain and no network: it takes a stripped release `mlp` built
# elsewhere (`cargo build --release && strip -o mlp-stripped target/release/mlp`, < 60 MiB).
#
#   scripts/gpu-check.sh [path/to/mlp]      (default: ./mlp-stripped, then target/release/mlp)
#
# Starts `mlp dev` (NVML found the usual way; the driver may live under /usr/local/nvidia),
# then checks, printing one PASS/FAIL line each, within 5 minutes:
#   fingerprint   every GPU nvidia-smi lists is registered, with its UUID, name and memory
#   task          a job asking `gpu { count = 1 }` (isolated exec task) sees exactly one GPU in
#                 `nvidia-smi -L`, and a PyTorch matrix product runs on it
#   isolation     that task's /dev holds one nvidiaN node
#   mps           two `share = 0.5` tasks land on one GPU, run under one MPS daemon, and both
#                 finish a CUDA matrix product
#   metrics       /v1/metrics has utilisation, memory and power for every GPU; node status shows
#                 the GPU usage table
# Exit status: the number of failed checks (0 = all passed).
set -uo pipefail
cd "$(dirname "$0")/.."

MLP=${1:-}
if [ -z "$MLP" ]; then
  for c in ./mlp-stripped ./mlp target/release/mlp; do [ -x "$c" ] && MLP=$c && break; done
fi
[ -x "${MLP:-}" ] || { echo "FAIL setup: no mlp binary (give its path)"; exit 99; }
MLP=$(readlink -f "$MLP")
command -v nvidia-smi >/dev/null || { echo "FAIL setup: nvidia-smi not found"; exit 99; }
command -v python3 >/dev/null || { echo "FAIL setup: python3 not found"; exit 99; }

START=$(date +%s)
W=$(mktemp -d /tmp/mlp-gpu-check.XXXXXX)
failed=0
dev_pid=
pass() { echo "PASS $1${2:+: $2}"; }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  # Tasks of the jobs (they are the agent's; the dev process going does not stop them).
  pkill -f "mlp-gpu-check-task" 2>/dev/null
  echo "== log: $W/dev.log ($(($(date +%s) - START)) s in all)"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=$GRPC
# Tasks see the host's /usr and /lib*; a Python or PyTorch installed elsewhere (conda, a venv,
# ~/.local) is bound into them read-only.
BIND=()
for p in $(python3 -c 'import sys, os, torch; print(sys.prefix, os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null); do
  case "$p" in /usr|/usr/*) ;; *) BIND+=(--exec-bind-ro "$p") ;; esac
done
# The task runs python3 by the path the PATH gives (a venv's bin/python3 is a link to its base
# interpreter, and resolving it would lose the venv's site-packages: seen on the H100 machine,
# /opt/torch/.venv); the interpreter the link points to is bound too where it is outside /usr.
PY3=$(command -v python3)
PY3_REAL=$(readlink -f "$PY3")
case "$PY3_REAL" in /usr/*) ;; *) BIND+=(--exec-bind-ro "$(dirname "$(dirname "$PY3_REAL")")") ;; esac
MLP_LOG=info "$MLP" dev --data-dir "$W/data" --grpc-addr "$GRPC" --http-addr "$HTTP" --gpus nvml "${BIND[@]}" >"$W/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 150); do grep -q "==> try:" "$W/dev.log" 2>/dev/null && break; sleep 0.2; done
grep -q "==> try:" "$W/dev.log" || { fail setup "mlp dev did not start: $(tail -5 "$W/dev.log")"; exit 99; }

NODE=$("$MLP" node status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
"$MLP" node status "$NODE" --json >"$W/node.json"
nvidia-smi --query-gpu=index,uuid,name,memory.total,mig.mode.current --format=csv,noheader,nounits >"$W/smi.csv"

# ---- fingerprint
python3 - "$W/node.json" "$W/smi.csv" <<'PY' && pass fingerprint "$(wc -l <"$W/smi.csv") GPU(s) match nvidia-smi" || fail fingerprint "see above"
import csv, json, sys
node = json.load(open(sys.argv[1]))["node"]
gpus = {g["id"]: g for g in node["resources"].get("gpus", [])}
ok = True
if "gpu.unavailable" in node["attributes"]:
    print("   node says:", node["attributes"]["gpu.unavailable"]); ok = False
for row in csv.reader(open(sys.argv[2])):
    index, uuid, name, mem, mig = [c.strip() for c in row]
    if mig == "Enabled":
        inst = [g for g in gpus.values() if g.get("parent_id") == uuid]
        print(f"   GPU {index} {uuid}: MIG, {len(inst)} instance(s) registered"); ok &= len(inst) > 0
        continue
    g = gpus.get(uuid)
    if g is None:
        print(f"   GPU {index} {uuid} ({name}) is not registered"); ok = False; continue
    if g["model"] != name or abs(int(g["memory_mib"]) - int(mem)) > 64:
        print(f"   GPU {index}: registered {g['model']} {g['memory_mib']} MiB, nvidia-smi {name} {mem} MiB"); ok = False
sys.exit(0 if ok else 1)
PY

job() { # name, gpu block, script, count: an isolated exec batch job, written through python so
         # that the script is one properly escaped HCL string
  python3 - "$W/$1.hcl" "$1" "$2" "$3" "${4:-1}" <<'PY'
import json, sys
path, name, gpu, script, count = sys.argv[1:]
script = script.replace("${", "$${")  # HCL would interpolate ${...}
open(path, "w").write(f"""job "{name}" {{
  type = "batch"
  group "g" {{
    count = {count}
    restart {{
      attempts = 0
      mode = "fail"
    }}
    task "t" {{
      driver = "exec"
      config {{
        command = "/bin/sh"
        args = ["-c", {json.dumps(script)}]
      }}
      env {{
        MLP_CHECK = "mlp-gpu-check-task"
        HOME = "/tmp"
      }}
      resources {{
        cpu = 500
        memory = 8192
        {gpu}
      }}
    }}
  }}
}}
""")
PY
  "$MLP" job run --detach "$W/$1.hcl" >/dev/null || fail "$1" "job run failed"
}
wait_dead() { # job -> prints allocation ids, waits up to $2 s
  python3 - "$MLP" "$1" "${2:-120}" <<'PY'
import json, subprocess, sys, time
mlp, job, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + limit
while time.time() < end:
    v = json.loads(subprocess.run([mlp, "job", "status", job, "--json"], capture_output=True, text=True).stdout or "{}")
    allocs = v.get("allocations", [])
    if allocs and all(a["client_status"] in ("complete", "failed", "lost") for a in allocs):
        for a in allocs:
            print(a["id"], a["client_status"])
        sys.exit(0)
    time.sleep(0.5)
print("timeout", "timeout"); sys.exit(1)
PY
}
logs() { "$MLP" alloc logs "$1" t 2>&1; "$MLP" alloc logs --stderr "$1" t 2>/dev/null; }

MATMUL="$PY3 -c 'import torch; a=torch.randn(2048,2048,device=\"cuda\"); b=(a@a).sum().item(); torch.cuda.synchronize(); print(\"MATMUL_OK\", torch.cuda.device_count(), torch.cuda.get_device_name(0))'"

# ---- task + isolation
job one 'gpu { count = 1 }' "nvidia-smi -L; echo NODES=\$(ls /dev | grep '^nvidia[0-9]' | tr '\n' ' '); $MATMUL"
read -r A1 S1 < <(wait_dead one 120)
OUT=$(logs "$A1")
echo "$OUT" | sed 's/^/   /' | head -20
if [ "$S1" = complete ] && [ "$(echo "$OUT" | grep -c '^GPU [0-9]*:')" = 1 ] && echo "$OUT" | grep -q "MATMUL_OK 1"; then
  pass task "one GPU visible, PyTorch matmul ran"
else
  fail task "status $S1"
fi
if echo "$OUT" | grep -Eq '^NODES=nvidia[0-9]+ ?$'; then pass isolation "$(echo "$OUT" | grep '^NODES=')"; else fail isolation "$(echo "$OUT" | grep '^NODES=')"; fi

# ---- MPS shares: two jobs of half a GPU each (bin packing puts the second beside the first)
SH=()
for j in share1 share2; do
  job $j 'gpu {
          share = 0.5
        }' "echo PCT=\$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE PIPE=\$CUDA_MPS_PIPE_DIRECTORY; sleep 5; $MATMUL"
done
for j in share1 share2; do
  while read -r line; do SH+=("$line"); done < <(wait_dead $j 180)
done
ok=1; devs=
for line in "${SH[@]}"; do
  set -- $line
  OUT=$(logs "$1"); echo "$OUT" | sed 's/^/   /' | head -8
  [ "$2" = complete ] && echo "$OUT" | grep -q MATMUL_OK && echo "$OUT" | grep -q "PCT=50 PIPE=/" || ok=0
  devs="$devs $("$MLP" alloc status "$1" --json | python3 -c 'import json,sys; print(",".join(g["id"] for g in json.load(sys.stdin)["resources"]["gpus"]))')"
done
uniq_devs=$(echo $devs | tr ' ' '\n' | sort -u | wc -l)
starts=$(grep -c "MPS control daemon started" "$W/dev.log" || true)
if [ "$ok" = 1 ] && [ "${#SH[@]}" = 2 ] && [ "$uniq_devs" = 1 ] && [ "$starts" = 1 ]; then
  pass mps "two halves on one GPU, both ran a CUDA matmul under one MPS daemon"
else
  fail mps "allocations: ${SH[*]}; devices:$devs; daemon starts: $starts"
fi

# ---- metrics
sleep 12 # one heartbeat carrying GPU stats
curl -s "http://$HTTP/v1/metrics" >"$W/metrics.txt" 2>/dev/null || python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$HTTP/v1/metrics').read().decode())" >"$W/metrics.txt"
n_gpu=$(wc -l <"$W/smi.csv")
n_util=$(grep -c '^mlp_gpu_utilization_percent{' "$W/metrics.txt")
n_power=$(grep -c '^mlp_gpu_power_watts{' "$W/metrics.txt")
if [ "$n_util" -ge "$n_gpu" ] && [ "$n_power" -ge "$n_gpu" ] && "$MLP" node status "$NODE" | grep -q "GPU usage"; then
  pass metrics "$n_util GPU(s) with utilisation, memory and power in /v1/metrics"
else
  fail metrics "utilisation lines $n_util, power lines $n_power, GPUs $n_gpu"
fi
grep '^mlp_gpu_' "$W/metrics.txt" | head -12 | sed 's/^/   /'

echo "== $failed check(s) failed"
exit "$failed"
