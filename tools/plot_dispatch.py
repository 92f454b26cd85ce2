#!/usr/bin/env python3
"""Plot a molora_dispatch_bench CSV sweep.

    molora_dispatch_bench --T 1,4,16,64,256 --adapters 4,16,64 \
        --popularity identical,distinct,uniform,skewed --csv sweep.csv
    python tools/plot_dispatch.py sweep.csv [-o dispatch.png]

Two panels against T (log scale), one line per (popularity, adapters, E, r): the adapted
layer's time over its base layer's (adapted_over_base), and the set's time over the
adapter-only loop's (set_over_loop; below 1 = the set is faster). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="CSV written by molora_dispatch_bench --csv")
    ap.add_argument("-o", "--output", default="dispatch.png", help="image to write (default dispatch.png)")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_dispatch.py: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2

    series: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["popularity"], int(row["adapters"]), int(row["E"]), int(row["r"]), row["router"])
            series[key].append((int(row["T"]), float(row["adapted_over_base"]), float(row["set_over_loop"])))
    if not series:
        print(f"plot_dispatch.py: no rows in {args.csv}", file=sys.stderr)
        return 1

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted(series):
        pts = sorted(series[key])
        pop, n, e, r, router = key
        label = f"{pop}, {n} adapters, E={e}, r={r}" + ("" if router == "own" else f", router {router}")
        ts = [p[0] for p in pts]
        ax1.plot(ts, [p[1] for p in pts], marker="o", label=label)
        if any(p[2] > 0 for p in pts):
            ax2.plot(ts, [p[2] for p in pts], marker="o", label=label)
    ax1.set(xscale="log", xlabel="tokens T", ylabel="adapted / base", title="adapter set over its base layer")
    ax2.set(xscale="log", xlabel="tokens T", ylabel="set / adapter-only loop", title="set over the per-adapter loop")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
