#!/usr/bin/env python3
"""mlp against mlp, not a peer comparison: N sequential `mlp job run --detach` of new `/bin/true`
jobs (scripts/bench-vs-slurm.sh's throughput job, from scripts/benchlib.py) against a fresh
`mlp dev`, each binary given in turn, for ROUNDS rounds (binaries alternated within each round,
so a machine whose speed drifts treats them alike). Prints, per run: time per call (first submit -> last
submit returned), the calls' wall p50/p90, the CLI's own CPU (getrusage of the children), and the
Raft index once every job is dead, and the CPU the whole machine spent per call during the loop
(/proc/stat: every process, the kernel, the jobs' own tasks).

    scripts/bench-cli-loop.py [--calls 300] [--rounds 4] [--perf] MLP_BIN [MLP_BIN ...]

--perf also samples every CPU with `perf record -a` during each loop and prints where the
machine's CPU went per call, by kind of process: the CLI calls, `mlp dev` (servers' and agent's
threads), the tasks' supervisors and inits (`mlp-supervisor`, `mlp-init`; `exe` in binaries
before they named themselves), the tasks themselves (`/bin/true`), this harness, and the rest
(kernel threads, other processes).

Root (the jobs are isolated `exec` tasks). Data dirs go under $TMPDIR (docs/benchmarks.md puts it
on a journaled ext4, runs 25-36 say why).
"""
import argparse, http.client, json, os, resource, shutil, subprocess, sys, tempfile, time

sys.dont_write_bytecode = True  # no __pycache__ in the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, job, machine_busy, pct  # noqa: E402


def perf_start(path):
    return subprocess.Popen(["perf", "record", "-a", "-F", str(PERF_HZ), "-o", path, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_classes(path, mlp, dev_pid, calls):
    """ms of CPU per call by kind of process, from the samples of `perf record -a`."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "pid,comm"], capture_output=True, text=True).stdout
    exe, counts = os.path.basename(mlp)[:15], {}
    for line in out.splitlines():
        parts = line.rsplit(None, 1)  # "COMM PID"; a comm may hold spaces
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        comm, pid = parts[0].strip(), int(parts[1])
        if comm == "swapper":
            continue
        if pid == dev_pid:
            kind = "mlp dev"
        elif comm == exe:
            kind = "CLI"
        elif comm in ("exe", "mlp-supervisor", "mlp-init", "mlp-spare", "mlp-zygote"):
            kind = "supervisors+inits"
        elif comm == "true":
            kind = "tasks (/bin/true)"
        elif comm.startswith("python"):
            kind = "harness"
        else:
            kind = "other"
        counts[kind] = counts.get(kind, 0) + 1
    return {k: v * 1e3 / PERF_HZ / calls for k, v in counts.items()}


PERF_HZ = 999


def run(mlp, calls, perf=False):
    d = tempfile.mkdtemp(prefix="mlp-cli-loop.")
    grpc, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = open(os.path.join(d, "dev.log"), "w")
    dev = subprocess.Popen([mlp, "dev", "--data-dir", os.path.join(d, "data"), "--grpc-addr", grpc, "--http-addr", http_addr],
                           stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, MLP_LOG="warn"))
    try:
        deadline = time.time() + 20
        while "==> try:" not in open(os.path.join(d, "dev.log")).read():
            if time.time() > deadline or dev.poll() is not None:
                raise SystemExit(f"{mlp} dev did not start:\n" + open(os.path.join(d, "dev.log")).read()[-2000:])
            time.sleep(0.1)
        files = []
        for i in range(calls + 3):
            p = os.path.join(d, f"j{i}.hcl")
            with open(p, "w") as f:
                f.write(job(f"loop-{i}"))
            files.append(p)
        env = dict(os.environ, MLP_ADDR=grpc)

        def submit(f):
            r = subprocess.run([mlp, "job", "run", "--detach", f], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            if r.returncode != 0:
                raise SystemExit(f"mlp job run --detach failed: {r.stderr.decode()[-500:]}")

        for f in files[:3]:  # warm-up
            submit(f)
        time.sleep(1)
        walls, cpus = [], []
        perf_data = os.path.join(d, "perf.data")
        recorder = perf_start(perf_data) if perf else None
        if recorder:
            time.sleep(0.5)  # perf's start-up is not the loop's
        busy0 = machine_busy()
        t0 = time.perf_counter()
        for f in files[3:]:
            r0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            submit(f)
            walls.append((time.perf_counter() - t) * 1e3)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1e3)
        per_call = (time.perf_counter() - t0) * 1e3 / calls
        busy = (machine_busy() - busy0) * 1e3 / calls
        classes = None
        if recorder:
            recorder.send_signal(2)
            recorder.wait()
            classes = perf_classes(perf_data, mlp, dev.pid, calls)
        c = http.client.HTTPConnection(http_addr, timeout=30)
        index, deadline = 0, time.time() + 120
        while True:
            c.request("GET", f"/v1/jobs?index={index}&wait=5s")
            resp = c.getresponse()
            jobs = json.loads(resp.read())
            index = int(resp.getheader("x-mlp-index") or 0)
            if len(jobs) == calls + 3 and all(j["status"] == "dead" for j in jobs):
                break
            if time.time() > deadline:
                raise SystemExit("not every job was dead after 120 s")
        return per_call, pct(walls, 0.5), pct(walls, 0.9), pct(cpus, 0.5), busy, index, classes
    finally:
        dev.terminate()
        dev.wait()
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--perf", action="store_true", help="also sample all CPUs with perf and split the CPU per call by process kind")
    ap.add_argument("binaries", nargs="+")
    a = ap.parse_args()
    print(f"== {a.calls} sequential `mlp job run --detach` per run, {a.rounds} rounds (mlp against mlp, not a peer ratio)")
    for r in range(1, a.rounds + 1):
        for b in a.binaries:
            per_call, p50, p90, cpu, busy, index, classes = run(os.path.abspath(b), a.calls, a.perf)
            print(f"round {r} {b}: {per_call:.2f} ms per call | wall p50 {p50:.2f} p90 {p90:.2f} ms | "
                  f"CLI CPU p50 {cpu:.2f} ms | machine CPU {busy:.2f} ms per call | raft index {index}", flush=True)
            if classes:
                kinds = ["CLI", "mlp dev", "supervisors+inits", "tasks (/bin/true)", "harness", "other"]
                print("    CPU per call (perf -a, ms): " + ", ".join(f"{k} {classes.get(k, 0):.2f}" for k in kinds)
                      + f", total {sum(classes.values()):.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
