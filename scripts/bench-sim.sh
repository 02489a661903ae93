#!/usr/bin/env bash
# The scheduler benchmark on the openb production trace (docs/benchmarks.md, "Scheduler on the
# openb trace"): every trace × every policy × 10 seeds with `mlp sim --online` (release build:
# fgd and mlp each with the foresight workload and the learned, online one), one JSON
# file per trace in OUT, then the table (and plot, if matplotlib is available) from
# scripts/bench-sim-report.py.
#
# Usage: scripts/bench-sim.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/openb}
OUT=${2:-target/bench-sim}
SEEDS=${SEEDS:-10}
mkdir -p "$OUT"
cargo build --release --bin mlp
for trace in default cpu050 gpushare40 multigpu20 gpuspec10; do
  echo "== $trace"
  # taskset pins the run to one core where available: placements/s is a one-core figure.
  pin=(); command -v taskset >/dev/null && pin=(taskset -c 0)
  "${pin[@]}" ./target/release/mlp sim --nodes "$DATA/openb_node_list_gpu_node.csv" \
    --pods "$DATA/openb_pod_list_$trace.csv" --seeds "$SEEDS" --policy all --online --json > "$OUT/$trace.json"
done
python3 scripts/bench-sim-report.py "$OUT"
