#!/usr/bin/env bash
# mlp against Slurm, the same work through each one's command-line tool, in one run (issue 11 §3).
# Root; installs slurm-wlm if missing. The static release binary of mlp (or MLP_BIN=path).
#
#   latency     `mlp job run --wait` of an isolated `exec` /bin/true batch job (a new job each
#               time) vs `srun -n1 true`, each a whole CLI call, interleaved, N_LAT each: p50, p99.
#   throughput  500 jobs as 500 sequential CLI calls, first submit → all complete:
#               `mlp job run --detach` vs `sbatch --wrap true`, MLP_BENCH_TP_REPS pairs (default
#               3; which side goes first alternates), each pair's ratio and the median ratio.
#               Also, labelled as such, 500 jobs registered through one API client (one
#               keep-alive HTTP connection).
#
# Both sides run on this one machine: mlp as `mlp dev` (server + agent, fsync on), Slurm as
# slurmctld + slurmd configured as ../shared/peers/slurm-baseline.sh does. Jobs ask for 50 MHz
# and 16 MiB on mlp, one CPU (oversubscribed up to 50 per CPU) on Slurm: up to ~100 at once on
# both sides of this 2-core machine.
#
# Both sides' state lives under $TMPDIR (default /tmp). On an ext4 without a journal (the build
# machine's root) every file created walks the inodes freed in the last minutes, so a run right
# after another run's clean-up is slower: put TMPDIR on a journaled file system for comparable
# runs (docs/benchmarks.md, "Runs 25–36").
#
# Usage: [TMPDIR=dir] scripts/bench-vs-slurm.sh   (MLP_BENCH_LAT=200, MLP_BENCH_TP=500, MLP_BENCH_TP_REPS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N_LAT=${MLP_BENCH_LAT:-200}
N_TP=${MLP_BENCH_TP:-500}
TP_REPS=${MLP_BENCH_TP_REPS:-3}
release_mlp
out=$(mktemp -d "${TMPDIR:-/tmp}/mlp-bench-slurm.XXXXXX")
dev_pid=
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  slurm_down
  rm -rf "$out"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=127.0.0.1:$(free_port)
HTTP=127.0.0.1:$(free_port)

machine_line
slurm_up "$out/slurm"
MLP_LOG=warn "$MLP" dev --data-dir "$out/mlp" --grpc-addr "$GRPC" --http-addr "$HTTP" >"$out/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 100); do grep -q "==> try:" "$out/dev.log" 2>/dev/null && break; sleep 0.1; done
grep -q "==> try:" "$out/dev.log" || { cat "$out/dev.log"; exit 1; }

MLP="$MLP" MLP_ADDR="$GRPC" HTTP="$HTTP" OUT="$out" N_LAT="$N_LAT" N_TP="$N_TP" TP_REPS="$TP_REPS" python3 - <<'PY'
import http.client, json, os, subprocess, sys, time

sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, "scripts")  # the script runs from the repository's root
from benchlib import job, machine_busy, pct

MLP, HTTP, OUT = os.environ["MLP"], os.environ["HTTP"], os.environ["OUT"]
N_LAT, N_TP, TP_REPS = int(os.environ["N_LAT"]), int(os.environ["N_TP"]), max(1, int(os.environ["TP_REPS"]))

def write(name):
    p = os.path.join(OUT, name + ".hcl")
    with open(p, "w") as f:
        f.write(job(name))
    return p

def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return dt

def jobs_dead(prefix):
    """Count of jobs named prefix* that are dead, through a blocking query on the job list."""
    c = http.client.HTTPConnection(HTTP, timeout=60)
    index, deadline = 0, time.time() + 600
    while time.time() < deadline:
        c.request("GET", f"/v1/jobs?index={index}&wait=5s")
        r = c.getresponse()
        body = json.loads(r.read())
        index = int(r.getheader("x-mlp-index") or 0)
        jobs = [j for j in body if j["id"].startswith(prefix)]
        if len(jobs) == N_TP and all(j["status"] == "dead" for j in jobs):
            return
    raise SystemExit(f"{prefix}: not all {N_TP} jobs finished in 600 s")

# ---- latency: interleaved, after a few warm-up calls on each side
for i in range(5):
    timed(["srun", "-n1", "true"])
    timed([MLP, "job", "run", "--wait", write(f"warm-{i}")])
lat_s, lat_m = [], []
files = [write(f"lat-{i}") for i in range(N_LAT)]
for f in files:
    lat_s.append(timed(["srun", "-n1", "true"]))
    lat_m.append(timed([MLP, "job", "run", "--wait", f]))
print(f"slurm_srun_p50_ms {pct(lat_s, 0.5):.1f}")
print(f"slurm_srun_p99_ms {pct(lat_s, 0.99):.1f}")
print(f"mlp_run_wait_p50_ms {pct(lat_m, 0.5):.1f}")
print(f"mlp_run_wait_p99_ms {pct(lat_m, 0.99):.1f}")

# ---- throughput: N_TP sequential CLI calls each, first submit -> all complete; TP_REPS pairs,
# the side that goes first alternating (the machine's speed drifts within minutes)
def mlp_throughput(rep):
    files = [write(f"tp{rep}-{i}") for i in range(N_TP)]
    b = machine_busy()
    t = time.perf_counter()
    for f in files:
        r = subprocess.run([MLP, "job", "run", "--detach", f], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise SystemExit(f"mlp job run --detach failed: {r.stderr.decode()[-500:]}")
    submitted = time.perf_counter() - t
    jobs_dead(f"tp{rep}-")
    return submitted, time.perf_counter() - t, (machine_busy() - b) * 1e3 / N_TP

def slurm_throughput():
    b = machine_busy()
    t = time.perf_counter()
    for _ in range(N_TP):
        subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], capture_output=True, check=True)
    submitted = time.perf_counter() - t
    while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        if time.perf_counter() - t > 600:
            raise SystemExit("slurm: jobs still queued after 600 s")
        time.sleep(0.05)
    return submitted, time.perf_counter() - t, (machine_busy() - b) * 1e3 / N_TP

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

pairs = []
for rep in range(TP_REPS):
    if rep % 2 == 0:
        m, s = mlp_throughput(rep), slurm_throughput()
    else:
        s, m = slurm_throughput(), mlp_throughput(rep)
    pairs.append((m, s))
    print(f"throughput pair {rep + 1}/{TP_REPS} ({'mlp' if rep % 2 == 0 else 'Slurm'} first): "
          f"mlp {m[1]:.2f} s (submits {m[0]:.2f} s), sbatch {s[1]:.2f} s (submits {s[0]:.2f} s): {s[1] / m[1]:.2f}x; "
          f"machine CPU per job, harness included: mlp {m[2]:.1f} ms, Slurm {s[2]:.1f} ms", flush=True)
print(f"mlp_cli{N_TP}_submit_s {median([m[0] for m, _ in pairs]):.2f}")
print(f"mlp_cli{N_TP}_s {median([m[1] for m, _ in pairs]):.2f}")
print(f"slurm_sbatch{N_TP}_submit_s {median([s[0] for _, s in pairs]):.2f}")
print(f"slurm_sbatch{N_TP}_s {median([s[1] for _, s in pairs]):.2f}")

# ---- one API client (labelled: not a CLI figure)
c = http.client.HTTPConnection(HTTP, timeout=60)
t = time.perf_counter()
for i in range(N_TP):
    c.request("POST", "/v1/jobs", body=json.dumps({"hcl": job(f"api-{i}")}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"POST /v1/jobs: {r.status}")
jobs_dead("api-")
print(f"mlp_api{N_TP}_s {time.perf_counter() - t:.2f}")

print("== ratios (same run)")
r_lat = pct(lat_s, 0.5) / pct(lat_m, 0.5)
print(f"latency p50: mlp {pct(lat_m, 0.5):.1f} ms vs srun {pct(lat_s, 0.5):.1f} ms: mlp at {1 / r_lat:.2f} of Slurm's "
      f"({'meets' if r_lat >= 2 else 'MISSES'} the floor: at most half)")
ratios = [s[1] / m[1] for m, s in pairs]
r_tp = median(ratios)
print(f"throughput: {N_TP} CLI calls to all complete, {TP_REPS} pairs: mlp {median([m[1] for m, _ in pairs]):.2f} s vs "
      f"sbatch {median([s[1] for _, s in pairs]):.2f} s (medians); median of the pairs' ratios {r_tp:.2f}x "
      f"({', '.join(f'{r:.2f}' for r in ratios)}) ({'meets' if r_tp >= 5 else 'MISSES'} the floor: 5x)")
PY
