"""The client side of scripts/bench-tracking.sh: the same MLflow client code against any
tracking server (MLflow's own or mlp's), so the two are compared doing the same work.

usage: bench-tracking-client.py URI EXPERIMENT RUNS THREADS [PROCS [FIRST]]
Prints one JSON object: runs logged per second (create + log-batch of 10 metrics + terminate,
THREADS client threads in PROCS processes, default 4), the median time of a filtered
search_runs and of listing every run of the experiment. FIRST numbers the runs (tag `i`).
"""

import json
import multiprocessing
import statistics
import sys
import threading
import time

from mlflow import MlflowClient
from mlflow.entities import Metric

uri, exp_name, n_runs, n_threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
n_procs = int(sys.argv[5]) if len(sys.argv) > 5 else 4
start_at = int(sys.argv[6]) if len(sys.argv) > 6 else 0
client = MlflowClient(uri)
exp = client.get_experiment_by_name(exp_name)
exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)

def log_runs(first, count, n_threads, errors):
    """Logs runs first..first+count with n_threads threads; appends errors to `errors`."""
    state = {"next": first}
    lock = threading.Lock()

    def worker():
        c = MlflowClient(uri)
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= first + count:
                return
            try:
                run = c.create_run(exp_id, tags={"i": str(i)})
                ts = int(time.time() * 1000)
                c.log_batch(run.info.run_id, metrics=[Metric(f"m{j}", ((i * 7 + j) % 100) / 100.0, ts, 0) for j in range(10)])
                c.set_terminated(run.info.run_id)
            except Exception as e:  # counted, reported; the figure is only valid without errors
                errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def log_proc(first, count, n_threads, q):
    errors = []
    log_runs(first, count, n_threads, errors)
    q.put(errors)


# The THREADS client threads run in PROCS processes (Python's GIL would otherwise make one
# client process the bottleneck of a fast server), the same split for every backend.
t0 = time.perf_counter()
q = multiprocessing.Queue()
per = [n_runs // n_procs + (1 if k < n_runs % n_procs else 0) for k in range(n_procs)]
starts = [sum(per[:k]) for k in range(n_procs)]
procs = [multiprocessing.Process(target=log_proc, args=(start_at + starts[k], per[k], n_threads // n_procs, q)) for k in range(n_procs)]
for p in procs:
    p.start()
errors = []
for _ in procs:
    errors.extend(q.get())
for p in procs:
    p.join()
log_s = time.perf_counter() - t0


def timed(fn, reps=3):
    times = []
    out = None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def filtered():
    return len(client.search_runs([exp_id], "metrics.m0 > 0.9 and tags.i != 'x'", max_results=1000))


def list_all():
    n, token = 0, None
    while True:
        page = client.search_runs([exp_id], max_results=50000, page_token=token)
        n += len(page)
        token = page.token
        if not token:
            return n


search_s, found = timed(filtered)
list_s, listed = timed(list_all)
print(json.dumps({
    "runs": n_runs,
    "threads": n_threads,
    "processes": n_procs,
    "log_seconds": round(log_s, 3),
    "runs_per_second": round(n_runs / log_s, 1),
    "errors": len(errors),
    "first_error": errors[0] if errors else None,
    "filtered_search_ms": round(search_s * 1000, 1),
    "filtered_found": found,
    "list_all_ms": round(list_s * 1000, 1),
    "listed": listed,
}))
