#!/usr/bin/env bash
# Leader failover benchmark: 3 mlp servers, each in its own network namespace (198.18.0.0/15),
# a client registering jobs in a loop; kill -9 the leader and time until a write that started
# after the kill is acknowledged. Prints p50 / max over MLP_FAILOVER_TRIALS trials (default 20).
# Needs root (network namespaces). Usage: scripts/bench-failover.sh [trials]
# Builds the test profile by default (failover time is Raft timeouts, not CPU); set
# MLP_BENCH_PROFILE=release to measure a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLP_FAILOVER_TRIALS="${1:-${MLP_FAILOVER_TRIALS:-20}}"
echo "machine: $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
cargo test ${MLP_BENCH_PROFILE:+--profile "$MLP_BENCH_PROFILE"} --test ha -- --ignored --exact ha_failover_bench --nocapture 2>&1 | grep -E '^FAILOVER|^killed|panicked|timed out|test result'
