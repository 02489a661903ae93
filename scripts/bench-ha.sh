#!/usr/bin/env bash
# High-availability benchmarks (root; network namespaces; installs etcd-server if missing):
#   * job registrations/s on 3 mlp servers (fsync on, 500 concurrent clients) and, in the same
#     run, a 3-member etcd 3.4's writes/s from ../shared/peers/etcd-baseline.sh (500 clients);
#   * leader failover: kill -9 → next acknowledged write, p50/max over 20 trials;
#   * node loss → replacement running, p50 over 10 trials with a 2 s heartbeat TTL;
#   * failover-cli-defaults (only when named): default Raft flags, kill -9 the leader → one
#     `mlp job run --detach --address A,B,C` acknowledged, p50/p90/max over 20 kills.
# Usage: scripts/bench-ha.sh [regs] [failover] [nodeloss] [failover-cli-defaults]
#        (default: regs failover nodeloss)
# Env: MLP_BENCH_CLIENTS (500), MLP_BENCH_SECS (20), MLP_FAILOVER_TRIALS (20),
#      MLP_NODELOSS_TRIALS (10).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
peers=../shared/peers
out=$(mktemp -d /tmp/mlp-bench-ha.XXXXXX)
trap 'rm -rf "$out"' EXIT
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(regs failover nodeloss)

machine_line
echo "== mlp (release build): ${modes[*]}"
cargo bench --bench ha -- "${modes[@]}" 2>&1 | grep -E '^(ha3_|failover|nodeloss|benchmark failed|thread .* panicked)' | tee "$out/mlp.txt"

if printf '%s\n' "${modes[@]}" | grep -qx regs; then
  echo "== etcd ($peers/etcd-baseline.sh)"
  bash "$peers/etcd-baseline.sh" | tee "$out/etcd.txt"
  compare_kv "$out/mlp.txt" "$out/etcd.txt" <<'PY'
e = o
if 'ha3_registrations_per_sec' in m and e.get('etcd_writes_per_sec'):
    r = m['ha3_registrations_per_sec'] / e['etcd_writes_per_sec']
    print(f"== 3 servers, same run: mlp {m['ha3_registrations_per_sec']:.0f} registrations/s vs etcd {e['etcd_writes_per_sec']:.0f} writes/s: {r:.2f}x etcd")
PY
fi
