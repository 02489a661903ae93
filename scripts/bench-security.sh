#!/usr/bin/env bash
# What mutual TLS and ACL checks cost (issue 15, goal < 10%), through the CLI as users run it:
# `mlp dev` four ways (plain, TLS, ACLs, TLS + ACLs), one after the other in one run, each
# measured the same way:
#   latency     `mlp job run --wait` of an isolated exec /bin/true batch job, N_LAT calls: p50/p99
#   submits     N_SUB sequential `mlp job run --detach` calls (distinct jobs): total seconds
# With TLS the CLI presents a client certificate (MLP_CACERT/MLP_CLIENT_CERT/MLP_CLIENT_KEY); with
# ACLs it sends a management token (MLP_TOKEN, from `mlp acl bootstrap`).
#
# The four run ROUNDS times, in forward then reverse order, and each figure is the median of its
# rounds: on a disk where creating files gets slower after many were removed (ext4 without a
# journal walks the inodes freed in the last minutes on every allocation), a fixed order would
# charge the first or the last variant for what ran before it.
#
# Usage: scripts/bench-security.sh     (MLP_BIN=path, N_LAT=100, N_SUB=300, ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N_LAT=${N_LAT:-100}
N_SUB=${N_SUB:-300}
ROUNDS=${ROUNDS:-3}
bench_setup security

(cd "$out" && "$MLP" tls ca create >/dev/null && "$MLP" tls cert create -server >/dev/null && "$MLP" tls cert create -client >/dev/null)
machine_line

results=$out/results.txt
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
order="plain tls acl tls+acl"
[ $((round % 2)) -eq 0 ] && order="tls+acl acl tls plain"
for variant in $order; do
  GRPC=127.0.0.1:$(free_port)
  HTTP=127.0.0.1:$(free_port)
  flags=()
  unset MLP_CACERT MLP_CLIENT_CERT MLP_CLIENT_KEY MLP_TOKEN
  export MLP_ADDR=$GRPC
  case $variant in *tls*)
    flags+=(--ca-file "$out/mlp-ca.pem" --cert-file "$out/mlp-server.pem" --key-file "$out/mlp-server-key.pem")
    export MLP_ADDR=https://$GRPC MLP_CACERT=$out/mlp-ca.pem MLP_CLIENT_CERT=$out/mlp-client.pem MLP_CLIENT_KEY=$out/mlp-client-key.pem ;;
  esac
  case $variant in *acl*) flags+=(--acl-enabled) ;; esac
  # A data dir per run, none removed before the end (see the ordering note above).
  MLP_LOG=warn "$MLP" dev --data-dir "$out/data-$variant-$round" --grpc-addr "$GRPC" --http-addr "$HTTP" "${flags[@]}" >"$out/dev.log" 2>&1 &
  dev_pid=$!
  for _ in $(seq 1 100); do grep -q "==> try:" "$out/dev.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "==> try:" "$out/dev.log" || { cat "$out/dev.log"; exit 1; }
  case $variant in *acl*)
    MLP_TOKEN=$("$MLP" acl bootstrap | awk '/Secret ID/ {print $NF}')
    [ -n "$MLP_TOKEN" ] || { echo "bootstrap gave no token" >&2; exit 1; }
    export MLP_TOKEN ;;
  esac
  MLP="$MLP" OUT="$out" N_LAT="$N_LAT" N_SUB="$N_SUB" VARIANT="$variant" python3 - <<'PY'
import os, statistics, subprocess, sys, time
sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, "scripts")  # the script runs from the repository's root
from benchlib import job as job_hcl
MLP, OUT, V = os.environ["MLP"], os.environ["OUT"], os.environ["VARIANT"]
N_LAT, N_SUB = int(os.environ["N_LAT"]), int(os.environ["N_SUB"])
def job(name):
    p = os.path.join(OUT, name + ".hcl")
    with open(p, "w") as f:
        f.write(job_hcl(name))
    return p
lat = []
for i in range(N_LAT + 5):
    p = job(f"lat{i}")
    t = time.perf_counter()
    subprocess.run([MLP, "job", "run", "--wait", p], check=True, stdout=subprocess.DEVNULL)
    if i >= 5:
        lat.append(time.perf_counter() - t)
lat.sort()
files = [job(f"sub{i}") for i in range(N_SUB)]
t = time.perf_counter()
for p in files:
    subprocess.run([MLP, "job", "run", "--detach", p], check=True, stdout=subprocess.DEVNULL)
sub = time.perf_counter() - t
key = V.replace("+", "_")
print(f"{key}_run_wait_p50_ms {statistics.median(lat) * 1e3:.1f}")
print(f"{key}_run_wait_p99_ms {lat[int(len(lat) * 0.99) - 1] * 1e3:.1f}")
print(f"{key}_submits_{N_SUB}_s {sub:.2f}")
PY
  kill "$dev_pid"; wait "$dev_pid" 2>/dev/null || true; dev_pid=
done
done | tee "$results"
RESULTS=$results python3 - <<'PY'
import os, statistics
vals = {}
for line in open(os.environ["RESULTS"]):
    k, v = line.split()
    vals.setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in vals.items()}
print(f"== medians of {len(vals['plain_run_wait_p50_ms'])} rounds")
for k in sorted(med):
    print(f"{k} {med[k]:.2f}")
for metric in ("run_wait_p50_ms", "submits_"):
    base = next(v for k, v in med.items() if k.startswith("plain_" + metric))
    for variant in ("tls", "acl", "tls_acl"):
        v = next(v for k, v in med.items() if k.startswith(variant + "_" + metric))
        print(f"{variant} {metric.rstrip('_')}: {100 * (v / base - 1):+.0f}% against plain")
PY
