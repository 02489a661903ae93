#!/usr/bin/env bash
# The oci driver's numbers (issue 14 §1), release build, real processes, one run, as root:
#
#   1. Container start with a cached image: `mlp job run --wait` of a job running busybox
#      `true` from an image already on the node, N times (50), each the whole CLI call from
#      start to exit: p50/p99. Beside it, in the same run, `crun run` (Debian's crun) of the same
#      image's root filesystem as an OCI bundle, the whole CLI call (create, start, wait, delete,
#      with its cgroup). crun refuses a hybrid cgroup layout (v1 controllers plus an empty
#      cgroup2 at /sys/fs/cgroup/unified, as on the build machine): its loop runs in a mount
#      namespace of its own without that cgroup2 mount, so crun uses the v1 controllers as mlp
#      does; only the crun calls are timed.
#   2. Pull and unpack of a ~100 MiB image (busybox and 100 MiB of incompressible data, gzip)
#      from the loopback registry: `mlp job run --wait` of it on a node that does not have it
#      (pull, verify, unpack, start), its pull as the agent timed it (labelled in-process), and
#      `skopeo copy` of the same image from the same registry to an OCI layout directory (pull
#      and verify, no unpack), then that copy plus `tar -x` of its layers (pull and unpack).
#
# Usage: scripts/bench-oci.sh [N]       (N = 50; MLP_BIN=path runs another binary)
# Needs: docker-registry, skopeo, crun, busybox-static, python3 (apt-get install docker-registry
# skopeo crun busybox-static).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N=${1:-50}
for tool in docker-registry skopeo crun python3; do
  command -v "$tool" >/dev/null || { echo "bench-oci: needs $tool (apt-get install docker-registry skopeo crun busybox-static)" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "bench-oci: needs /bin/busybox (apt-get install busybox-static)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench-oci: run as root (the oci driver and crun need it)" >&2; exit 1; }

release_mlp
out=$(mktemp -d /tmp/mlp-bench-oci.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

machine_line

# The registry.
REG=127.0.0.1:$(free_port)
cat > "$out/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $out/registry
http:
  addr: $REG
YML
docker-registry serve "$out/registry.yml" >"$out/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$REG/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# Images as OCI layouts (busybox, and busybox + 100 MiB of random bytes), pushed with skopeo.
python3 - "$out" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]
def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name); info.mtime = 1700000000
            if kind == "dir":
                info.type = tarfile.DIRTYPE; info.mode = 0o755; t.addfile(info)
            elif kind == "sym":
                info.type = tarfile.SYMTYPE; info.linkname = data; info.mode = 0o777; t.addfile(info)
            else:
                info.size = len(data); info.mode = 0o755; t.addfile(info, io.BytesIO(data))
    return buf.getvalue()
busybox = open("/bin/busybox", "rb").read()
base = layer([("bin", "dir", None), ("bin/busybox", "file", busybox)] +
             [(f"bin/{a}", "sym", "busybox") for a in ("sh", "true", "echo", "sleep")])
def layout(name, layers):
    d = os.path.join(out, name); blobs = os.path.join(d, "blobs", "sha256"); os.makedirs(blobs)
    def put(b):
        h = hashlib.sha256(b).hexdigest(); open(os.path.join(blobs, h), "wb").write(b); return "sha256:" + h
    descs, diff_ids = [], []
    for tar in layers:
        gz = gzip.compress(tar, compresslevel=1, mtime=0)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
                           "layers": descs}).encode()
    md = put(manifest)
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
               "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, open(os.path.join(d, "index.json"), "w"))
    json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(d, "oci-layout"), "w"))
    return base
layout("small", [base])
layout("big", [base, layer([("data", "file", os.urandom(100 << 20))])])
# The bundle crun runs: the same root filesystem.
os.makedirs(os.path.join(out, "bundle"))
tarfile.open(fileobj=io.BytesIO(base)).extractall(os.path.join(out, "bundle", "rootfs"))
PY
for img in small big; do
  skopeo copy -q --dest-tls-verify=false "oci:$out/$img:1" "docker://$REG/bench/$img:1" >&2
done
(cd "$out/bundle" && crun spec)
python3 - "$out/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["process"]["terminal"] = False; c["process"]["args"] = ["true"]
json.dump(c, open(p, "w"))
PY

# mlp dev.
HTTP=127.0.0.1:$(free_port)
export MLP_ADDR=127.0.0.1:$(free_port)
MLP_LOG=warn "$MLP" dev --data-dir "$out/mlp" --grpc-addr "$MLP_ADDR" --http-addr "$HTTP" >"$out/dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ "$(curl -fs "http://$HTTP/v1/nodes" 2>/dev/null | head -c 2)" = '[{' ] && break; sleep 0.1; done
job() {
  cat > "$out/$1.hcl" <<HCL
job "$1" {
  type = "batch"
  group "g" {
    restart {
      attempts = 0
      mode     = "fail"
    }
    task "t" {
      driver = "oci"
      config {
        image = "$REG/bench/$2:1"
      }
      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
HCL
  echo "$out/$1.hcl"
}
now_ns() { date +%s%N; }
stats() { python3 -c '
import sys
v = sorted(float(x) for x in sys.stdin.read().split())
pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]
print(f"runs={len(v)} p50={pick(0.5):.1f}ms p99={pick(0.99):.1f}ms min={v[0]:.1f}ms")'; }

echo "== 1. start with a cached image (busybox true), $N runs, whole CLI calls"
"$MLP" job run --wait "$(job warm small)" >/dev/null   # pulls it once
: > "$out/mlp.ms"; : > "$out/crun.ms"
for i in $(seq "$N"); do
  f=$(job "start-$i" small)
  t0=$(now_ns); "$MLP" job run --wait "$f" >/dev/null; t1=$(now_ns)
  echo "scale=3; ($t1 - $t0) / 1000000" | bc >> "$out/mlp.ms"
done
unshare -m bash -s "$out" "$N" <<'SH'
set -euo pipefail
out=$1 n=$2
if mountpoint -q /sys/fs/cgroup/unified && [ -d /sys/fs/cgroup/memory ]; then umount -l /sys/fs/cgroup/unified; fi
for i in $(seq "$n"); do
  t0=$(date +%s%N); crun run --bundle "$out/bundle" "bench-$i-$$" >/dev/null; t1=$(date +%s%N)
  echo "scale=3; ($t1 - $t0) / 1000000" | bc >> "$out/crun.ms"
done
SH
echo "mlp job run --wait (oci): $(stats < "$out/mlp.ms")"
echo "crun run:                 $(stats < "$out/crun.ms")"

echo "== 2. pull and unpack of busybox + 100 MiB (gzip) from the loopback registry"
size=$(du -sb "$out/big/blobs" | cut -f1)
t0=$(now_ns); "$MLP" job run --wait "$(job cold big)" >/dev/null; t1=$(now_ns)
s=$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)
echo "mlp job run --wait, image not on the node: ${s}s ($(echo "scale=1; $size / 1048576 / $s" | bc) MiB/s of blobs)"
alloc=$("$MLP" job status cold --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocations"][0]["id"])')
echo "  the agent's own pull figure (in-process): $("$MLP" alloc status "$alloc" | grep -o 'Pulled image.*' | head -1)"
t0=$(now_ns); skopeo copy -q --src-tls-verify=false "docker://$REG/bench/big:1" "oci:$out/copy:1"; t1=$(now_ns)
s=$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)
echo "skopeo copy (pull, verify, no unpack): ${s}s ($(echo "scale=1; $size / 1048576 / $s" | bc) MiB/s)"
rm -rf "$out/copy"; mkdir -p "$out/unpacked"
t0=$(now_ns)
skopeo copy -q --src-tls-verify=false "docker://$REG/bench/big:1" "oci:$out/copy:1"
for blob in $(python3 -c '
import json, sys
d = sys.argv[1]; idx = json.load(open(d + "/index.json"))
m = json.load(open(d + "/blobs/sha256/" + idx["manifests"][0]["digest"].split(":")[1]))
print(" ".join(l["digest"].split(":")[1] for l in m["layers"]))' "$out/copy"); do
  tar -xzf "$out/copy/blobs/sha256/$blob" -C "$out/unpacked"
done
t1=$(now_ns)
s=$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)
echo "skopeo copy + tar -x of the layers (pull and unpack): ${s}s ($(echo "scale=1; $size / 1048576 / $s" | bc) MiB/s)"
