#!/usr/bin/env python3
"""How long a task's supervisor takes to start, alone: a request to the zygote
(`mlp __mlp-supervise-zygote`, a fork) against a fork + exec of `mlp __mlp-supervise <config>`
(the start before the zygote), alternated, N times each. Each supervisor is given a config
that does not exist, so it reports `err ...` on its status pipe (fd 3) right after reading it:
the time is from the request (or the spawn) to that report. Run by scripts/bench-start.sh.

Usage: bench-start-spawn.py MLP_BINARY [N]
"""
import array
import os
import socket
import subprocess
import sys
import time

exe, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
# Keep fds 3.. taken, so that no pipe of ours lands on the child's fd 3 by accident.
hold = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
diag = os.open("/dev/null", os.O_WRONLY)
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
os.dup2(theirs.fileno(), 3, inheritable=True)
zygote = subprocess.Popen([exe, "__mlp-supervise-zygote"], pass_fds=[3], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, start_new_session=True)
os.dup2(diag, 3)
theirs.close()
time.sleep(0.3)
CONFIG = b"/nonexistent/supervise.json"


def report(r):
    data = os.read(r, 4096)
    os.close(r)
    if not data.startswith(b"err"):
        sys.exit(f"unexpected supervisor report {data!r}")


def via_zygote():
    r, w = os.pipe()
    t0 = time.perf_counter()
    ours.sendmsg([CONFIG], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w, diag]))])
    os.close(w)
    report(r)
    return time.perf_counter() - t0


def via_exec():
    r, w = os.pipe()
    os.dup2(w, 3, inheritable=True)
    os.close(w)
    t0 = time.perf_counter()
    p = subprocess.Popen([exe, "__mlp-supervise", CONFIG.decode()], pass_fds=[3], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=diag, start_new_session=True)
    os.dup2(diag, 3)
    report(r)
    t = time.perf_counter() - t0
    p.wait()
    return t


zs, es = [], []
for _ in range(n):
    zs.append(via_zygote())
    es.append(via_exec())
ours.close()
zygote.wait(5)
for name, v in [("supervisor start, zygote fork", zs), ("supervisor start, fork + exec of mlp", es)]:
    v.sort()
    print(f"| {name} | {v[len(v) // 2] * 1e3:.2f} / {v[min(len(v) - 1, round((len(v) - 1) * .99))] * 1e3:.2f} |")
