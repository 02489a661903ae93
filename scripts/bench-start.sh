#!/usr/bin/env bash
# Task start latency (issue 11 §2), release build, real processes: where the time goes from the
# agent receiving an allocation to the task's first instruction.
#
# For each binary (MLP_BIN_BEFORE, if set, then MLP_BIN or the release build): `mlp dev` on a
# fresh data dir, then N batch jobs running `/bin/true` through the isolated `exec` driver
# (namespaces, task root, cgroups v1, user nobody), submitted one at a time over HTTP
# (POST /v1/jobs) and each waited on until `complete`. The agent logs every start's phases at
# debug level ("task start phases": `at` = when each phase ended, on the system-wide monotonic
# clock; agent, supervisor and init stamp the same clock), and the submitter notes the
# monotonic clock just before each POST. Per stage (the phases sorted by time, grouped as in
# STAGES below; each phase counts from the one that ended before it, whichever process it was
# in) the script prints p50 and p99 in ms, for each binary side by side.
#
# Usage: scripts/bench-start.sh [N]     (N = 100 by default)
#   MLP_BIN=path         the binary measured ("after"); default: cargo build --release
#   MLP_BIN_BEFORE=path  also measure this binary ("before") in the same run, first
#   MLP_BENCH_ROUNDS=k   alternate before/after k times, N/k jobs each (default 1)
# Then scripts/bench-start-spawn.py: the supervisor's start alone, zygote fork against fork + exec.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-bench.sh

N=${1:-100}
ROUNDS=${MLP_BENCH_ROUNDS:-1}
if [ -z "${MLP_BIN:-}" ]; then
  cargo build --release --bins >&2
fi
AFTER=${MLP_BIN:-$PWD/target/release/mlp}
BEFORE=${MLP_BIN_BEFORE:-}
[ "$(id -u)" = 0 ] || { echo "bench-start.sh needs root (exec tasks: namespaces and cgroups)"; exit 1; }

out=$(mktemp -d /tmp/mlp-bench-start.XXXXXX)
dev_pid=
cleanup() {
  if [ -n "$dev_pid" ]; then kill "$dev_pid" 2>/dev/null || true; wait "$dev_pid" 2>/dev/null || true; fi
  rm -rf "$out"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run_one LABEL BINARY COUNT: one mlp dev, COUNT jobs; appends "submit <alloc> <ns>" lines to
# $out/LABEL.submits and the agent's log to $out/LABEL.log.
run_one() {
  local label=$1 bin=$2 count=$3 dir http grpc
  dir=$out/$label.$RANDOM
  http=127.0.0.1:$(free_port)
  grpc=127.0.0.1:$(free_port)
  MLP_LOG="warn,mlp_agent::driver::supervised=debug" "$bin" dev --data-dir "$dir" --grpc-addr "$grpc" --http-addr "$http" \
    >>"$out/$label.log" 2>&1 &
  dev_pid=$!
  python3 - "$http" "$count" "$label" >>"$out/$label.submits" <<'PY'
import http.client, json, sys, time, urllib.request
addr, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 60
while True:
    try:
        if json.load(urllib.request.urlopen(f"http://{addr}/v1/nodes")):
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("mlp dev did not start (no node registered)")
    time.sleep(0.1)
time.sleep(1)
conn = http.client.HTTPConnection(addr)
spec = '''job "%s" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "exec"
      config { command = "/bin/true" }
      resources {
        cpu    = 100
        memory = 32
      }
    }
  }
}'''
def get(path):
    conn.request("GET", path)
    r = conn.getresponse()
    return json.loads(r.read())
for i in range(n):
    name = f"start-{label}-{i:04d}"
    body = json.dumps({"hcl": spec % name})
    t0 = time.monotonic_ns()
    conn.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"{name}: HTTP {r.status}: {data[:300]!r}")
    end = time.time() + 30
    while True:
        allocs = get(f"/v1/job/{name}/allocations")
        done = [a for a in allocs if a.get("client_status") in ("complete", "failed")]
        if done:
            a = done[0]
            if a["client_status"] != "complete":
                sys.exit(f"{name}: allocation {a['id']} {a['client_status']}: {a.get('client_description')}")
            print("submit", a["id"], t0)
            break
        if time.time() > end:
            sys.exit(f"{name}: not complete after 30 s")
        time.sleep(0.01)
PY
  kill "$dev_pid"; wait "$dev_pid" 2>/dev/null || true
  dev_pid=
  # Leftover task dirs of this run are not needed.
  rm -rf "$dir"
}

machine_line
labels=()
[ -n "$BEFORE" ] && labels+=(before)
labels+=(after)
echo "== task start latency: N=$N isolated exec /bin/true batch jobs, one at a time, rounds=$ROUNDS (${labels[*]})"
per=$(( (N + ROUNDS - 1) / ROUNDS ))
for _ in $(seq 1 "$ROUNDS"); do
  for l in "${labels[@]}"; do
    if [ "$l" = before ]; then run_one before "$BEFORE" "$per"; else run_one after "$AFTER" "$per"; fi
  done
done

python3 - "$out" "${labels[@]}" <<'PY'
import re, sys
out, labels = sys.argv[1], sys.argv[2:]
# Stage: the phases (as named by the agent, supervisor and init) it is made of. A phase
# counts from the phase that ended just before it (by time, across processes).
STAGES = [
    ("submit → alloc received (CLI/HTTP, Raft, scheduler, stream)", ["alloc_received"]),
    ("alloc runner + task dirs", ["alloc_runner", "alloc_dirs", "task_runner"]),
    ("driver prep (user, cgroup paths, root plan)", ["user", "cgroup_paths", "root_planned"]),
    ("supervisor config written", ["config_written"]),
    ("supervisor started (fork/exec or zygote fork)", ["supervisor_spawned", "zygote_forked", "supervisor_main", "supervisor_config", "supervisor_logs"]),
    ("cgroup ready (created off the supervisor's path)", ["cgroup_ready"]),
    ("init forked, in its cgroup", ["init_forked", "init_joined_itself", "init_output", "supervisor_moved_init"]),
    ("namespaces (mnt/uts/ipc unshare)", ["init_unshared"]),
    ("task root (mounts, pivot_root)", ["root_tmpfs", "dir", "symlink", "bind", "tmpfs", "proc", "devpts", "copy", "write", "mask", "pivot_root"]),
    ("task exec (fork, drop privileges, exec)", ["init_in_cgroup", "task_exec"]),
    ("start reported to the agent", ["logs_opened", "record_written", "started"]),
]
OTHER = "other"
# Work done beside the start's path (not part of the partition above): its own duration.
PARALLEL = {"(beside the path) cgroup creation, agent thread": ("cgroup_creating", "cgroup_created")}
PARALLEL_MARKS = {m for pair in PARALLEL.values() for m in pair}
name_to_stage = {p: s for s, ps in STAGES for p in ps}
line_re = re.compile(r'alloc=(\S+).*?at=(.*?) (?:task start phases|$)')
def pct(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, round((len(v) - 1) * p))]
results = {}
for label in labels:
    submits = {}
    for line in open(f"{out}/{label}.submits"):
        _, alloc, ns = line.split()
        submits[alloc] = int(ns)
    stages = {}
    phases = {}
    totals_first = []
    totals_all = []
    n = 0
    for line in open(f"{out}/{label}.log"):
        if "task start phases" not in line:
            continue
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = re.search(r"alloc=(\S+)", line)
        a = re.search(r"at=((?:\S+=\d+ ?)+)", line)
        if not m or not a or m.group(1) not in submits:
            continue
        marks = []
        for w in a.group(1).split():
            k, _, v = w.partition("=")
            marks.append((int(v), k))
        marks.sort()
        prev = submits[m.group(1)]
        acc = {}
        first_instr = None
        at = dict((k, t) for t, k in marks)
        for name, (a, b) in PARALLEL.items():
            if a in at and b in at:
                stages.setdefault(name, []).append((at[b] - at[a]) / 1e6)
        for t, k in marks:
            if k in PARALLEL_MARKS:
                continue
            st = name_to_stage.get(k, OTHER)
            acc[st] = acc.get(st, 0) + max(0, t - prev)
            phases.setdefault(k, []).append(max(0, t - prev) / 1e6)
            prev = max(prev, t)
            if k == "task_exec":
                first_instr = t
        for st, v in acc.items():
            stages.setdefault(st, []).append(v / 1e6)
        recv = dict((k, t) for t, k in marks).get("alloc_received")
        if first_instr and recv:
            totals_first.append((first_instr - recv) / 1e6)
            totals_all.append((first_instr - submits[m.group(1)]) / 1e6)
        n += 1
    results[label] = (n, stages, totals_first, totals_all, phases)
names = [s for s, _ in STAGES] + [OTHER] + list(PARALLEL)
hdr = "| stage | " + " | ".join(f"{l} p50 / p99 (ms)" for l in labels) + " |"
print(hdr)
print("|---" * (len(labels) + 1) + "|")
for s in names:
    if not any(s in results[l][1] for l in labels):
        continue
    cells = []
    for l in labels:
        v = results[l][1].get(s, [])
        cells.append(f"{pct(v, .5):.2f} / {pct(v, .99):.2f}" if v else "–")
    print(f"| {s} | " + " | ".join(cells) + " |")
for title, idx in [("**alloc received → task's first instruction**", 2), ("submit → task's first instruction", 3)]:
    cells = [f"{pct(results[l][idx], .5):.2f} / {pct(results[l][idx], .99):.2f}" for l in labels]
    print(f"| {title} | " + " | ".join(cells) + " |")
print()
print("Each phase (time since the phase that ended before it), p50 / p99 ms:")
order = []
for l in labels:
    for k in results[l][4]:
        if k not in order:
            order.append(k)
for k in order:
    cells = []
    for l in labels:
        v = results[l][4].get(k, [])
        cells.append(f"{pct(v, .5):6.2f} / {pct(v, .99):6.2f}" if v else "      –       ")
    print(f"  {k:24} " + "   ".join(f"{l}: {c}" for l, c in zip(labels, cells)))
print("starts measured: " + ", ".join(f"{l} {results[l][0]}" for l in labels))
for l in labels:
    if results[l][0] == 0:
        sys.exit(f"no 'task start phases' lines for {l}: is the binary logging them (MLP_LOG debug)?")
PY

echo
echo "Supervisor start alone (scripts/bench-start-spawn.py, 200 each, alternated), p50 / p99 ms:"
echo "| how | p50 / p99 (ms) |"
echo "|---|---|"
python3 scripts/bench-start-spawn.py "$AFTER" 200
