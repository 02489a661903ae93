#!/usr/bin/env python3
"""Turns the JSON of scripts/bench-sim.sh into the markdown table of docs/benchmarks.md and one
SVG plot per trace (GPU allocation vs arrived GPU demand, every policy), written by hand so that
no plotting library is needed. Runs of `mlp sim --online` carry "workload": "online" (the server's
learned workload) next to "foresight" (the trace's whole pod mix); both get a column.

Usage: scripts/bench-sim-report.py OUT_DIR   (reads OUT_DIR/<trace>.json, writes OUT_DIR/<trace>.svg)
"""
import json
import os
import sys

TRACES = ["default", "cpu050", "gpushare40", "multigpu20", "gpuspec10"]
POLICIES = ["best-fit", "gpu-packing", "fgd", "mlp"]
# Columns: (policy, workload rule); the online rule only for the workload-aware policies.
COLUMNS = [("best-fit", "foresight"), ("gpu-packing", "foresight"), ("fgd", "foresight"), ("fgd", "online"),
           ("mlp", "foresight"), ("mlp", "online")]
# The paper's FGD at 130% (DESIGN.md), for the last column.
FGD_PAPER = {"default": 95.39, "cpu050": 95.21, "gpushare40": 94.15, "multigpu20": 95.65, "gpuspec10": 94.95}
COLORS = {"best-fit": "#888888", "gpu-packing": "#d08a00", "fgd": "#1f77b4", "mlp": "#c0392b",
          "fgd online": "#7fb3d9", "mlp online": "#e59a90"}


def label(r):
    return r["policy"] + (" online" if r.get("workload") == "online" else "")


def svg(trace, reports):
    w, h, left, bottom, top, right = 640, 400, 60, 50, 30, 120
    x0, x1, y0, y1 = 0.0, 130.0, 50.0, 100.0
    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)
    def py(y):
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">openb {trace}: GPU allocation vs arrived GPU demand (mean of seeds)</text>']
    for x in range(0, 131, 10):
        out.append(f'<line x1="{px(x)}" y1="{py(y0)}" x2="{px(x)}" y2="{py(y1)}" stroke="#eee"/>')
        out.append(f'<text x="{px(x)}" y="{py(y0) + 16}" text-anchor="middle">{x}</text>')
    for y in range(50, 101, 10):
        out.append(f'<line x1="{px(x0)}" y1="{py(y)}" x2="{px(x1)}" y2="{py(y)}" stroke="#eee"/>')
        out.append(f'<text x="{px(x0) - 6}" y="{py(y) + 4}" text-anchor="end">{y}</text>')
    out.append(f'<text x="{px(65)}" y="{h - 12}" text-anchor="middle">arrived GPU demand (% of cluster GPUs)</text>')
    out.append(f'<text x="14" y="{py(75)}" transform="rotate(-90 14 {py(75)})" text-anchor="middle">GPU allocation (%)</text>')
    for i, r in enumerate(reports):
        pol = label(r)
        pts = " ".join(f"{px(k):.1f},{py(max(v, y0)):.1f}" for k, v in enumerate(r["curve"]))
        out.append(f'<polyline fill="none" stroke="{COLORS.get(pol, "black")}" stroke-width="1.5" points="{pts}"/>')
        ly = top + 20 + 18 * i
        out.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 30}" y2="{ly}" stroke="{COLORS.get(pol, "black")}" stroke-width="2"/>')
        out.append(f'<text x="{w - right + 35}" y="{ly + 4}">{pol}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "target/bench-sim"
    print("| trace | " + " | ".join(p + ("" if w == "foresight" else " (online)") for p, w in COLUMNS)
          + " | FGD (paper) @130% | mlp online − foresight @130% | mlp online placements/s |")
    print("|---|" + "---|" * (len(COLUMNS) + 3))
    for trace in TRACES:
        path = os.path.join(out_dir, f"{trace}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            reports = json.load(f)
        if isinstance(reports, dict):
            reports = [reports]
        by = {(r["policy"], r.get("workload", "foresight")): r for r in reports}
        cells = []
        for key in COLUMNS:
            r = by.get(key)
            cells.append(f'{r["alloc_ratio_100"]:.2f} / {r["alloc_ratio_130"]:.2f}' if r else "–")
        on, fs = by.get(("mlp", "online")), by.get(("mlp", "foresight"))
        delta = f'{on["alloc_ratio_130"] - fs["alloc_ratio_130"]:+.2f}' if on and fs else "–"
        pps = on["placements_per_sec"] if on else 0
        print(f"| {trace} | " + " | ".join(cells) + f" | {FGD_PAPER[trace]:.2f} | {delta} | {pps:,.0f} |")
        with open(os.path.join(out_dir, f"{trace}.svg"), "w") as f:
            f.write(svg(trace, reports))


if __name__ == "__main__":
    main()
