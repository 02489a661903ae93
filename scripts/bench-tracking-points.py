"""Logs metric points to an MLflow API (mlp's) with raw HTTP, stdlib only, for
scripts/bench-tracking-points.sh.

usage: bench-tracking-points.py URI log RUN_ID FIRST_STEP N_POINTS THREADS
           logs N_POINTS points of key `m` to RUN_ID, log-batch of 1,000 (MLflow's limit), from
           THREADS threads; prints `logged <points> <seconds> <points/s>`
       bench-tracking-points.py URI history RUN_ID KEY REPS
           prints `history <points> <median ms>` of metrics/get-history (whole answer read and
           parsed as JSON), the median of REPS calls
"""

import json
import statistics
import sys
import threading
import time
import urllib.request


def call(uri, endpoint, body, method="POST"):
    data = json.dumps(body).encode() if method == "POST" else None
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if method == "GET":
        url += "?" + "&".join(f"{k}={v}" for k, v in body.items())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")


def log(uri, run_id, first, n, threads):
    batches = [(s, min(1000, first + n - s)) for s in range(first, first + n, 1000)]
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if not batches or errors:
                    return
                start, count = batches.pop()
            metrics = [{"key": "m", "value": (s % 997) / 997.0, "timestamp": 1_700_000_000_000 + s, "step": s} for s in range(start, start + count)]
            try:
                call(uri, "runs/log-batch", {"run_id": run_id, "metrics": metrics})
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"log-batch failed: {errors[0]}")
    print(f"logged {n} {dt:.2f} {n / dt:.0f}")


def history(uri, run_id, key, reps):
    times = []
    n = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        v = call(uri, "metrics/get-history", {"run_id": run_id, "metric_key": key, "max_results": 25000}, method="GET")
        times.append((time.perf_counter() - t0) * 1000)
        n = len(v.get("metrics", []))
    print(f"history {n} {statistics.median(times):.1f}")


def main():
    uri, what = sys.argv[1], sys.argv[2]
    if what == "log":
        log(uri, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif what == "history":
        history(uri, sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
