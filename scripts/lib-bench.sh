# Shared by the scripts/bench-*.sh scripts (source it; not meant to run on its own).

# Prints the machine line that docs/benchmarks.md quotes with every result.
machine_line() {
  echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
}

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
