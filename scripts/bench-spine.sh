#!/usr/bin/env bash
# Spine benchmark with the Slurm baseline in the same run (root; installs slurm-wlm if missing).
# Prints mlp's figures, Slurm's, and the ratios that docs/benchmarks.md records.
# Usage: scripts/bench-spine.sh            (MLP_BENCH_LATENCY_JOBS=200 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
peers=../shared/peers
out=$(mktemp -d /tmp/mlp-bench.XXXXXX)
trap 'rm -rf "$out"' EXIT

machine_line
echo "== mlp (release build)"
MLP_BENCH_OUT="$out/mlp.json" cargo bench --bench spine 2>&1 | grep -E '^(mlp_|benchmark failed)' | tee "$out/mlp.txt"

echo "== slurm ($peers/slurm-baseline.sh)"
bash "$peers/slurm-baseline.sh" | tee "$out/slurm.txt"

compare_kv "$out/mlp.txt" "$out/slurm.txt" <<'PY'
s = o
print("== ratios (same run)")
if 'slurm_srun_p50_ms' in s and 'mlp_submit_to_running_p50_ms' in m:
    r = s['slurm_srun_p50_ms'] / m['mlp_submit_to_running_p50_ms']
    print(f"submit->running p50: mlp {m['mlp_submit_to_running_p50_ms']:.1f} ms vs slurm srun true p50 {s['slurm_srun_p50_ms']:.1f} ms: mlp {r:.1f}x faster")
if 'slurm_batch500_s' in s and 'mlp_batch500_s' in m:
    r = s['slurm_batch500_s'] / m['mlp_batch500_s']
    print(f"500 batch jobs: mlp {m['mlp_batch500_s']:.2f} s vs slurm {s['slurm_batch500_s']:.1f} s: mlp {r:.1f}x faster")
for k in ('mlp_registrations_per_sec_1_client', 'mlp_registrations_per_sec_64_clients'):
    if k in m: print(f"{k}: {m[k]:.0f}/s")
PY
