#!/usr/bin/env bash
# Spine diagnostics, in process: `cargo bench --bench spine` (an already-connected gRPC client
# against `mlp dev`, start times as the agent recorded them). These figures are diagnostics of
# mlp's own path and are never set beside a peer's CLI figure; the like-for-like comparison with
# Slurm is scripts/bench-vs-slurm.sh.
# Usage: scripts/bench-spine.sh            (MLP_BENCH_LATENCY_JOBS=200 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
out=$(mktemp -d /tmp/mlp-bench.XXXXXX)
trap 'rm -rf "$out"' EXIT

machine_line
echo "== mlp (release build), in-process diagnostics"
MLP_BENCH_OUT="$out/mlp.json" cargo bench --bench spine 2>&1 | grep -E '^(mlp_|benchmark failed)' | tee "$out/mlp.txt"
