#!/usr/bin/env python3
"""Time two builds of one Google Benchmark program alternately and compare them.

    python tools/compare_builds.py OLD_BINARY NEW_BINARY --filter REGEX [--rounds 5]
                                   [--counter ratio] [--json out.json] [--each] [--time cpu]
                                   [--extra=--benchmark_min_time=0.5 ...]

Runs OLD, NEW, OLD, NEW, ... (--rounds pairs, the order swapped every round so that neither
build always runs first), each with --benchmark_filter and JSON output, and reports per
benchmark the median real time of each build, new/old, and the median of any counter named
by --counter (e.g. ratio = adapted/base, GFLOPs). On a shared machine alternating the two in
one loop is what makes their ratio mean something; the spread of new/old across rounds is
printed with it.

--each runs every benchmark the filter selects in its own pair of processes (OLD then NEW for
benchmark 1, NEW then OLD for benchmark 2, ...), so the two times of a pair are seconds apart
rather than a whole program run; the report then adds the median of the per-round ratios,
which a drifting machine moves less than the ratio of the medians. --time cpu compares CPU
time instead of wall time (steadier when other processes share the cores).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile


def run(binary: str, filt: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([binary, f"--benchmark_filter={filt}", f"--benchmark_out={f.name}",
                        "--benchmark_out_format=json", *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = json.load(open(f.name))
    out = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate":
            continue
        out.setdefault(b["name"], []).append(b)
    return out


def names(binary: str, filt: str) -> list[str]:
    out = subprocess.run([binary, f"--benchmark_filter={filt}", "--benchmark_list_tests=true"],
                         check=True, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--filter", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--counter", action="append", default=[])
    ap.add_argument("--json")
    ap.add_argument("--each", action="store_true", help="one process pair per benchmark per round")
    ap.add_argument("--time", choices=("real", "cpu"), default="real")
    ap.add_argument("--extra", action="append", default=[],
                    help="a flag passed to both programs, e.g. --extra=--benchmark_min_time=0.5")
    a = ap.parse_args(argv)
    key = f"{a.time}_time"
    filters = [f"^{re.escape(n)}$" for n in names(a.old, a.filter)] if a.each else [a.filter]
    times = {"old": {}, "new": {}}
    counters = {"old": {}, "new": {}}
    per_round = {}
    for r in range(a.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        got = {"old": {}, "new": {}}
        for i, filt in enumerate(filters):
            for which in (order if i % 2 == 0 else order[::-1]):
                res = run(getattr(a, which), filt, a.extra)
                got[which].update(res)
                for name, runs in res.items():
                    for b in runs:
                        times[which].setdefault(name, []).append(b[key])
                        for c in a.counter:
                            if c in b:
                                counters[which].setdefault((name, c), []).append(b[c])
        for name in got["old"]:
            if name in got["new"]:
                o = statistics.median(b[key] for b in got["old"][name])
                n = statistics.median(b[key] for b in got["new"][name])
                per_round.setdefault(name, []).append(n / o)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    rows = []
    print(f"{'benchmark':60} {'old':>10} {'new':>10} {'new/old':>8} {'med ratio':>9} {'min..max':>13}" +
          "".join(f" {c + ' old':>11} {c + ' new':>11}" for c in a.counter))
    for name in times["old"]:
        if name not in times["new"]:
            continue
        o, n = statistics.median(times["old"][name]), statistics.median(times["new"][name])
        pr = per_round.get(name, [n / o])
        mr = statistics.median(pr)
        row = {"name": name, "old": o, "new": n, "new_over_old": n / o, "median_round_ratio": mr,
               "round_min": min(pr), "round_max": max(pr)}
        line = f"{name:60} {o:>10.4g} {n:>10.4g} {n / o:>8.3f} {mr:>9.3f} {min(pr):>6.3f}..{max(pr):<6.3f}"
        for c in a.counter:
            co, cn = counters["old"].get((name, c)), counters["new"].get((name, c))
            if co and cn:
                row[c] = (statistics.median(co), statistics.median(cn))
                line += f" {statistics.median(co):>11.4g} {statistics.median(cn):>11.4g}"
            else:
                line += f" {'':>11} {'':>11}"
        rows.append(row)
        print(line)
    if a.json:
        json.dump({"old": a.old, "new": a.new, "filter": a.filter, "rounds": a.rounds, "each": a.each,
                   "time": a.time, "rows": rows},
                  open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
