#!/usr/bin/env python3
"""Plot a molora_dispatch_bench CSV sweep.

    molora_dispatch_bench --T 1,4,16,64,256 --adapters 4,16,64 \
        --popularity identical,distinct,uniform,skewed --csv sweep.csv
    python tools/plot_dispatch.py sweep.csv [more.csv ...] [-o dispatch.png]

One row of panels per adapter kind (E, r), three panels against T (log scale), one line per
(popularity, adapters): the adapted layer's time over its base layer's (adapted_over_base,
warm); the set's part alone over the adapter-only loop's part (set_delta_over_loop_delta;
solid warm, dashed cold; below 1 = the set is faster); and the set's part alone against one
read of the routed adapters' bytes, caches cold (delta_over_read, log scale).
Cells a strategy did not time (empty in the CSV) are left out. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def number(row: dict, key: str) -> float | None:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="CSV files written by molora_dispatch_bench --csv")
    ap.add_argument("-o", "--output", default="dispatch.png", help="image to write (default dispatch.png)")
    ap.add_argument("--dpi", type=int, default=90, help="resolution (default 90)")
    ap.add_argument("--colors", type=int, default=64,
                    help="a PNG is saved with this many palette colours when Pillow is present, "
                         "about 4x smaller (0 = full colour; default 64)")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_dispatch.py: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2

    # kind (E, r) -> series (popularity, adapters, router) -> [(T, row)]
    kinds: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for path in args.csv:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                pop = row["popularity"]
                n = "T" if pop == "distinct" and row["adapters"] == row["T"] else row["adapters"]
                kinds[(int(row["E"]), int(row["r"]))][(pop, n, row["router"])].append((int(row["T"]), row))
    if not kinds:
        print(f"plot_dispatch.py: no rows in {', '.join(args.csv)}", file=sys.stderr)
        return 1

    panels = [
        ("adapted_over_base", None, "adapted / base (warm)", None),
        ("set_delta_over_loop_delta", "set_delta_over_loop_delta_cold", "set part / loop part", 1.0),
        ("delta_over_read", None, "set part / read, cold", 1.2),
    ]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 4.2 * len(kinds)), squeeze=False)
    for ax_row, kind in zip(axes, sorted(kinds)):
        e, r = kind
        what = f"plain LoRA r={r}" if e == 1 else f"MoLoRA E={e} r={r}"
        for i, key in enumerate(sorted(kinds[kind], key=lambda k: (k[0], str(k[1]).zfill(4)))):
            color = f"C{i % 10}"
            pts = sorted(kinds[kind][key], key=lambda p: p[0])
            pop, n, router = key
            label = f"{pop}, {n} adapters" + ("" if router == "own" else f", router {router}")
            for ax, (warm, cold, _, _) in zip(ax_row, panels):
                for field, style in ((warm, "-"), (cold, "--")):
                    if field is None:
                        continue
                    xy = [(t, number(row, field)) for t, row in pts if number(row, field) is not None]
                    if xy:
                        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", ms=3, ls=style, color=color,
                                label=label if style == "-" else None)
        for ax, (_, _, title, target) in zip(ax_row, panels):
            ax.set(xscale="log", xlabel="tokens T", title=f"{what}: {title}")
            ax.set_xticks([1, 4, 16, 64, 256], ["1", "4", "16", "64", "256"])
            if target is not None:
                ax.axhline(target, color="grey", lw=0.8, ls=":")
            ax.grid(True, which="both", alpha=0.3)
        ax_row[2].set_yscale("log")
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=args.dpi)
    if args.colors > 0 and args.output.lower().endswith(".png"):
        try:
            from PIL import Image

            Image.open(args.output).convert("RGB").quantize(colors=args.colors).save(args.output, optimize=True)
        except ImportError:
            pass
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
