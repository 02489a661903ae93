#!/usr/bin/env bash
# MLflow artifact upload and download throughput (issue 17 §2): one `mlp server` against a
# three-server cluster on loopback (every upload pushed to a quorum before it is acknowledged).
# SIZE_MIB bytes of random data, PUT and GET with curl, ROUNDS times each (distinct content
# every round, so no upload is deduplicated), MiB/s per round and the median.
#
# Usage: scripts/bench-artifacts.sh   (MLP_BIN=path, SIZE_MIB=256, ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-256}
ROUNDS=${ROUNDS:-3}
if [ -z "${MLP_BIN:-}" ]; then
  cargo build --release --bin mlp >&2
fi
MLP=${MLP_BIN:-$PWD/target/release/mlp}
out=$(mktemp -d /tmp/mlp-bench-artifacts.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$out"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # n servers; sets ADDR to the first one's HTTP address
  local n=$1 grpc=() http=() i
  for ((i = 0; i < n; i++)); do grpc+=("127.0.0.1:$(port)"); http+=("127.0.0.1:$(port)"); done
  local join
  join=$(IFS=,; echo "${grpc[*]}")
  for ((i = 0; i < n; i++)); do
    local j=()
    [ "$n" -gt 1 ] && j=(--join "$join")
    "$MLP" server --bootstrap-expect "$n" "${j[@]}" --grpc-addr "${grpc[$i]}" --http-addr "${http[$i]}" \
      --data-dir "$out/c$n-s$i" >"$out/c$n-s$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 1 600); do
    MLP_ADDR="$join" "$MLP" operator raft list-peers --json 2>/dev/null | grep -q '"leader": *true' && break
    sleep 0.1
  done
  ADDR="${http[0]}"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

bench() { # label http-addr
  local label=$1 addr=$2 up=() down=() r name
  name=${label// /-}
  for ((r = 0; r < ROUNDS; r++)); do
    head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$out/blob"
    local t
    t=$(curl -sS -o /dev/null -w '%{time_total}' --fail -T "$out/blob" "http://$addr/api/2.0/mlflow-artifacts/artifacts/0/bench/artifacts/$name-$r")
    up+=("$(awk -v s="$SIZE_MIB" -v t="$t" 'BEGIN {printf "%.0f", s / t}')")
    t=$(curl -sS -o /dev/null -w '%{time_total}' --fail "http://$addr/api/2.0/mlflow-artifacts/artifacts/0/bench/artifacts/$name-$r")
    down+=("$(awk -v s="$SIZE_MIB" -v t="$t" 'BEGIN {printf "%.0f", s / t}')")
  done
  printf '%-22s upload MiB/s: %-16s median %-6s download MiB/s: %-16s median %s\n' "$label" "${up[*]}" \
    "$(printf '%s\n' "${up[@]}" | median)" "${down[*]}" "$(printf '%s\n' "${down[@]}" | median)"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); ${SIZE_MIB} MiB per artifact; $MLP"
start 1
bench "1 server" "$ADDR"
start 3
bench "3 servers (quorum)" "$ADDR"
