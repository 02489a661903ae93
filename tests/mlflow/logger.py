"""Logs metric points to mlp's MLflow API through several servers, failing over on errors, and
prints every step a server acknowledged (`ack <step>`). Run inside a test host's network
namespace by tests/ha.rs (`ha_tracking_survives_a_leader_kill`); stdlib only.

usage: logger.py STOP_FILE ADDR [ADDR...]     (ADDR = host:port of a server's HTTP API)
       logger.py --history RUN_ID ADDR...     (prints the run's `loss` steps, one per line)
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


def call(addr, endpoint, body, timeout=3.0):
    req = urllib.request.Request(
        f"http://{addr}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def any_server(addrs, endpoint, body, deadline):
    """The first answer of any server, trying them in turn until the deadline."""
    i = 0
    while time.time() < deadline:
        try:
            return call(addrs[i % len(addrs)], endpoint, body)
        except (urllib.error.URLError, OSError, ValueError):
            i += 1
            time.sleep(0.05)
    raise SystemExit(f"no server answered {endpoint} in time")


def main():
    if sys.argv[1] == "--history":
        run_id, addrs = sys.argv[2], sys.argv[3:]
        h = any_server(addrs, "metrics/get-history", {"run_id": run_id, "metric_key": "loss", "max_results": 100000}, time.time() + 30)
        for m in h.get("metrics", []):
            print(m["step"])
        return
    stop, addrs = sys.argv[1], sys.argv[2:]
    deadline = time.time() + 120
    exp = any_server(addrs, "experiments/create", {"name": f"ha-{os.getpid()}"}, deadline)["experiment_id"]
    run = any_server(addrs, "runs/create", {"experiment_id": exp, "start_time": int(time.time() * 1000)}, deadline)
    print("run", run["run"]["info"]["run_id"], flush=True)
    step, i = 0, 0
    while not os.path.exists(stop) and time.time() < deadline:
        body = {"run_id": run["run"]["info"]["run_id"], "key": "loss", "value": 1.0 / (step + 1), "timestamp": int(time.time() * 1000), "step": step}
        try:
            call(addrs[i % len(addrs)], "runs/log-metric", body)
        except (urllib.error.URLError, OSError, ValueError):
            # Not acknowledged: the same step again, through the next server. It may have been
            # committed anyway (a duplicate point is allowed; a lost acknowledged one is not).
            i += 1
            time.sleep(0.02)
            continue
        print("ack", step, flush=True)
        step += 1
    print("done", flush=True)


main()
