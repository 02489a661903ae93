#!/usr/bin/env bash
# The static release binary, for CLI machines, servers and CPU nodes (docs/ARCHITECTURE.md, "The
# binary"): builds it, checks that it is what it claims to be, and runs end-to-end suites against
# it. CI runs this after the README's test command; run it by hand the same way (root, like the
# suite).
#
#   scripts/check-static.sh [nextest args...]
#
# 1. `cargo build --release --target x86_64-unknown-linux-musl` (scripts/lib-bench.sh's
#    release_mlp; it needs the target, `rustup target add x86_64-unknown-linux-musl`, and
#    musl-gcc, Debian's musl-tools: .ci/run installs both, and release_mlp does when missing).
# 2. The binary is static and position-dependent (no program interpreter, ELF type EXEC), and
#    `mlp --version` names the musl target.
# 3. Its daemons allocate with mimalloc and purge freed pages at once: musl gives constructors
#    no argv, so src/allocator.rs reads /proc/self/cmdline to learn that it is a daemon; a
#    mistake there would keep mimalloc's purge delay (more memory held) unnoticed. Its node
#    says why it has no GPUs (a static binary cannot load NVML; GPU nodes run the glibc build).
# 4. The end-to-end suites below with MLP_TEST_BIN set to it: the CLI, `mlp dev`, the agent's
#    zygote, supervisors and isolated tasks are then all this binary.
#
# MLP_BIN=path checks a static binary built elsewhere instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh
TARGET=x86_64-unknown-linux-musl

# MLP (release_mlp: the static release binary, built here), `out`, and `dev_pid` killed on exit.
bench_setup check-static
BIN=$MLP
fail() { echo "check-static: $*" >&2; exit 1; }

headers=$(readelf -lhW "$BIN")
grep -q "Type: *EXEC" <<<"$headers" || fail "$BIN is not a position-dependent executable: $(grep 'Type:' <<<"$headers")"
if grep -q "INTERP" <<<"$headers"; then fail "$BIN asks for a program interpreter (it is dynamically linked)"; fi
version=$("$BIN" --version)
[[ "$version" == *"($TARGET)"* ]] || fail "mlp --version says '$version', not the $TARGET build"
echo "check-static: $version, static, not PIE"

http=127.0.0.1:$(free_port)
MLP_LOG=info "$BIN" dev --data-dir "$out/data" --grpc-addr "127.0.0.1:$(free_port)" --http-addr "$http" >"$out/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 300); do
  grep -q "==> try:" "$out/dev.log" 2>/dev/null && break
  kill -0 "$dev_pid" 2>/dev/null || fail "mlp dev exited: $(tail -20 "$out/dev.log")"
  sleep 0.1
done
grep -q "==> try:" "$out/dev.log" || fail "mlp dev did not start in 30 s: $(tail -20 "$out/dev.log")"
grep "mlp starting" "$out/dev.log" | grep -q 'allocator="mimalloc, freed pages purged at once"' ||
  fail "the daemon does not allocate with mimalloc purging at once: $(grep 'mlp starting' "$out/dev.log")"
echo "check-static: mlp dev allocates with mimalloc, freed pages purged at once"
# A static binary cannot load NVML: its node says so instead of looking like a node without GPUs.
python3 - "http://$http/v1/nodes" <<'PY' || fail "the node does not say why a static build has no GPUs"
import json, sys, time, urllib.request
for _ in range(100):
    nodes = json.load(urllib.request.urlopen(sys.argv[1], timeout=10))
    if nodes:
        why = nodes[0]["attributes"].get("gpu.unavailable", "")
        print("check-static: gpu.unavailable =", why)
        sys.exit(0 if "static (musl) build" in why else 1)
    time.sleep(0.1)
sys.exit("no node registered in 10 s")
PY
kill "$dev_pid" && wait "$dev_pid" 2>/dev/null || true
dev_pid=

MLP_TEST_BIN=$BIN cargo nextest run --no-fail-fast \
  --test spine --test isolation --test alloc_exec --test events --test errors --test tls --test wasm --test job_types \
  --test oci --test network --test services --test acl --test hostile "$@"
