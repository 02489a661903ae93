# Shared by the scripts/bench-*.sh scripts (source it; not meant to run on its own).

# Prints the machine line that docs/benchmarks.md quotes with every result.
machine_line() {
  echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
}

# release_mlp: sets MLP to the binary a benchmark measures: MLP_BIN when set, else the static
# release binary (docs/ARCHITECTURE.md, "The binary"; a CPU-only `mlp dev` and the CLI are what
# it is for), built here.
release_mlp() {
  if [ -z "${MLP_BIN:-}" ]; then
    # What the static build needs, as .ci/run installs it: the target's std and musl-gcc.
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl >&2
    command -v musl-gcc >/dev/null 2>&1 || apt-get install -y -qq musl-tools >&2
    cargo build --release --target x86_64-unknown-linux-musl --bin mlp >&2
  fi
  MLP=${MLP_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-musl/release/mlp}
}

# bench_setup NAME: MLP (release_mlp), `out` (a temp dir removed on exit, with the `mlp dev` of
# `dev_pid` killed), and free_port.
bench_setup() {
  release_mlp
  out=$(mktemp -d "/tmp/mlp-bench-$1.XXXXXX")
  dev_pid=
  trap bench_cleanup EXIT
}
bench_cleanup() {
  # A script's own teardown first (stopping its jobs: tasks outlive their agent by design).
  if declare -F bench_teardown >/dev/null; then bench_teardown || true; fi
  [ -n "${dev_pid:-}" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  rm -rf "$out"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# compare_kv MLP.txt OTHER.txt <<'PY' … PY
# Runs the Python on stdin with `m` and `o` bound to the `key value` lines of the two files
# (mlp's and the baseline's, as dicts of floats).
compare_kv() {
  local body
  body=$(cat)
  python3 - "$1" "$2" <<PY
import sys
def read(p):
    d = {}
    for line in open(p):
        parts = line.split()
        if len(parts) == 2:
            try: d[parts[0]] = float(parts[1])
            except ValueError: pass
    return d
m, o = read(sys.argv[1]), read(sys.argv[2])
$body
PY
}

# slurm_up DIR: a one-node Slurm 22.05 (Debian's slurm-wlm, installed if missing) configured as
# ../shared/peers/slurm-baseline.sh configures it (munge auth, cons_tres, OverSubscribe=FORCE:50),
# its state under DIR; sets SLURM_PIDS. slurm_down stops it. Writes /etc/slurm/slurm.conf.
slurm_up() {
  local W=$1 H
  command -v slurmctld >/dev/null || { apt-get update -qq && apt-get install -y -qq slurm-wlm >/dev/null; }
  H=$(hostname)
  mkdir -p "$W/d" "$W/ctld" /run/munge /etc/slurm; chown munge:munge /run/munge
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=baseline
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmdSpoolDir=$W/d
StateSaveLocation=$W/ctld
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=$W/ctld.log
SlurmdLogFile=$W/d.log
NodeName=$H CPUs=$(nproc) RealMemory=16000 State=UNKNOWN
PartitionName=main Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:50
CONF
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  # munged forks into the background: wait (bounded) for its socket before Slurm needs it.
  for _ in $(seq 1 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  SLURM_PIDS=()
  slurmctld -D -i >"$W/ctld.out" 2>&1 & SLURM_PIDS+=($!)
  for _ in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  slurmd -D >"$W/d.out" 2>&1 & SLURM_PIDS+=($!)
  for _ in $(seq 1 50); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 0.2; done
  sinfo -h -o %t | grep -q idle || { echo "slurm did not come up (see $W/*.log)" >&2; return 1; }
}

slurm_down() {
  for p in "${SLURM_PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null; done
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  # Wait (bounded) until it is gone: a slurm_up right after would otherwise find the exiting
  # munged, start none, and lose its socket a moment later (seen as "Munge encode failed").
  for _ in $(seq 1 50); do pgrep -x munged >/dev/null || break; sleep 0.1; done
  return 0
}
