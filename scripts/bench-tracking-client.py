"""The client side of scripts/bench-tracking.sh: the same MLflow client code against any
tracking server (MLflow's own or mlp's), so the two are compared doing the same work.

usage: bench-tracking-client.py URI EXPERIMENT RUNS THREADS [PROCS [FIRST [CLIENT]]]
Prints one JSON object: runs logged per second (create + log-batch of 10 metrics + terminate,
THREADS client threads in PROCS processes, default 4), the median time of a filtered
search_runs and of listing every run of the experiment. FIRST numbers the runs (tag `i`).

CLIENT `mlflow` (the default) does it all through MLflow's own `MlflowClient`. CLIENT `raw`
sends the same REST requests (the bodies `MlflowClient` sends, over one keep-alive HTTP
connection per thread) and reads every answer with `json.loads`, without MlflowClient's
protobuf and entity conversion: on two cores the Python client's own CPU bounds what the
first mode can show of a fast server, and `raw` is the same work with a lighter client.
"""

import http.client
import json
import multiprocessing
import statistics
import sys
import threading
import time
import urllib.parse

from mlflow import MlflowClient
from mlflow.entities import Metric

uri, exp_name, n_runs, n_threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
n_procs = int(sys.argv[5]) if len(sys.argv) > 5 else 4
start_at = int(sys.argv[6]) if len(sys.argv) > 6 else 0
mode = sys.argv[7] if len(sys.argv) > 7 else "mlflow"
if mode not in ("mlflow", "raw"):
    raise SystemExit(f"CLIENT must be mlflow or raw, not {mode!r}")
client = MlflowClient(uri)
exp = client.get_experiment_by_name(exp_name)
exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)


class Raw:
    """MLflow's REST API over one keep-alive connection: the requests MlflowClient sends."""

    def __init__(self):
        u = urllib.parse.urlparse(uri)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)

    def call(self, path, body):
        data = json.dumps(body).encode()
        self.conn.request("POST", "/api/2.0/mlflow/" + path, body=data, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        out = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {out[:300]!r}")
        return json.loads(out)

    def log_run(self, i):
        now = int(time.time() * 1000)
        run = self.call("runs/create", {"experiment_id": exp_id, "start_time": now, "tags": [{"key": "i", "value": str(i)}]})
        run_id = run["run"]["info"]["run_id"]
        ts = int(time.time() * 1000)
        metrics = [{"key": f"m{j}", "value": ((i * 7 + j) % 100) / 100.0, "timestamp": ts, "step": 0} for j in range(10)]
        self.call("runs/log-batch", {"run_id": run_id, "metrics": metrics, "params": [], "tags": []})
        self.call("runs/update", {"run_id": run_id, "run_uuid": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})

    def search(self, filter_string, max_results, page_token=None):
        body = {"experiment_ids": [exp_id], "filter": filter_string, "max_results": max_results, "run_view_type": "ACTIVE_ONLY"}
        if page_token:
            body["page_token"] = page_token
        out = self.call("runs/search", body)
        return out.get("runs", []), out.get("next_page_token")

def log_runs(first, count, n_threads, errors):
    """Logs runs first..first+count with n_threads threads; appends errors to `errors`."""
    state = {"next": first}
    lock = threading.Lock()

    def worker():
        c = MlflowClient(uri) if mode == "mlflow" else Raw()
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= first + count:
                return
            try:
                if mode == "raw":
                    c.log_run(i)
                    continue
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


FILTER = "metrics.m0 > 0.9 and tags.i != 'x'"


def filtered():
    if mode == "raw":
        return len(Raw().search(FILTER, 1000)[0])
    return len(client.search_runs([exp_id], FILTER, max_results=1000))


def list_all():
    n, token = 0, None
    if mode == "raw":
        raw = Raw()
        while True:
            runs, token = raw.search("", 50000, token)
            n += len(runs)
            if not token:
                return n
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
    "client": mode,
    "log_seconds": round(log_s, 3),
    "runs_per_second": round(n_runs / log_s, 1),
    "errors": len(errors),
    "first_error": errors[0] if errors else None,
    "filtered_search_ms": round(search_s * 1000, 1),
    "filtered_found": found,
    "list_all_ms": round(list_s * 1000, 1),
    "listed": listed,
}))
