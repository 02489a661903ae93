#!/usr/bin/env bash
# Service discovery latency (issue 13 §3), one node: from a health check's target turning
# healthy to the agent's DNS responder answering the service's name.
#
# `mlp dev` (own bridge mlpbdns0 and subnet 172.29.250.0/24) runs a bridge-mode job whose task
# serves its /local directory over HTTP, with a service whose http check GETs /health every
# 100 ms. N times: remove /local/health and wait until web.service.mlp is NXDOMAIN on the
# bridge's gateway; then create it, note the time, and query the gateway every 2 ms until the
# answer holds the instance. The figure includes up to one check interval (100 ms) of waiting
# for the next check run, then the check, the registration's Raft entry, the WatchServices
# stream to the agent and the DNS answer. Prints p50/p99/max in ms.
#
# Usage: scripts/bench-dns.sh [N]   (N = 50 by default; root; MLP_BIN = the binary, default
# the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N=${1:-50}
[ "$(id -u)" = 0 ] || { echo "bench-dns.sh needs root (bridge networking)"; exit 1; }
if [ -z "${MLP_BIN:-}" ]; then
  cargo build --release --bins >&2
fi
BIN=${MLP_BIN:-$PWD/target/release/mlp}
BRIDGE=mlpbdns0
SUBNET=172.29.250.0/24
GW=172.29.250.1

out=$(mktemp -d /tmp/mlp-bench-dns.XXXXXX)
dev_pid=
cleanup() {
  if [ -n "$dev_pid" ]; then
    MLP_ADDR=$addr "$BIN" job stop web >/dev/null 2>&1 || true
    sleep 2
    kill "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
  fi
  for ns in "$out"/data/agent/netns/*; do [ -e "$ns" ] && umount -l "$ns" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  nft delete table ip "mlp_$BRIDGE" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

machine_line
"$BIN" dev --data-dir "$out/data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --network-bridge "$BRIDGE" --network-subnet "$SUBNET" >"$out/dev.log" 2>&1 &
dev_pid=$!
addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/^    gRPC: *//p' "$out/dev.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "mlp dev did not start:"; cat "$out/dev.log"; exit 1; }
cat >"$out/web.hcl" <<'HCL'
job "web" {
  group "web" {
    network {
      mode = "bridge"
      port "http" { to = 8080 }
    }
    service {
      name = "web"
      port = "http"
      check {
        type     = "http"
        path     = "/health"
        interval = "100ms"
        timeout  = "100ms"
      }
    }
    task "srv" {
      driver = "exec"
      config {
        command = "/usr/bin/python3"
        args    = ["-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/local"]
      }
    }
  }
}
HCL
MLP_ADDR=$addr "$BIN" job run "$out/web.hcl" >/dev/null
alloc=
for _ in $(seq 300); do
  alloc=$(ls "$out/data/agent/allocs" 2>/dev/null | head -1)
  [ -n "$alloc" ] && [ -d "$out/data/agent/allocs/$alloc/srv/local" ] && break
  sleep 0.1
done
python3 - "$N" "$GW" "$out/data/agent/allocs/$alloc/srv/local/health" <<'PY'
import os, socket, struct, sys, time
n, gw, health = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def query(name):
    q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    try:
        s.sendto(q, (gw, 53))
        r = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    return (r[3] & 0xF, struct.unpack(">H", r[6:8])[0])  # rcode, answer count
def wait(pred, limit=30):
    end = time.time() + limit
    while time.time() < end:
        r = query("web.service.mlp")
        if r is not None and pred(r):
            return
        time.sleep(0.002)
    sys.exit("timed out waiting for the DNS answer to change")
times = []
for i in range(n):
    if os.path.exists(health):
        os.remove(health)
    wait(lambda r: r[0] == 3)  # NXDOMAIN
    time.sleep(0.05)
    t0 = time.monotonic()
    open(health, "w").write("ok\n")
    wait(lambda r: r[0] == 0 and r[1] > 0)
    times.append((time.monotonic() - t0) * 1000)
times.sort()
p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"healthy -> DNS answer, {n} runs, check interval 100 ms: p50 {p(0.5):.1f} ms  p99 {p(0.99):.1f} ms  max {times[-1]:.1f} ms")
PY
