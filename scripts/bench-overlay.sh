#!/usr/bin/env bash
# Overlay throughput (issue 13 §5): TCP between two allocations on two hosts over mlp's VXLAN
# overlay, against the bare path between the same two hosts (their veths through one bridge),
# both with iperf3 (Debian's), in one run, REPS times each, alternating; prints the medians and
# the ratio.
#
# Hosts are network namespaces joined by veth pairs to a bridge in another namespace, addresses
# in 198.18.0.0/15, as in the multi-host tests: one `mlp server` and two `mlp agent`s. The
# iperf3 server runs as a bridge-mode `raw_exec` service on host B, the client as a bridge-mode
# batch job on host A that connects to the server allocation's own address.
#
#   scripts/bench-overlay.sh                 # release build (built if missing), 10 s x 3
#   MLP=target/debug/mlp SECS=5 REPS=1 scripts/bench-overlay.sh
#
# The data path is the kernel's (veth, bridge, VXLAN); which build of mlp set it up does not
# change the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-bench.sh

MLP=${MLP:-target/release/mlp}
SECS=${SECS:-10}
REPS=${REPS:-3}
[ -x "$MLP" ] || cargo build --release --bin mlp
MLP=$(realpath "$MLP")
command -v iperf3 >/dev/null || { apt-get update -qq && apt-get install -y -qq iperf3 >/dev/null; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }

ID=mbo$$
BR=${ID}br
W=$(mktemp -d /tmp/mlp-bench-overlay.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -9 -f "$W/" 2>/dev/null || true
  sleep 0.5
  for n in srv a b; do
    ip netns pids "$ID$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ID$n" 2>/dev/null || true
  done
  ip netns del "$BR" 2>/dev/null || true
  umount -R "$W" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

ip netns add "$BR"
ip -n "$BR" link add br0 type bridge
ip -n "$BR" link set br0 up
i=1
for n in srv a b; do
  ip netns add "$ID$n"
  ip -n "$BR" link add "h$n" type veth peer name eth0 netns "$ID$n"
  ip -n "$BR" link set "h$n" master br0 up
  ip -n "$ID$n" addr add "198.18.250.$i/24" dev eth0
  ip -n "$ID$n" link set eth0 up
  ip -n "$ID$n" link set lo up
  i=$((i + 1))
done
SRV=198.18.250.1:4647
export MLP_LOG=warn
ip netns exec ${ID}srv "$MLP" server --grpc-addr "$SRV" --http-addr 198.18.250.1:4646 --data-dir "$W/server" >"$W/server.log" 2>&1 &
PIDS+=($!)
for n in a b; do
  ip netns exec "$ID$n" "$MLP" agent --enable-raw-exec --servers "$SRV" --node-name "agent-$n" --rpc-addr "198.18.250.$([ $n = a ] && echo 2 || echo 3):0" \
    --data-dir "$W/agent-$n" >"$W/agent-$n.log" 2>&1 &
  PIDS+=($!)
done
cli() { ip netns exec ${ID}srv "$MLP" --address "$SRV" "$@"; }
for _ in $(seq 100); do
  [ "$(cli node status --json 2>/dev/null | python3 -c 'import json,sys; print(sum(n["status"]=="ready" for n in json.load(sys.stdin)))' 2>/dev/null)" = 2 ] && break
  sleep 0.2
done

cat >"$W/iperf-srv.hcl" <<HCL
job "iperf-srv" {
  type = "service"
  group "g" {
    constraint {
      attribute = "\${node.name}"
      value     = "agent-b"
    }
    network {
      mode = "bridge"
      port "iperf" {
        to = 5201
      }
    }
    task "srv" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "env > \$MLP_TASK_DIR/env.txt; exec iperf3 -s -p 5201"]
      }
      resources {
        cpu    = 500
        memory = 128
      }
    }
  }
}
HCL
cli job run --detach "$W/iperf-srv.hcl" >/dev/null
IP=""
for _ in $(seq 150); do
  IP=$(cat "$W"/agent-b/allocs/*/srv/local/env.txt 2>/dev/null | sed -n 's/^MLP_IP_iperf=//p' | head -1)  || true
  [ -n "$IP" ] && break
  sleep 0.2
done
[ -n "$IP" ] || { echo "the iperf3 server allocation did not start"; tail -20 "$W"/*.log; exit 1; }
ip netns exec ${ID}b iperf3 -s -p 5202 -D --pidfile "$W/bare.pid"
sleep 0.5

overlay_run() {
  local r=$1
  cat >"$W/iperf-cli-$r.hcl" <<HCL
job "iperf-cli-$r" {
  type = "batch"
  group "g" {
    constraint {
      attribute = "\${node.name}"
      value     = "agent-a"
    }
    network {
      mode = "bridge"
    }
    task "cli" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "iperf3 -c $IP -p 5201 -t $SECS -J > \$MLP_TASK_DIR/out.json"]
      }
      resources {
        cpu    = 500
        memory = 128
      }
    }
  }
}
HCL
  cli job run --wait "$W/iperf-cli-$r.hcl" >/dev/null
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9, 2))' \
    "$(ls -t "$W"/agent-a/allocs/*/cli/local/out.json | head -1)"
}
bare_run() {
  ip netns exec ${ID}a iperf3 -c 198.18.250.3 -p 5202 -t "$SECS" -J >"$W/bare-$1.json"
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9, 2))' "$W/bare-$1.json"
}

machine_line
echo "== $REPS x $SECS s each, alternating; Gbit/s received"
OV=(); BARE=()
for r in $(seq "$REPS"); do
  b=$(bare_run "$r"); BARE+=("$b")
  o=$(overlay_run "$r"); OV+=("$o")
  echo "run $r: bare veth path $b Gbit/s, overlay (allocation to allocation) $o Gbit/s"
done
python3 - "${BARE[*]}" "${OV[*]}" <<'PY'
import statistics, sys
bare = [float(x) for x in sys.argv[1].split()]
ov = [float(x) for x in sys.argv[2].split()]
mb, mo = statistics.median(bare), statistics.median(ov)
print(f"median: bare {mb:.2f} Gbit/s, overlay {mo:.2f} Gbit/s, overlay / bare = {mo / mb:.2f}")
PY
