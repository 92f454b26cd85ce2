"""Run bench/bench_qwen2 and tools/bench_qwen2_peers.py back to back, in turns, and tabulate.

Each round runs, for every weight type, the C++ benchmark and the PyTorch one (the order
alternates from round to round, so a slow spell of a shared machine hits both), each
invocation alone under an exclusive flock (builds hold the same lock shared) and killed
after --timeout seconds. The raw outputs (Google Benchmark JSON, the peer script's JSON,
`uptime` before and after each) go to --out; the summary is computed from them, so it can
be printed again, or for older runs, with --summary-only.

    cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DMOLORA_NATIVE=ON -DMOLORA_OPENMP=ON
    cmake --build build-bench --target bench_qwen2 -j2
    python tools/run_qwen2_peers.py [--rounds 3] [--dtypes f32,bf16] [--out /tmp/qwen2_peers]

The summary gives tokens/s as medians over the rounds (wall time, and CPU time of the
whole process), the ratios the targets ask for computed round by round (each from one
round's runs) with their median and range, and each target met or missed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CPP_FILTER = {
    "f32": r"BM_fma_peak|BM_prefill_projections/bf16:0/|BM_prefill/adapter:./bf16:0/|BM_decode/adapter:./bf16:0/"
           r"|BM_read_bound/bf16:0/",
    "bf16": r"BM_fma_peak|BM_prefill_projections/bf16:1/|BM_prefill/adapter:./bf16:1/|BM_decode/adapter:./bf16:1/"
            r"|BM_read_bound/bf16:1/",
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(cmd, lock: str, timeout: int, log) -> bool:
    full = (["flock", "-x", lock] if lock else []) + ["timeout", str(timeout)] + cmd
    log.write(f"$ {' '.join(full)}\n  before: {uptime()}\n")
    t0 = time.time()
    p = subprocess.run(full, capture_output=True, text=True)
    log.write(f"  after:  {uptime()}  ({time.time() - t0:.0f} s with the wait for the lock), exit {p.returncode}\n")
    log.write(p.stdout[-4000:] + p.stderr[-2000:] + "\n")
    log.flush()
    if p.returncode != 0:
        print(f"  failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-1500:]}", file=sys.stderr)
    return p.returncode == 0


def measure(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.txt"), "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {machine_name()}\n")
        for r in range(args.rounds):
            for dtype in args.dtypes.split(","):
                cpp = [args.bench, f"--benchmark_filter={CPP_FILTER[dtype]}",
                       f"--benchmark_out={args.out}/cpp_{dtype}_r{r}.json", "--benchmark_out_format=json"]
                py = [args.python, os.path.join(HERE, "bench_qwen2_peers.py"), "--dtype", dtype, "--threads",
                      args.threads, "--reps", str(args.reps), "--json", f"{args.out}/py_{dtype}_r{r}.json"]
                for cmd in ([cpp, py] if r % 2 == 0 else [py, cpp]):
                    print(f"round {r + 1}/{args.rounds}, {dtype}: {os.path.basename(cmd[0])} {cmd[1]}", flush=True)
                    run(cmd, args.lock, args.timeout, log)


def machine_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "?"


# ---- summary -------------------------------------------------------------------------------


def read_json(path: str):
    """The file's JSON, or None (with a note) for a run that was cut short."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"skipped {path}: {e}", file=sys.stderr)
        return None


def load(out: str):
    """{round: {key: (wall_s, cpu_s, extra)}}, key = (impl, dtype, adapter, threads, phase, batch):
    seconds per call (a prefill, a decode step, a read of the weights)."""
    rounds: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "cpp_*_r*.json"))):
        r = int(re.search(r"_r(\d+)\.json$", path).group(1))
        dtype = "bf16" if "cpp_bf16" in path else "f32"
        data = read_json(path)
        if data is None:
            continue
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
        for b in data["benchmarks"]:
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            name = b["name"]
            args = dict((k, int(v)) for k, v in re.findall(r"(\w+):(\d+)", name) if k != "iterations")
            unit = scale[b.get("time_unit", "ns")]
            t = args.get("threads", 1)
            wall, cpu = b["real_time"] * unit, b["cpu_time"] * unit
            if name.startswith("BM_prefill_projections"):
                key = ("molora", dtype, 0, t, "projections", 128)
                rounds.setdefault(r, {})[key] = (wall, cpu, {k: b[k] for k in ("GFLOP/s", "peak_GFLOP/s", "of_peak")})
            elif name.startswith("BM_prefill"):
                key = ("molora", dtype, args["adapter"], t, "prefill", 1)
                rounds.setdefault(r, {})[key] = (wall, cpu, {"GFLOP/s": b.get("GFLOP/s")})
            elif name.startswith("BM_decode"):
                key = ("molora", dtype, args["adapter"], t, "decode", args["batch"])
                rounds.setdefault(r, {})[key] = (wall, cpu, {k: b[k] for k in ("over_read_bound", "read_GB/s") if k in b})
            elif name.startswith("BM_read_bound"):
                key = ("molora", dtype, 0, t, "read", 1)
                rounds.setdefault(r, {})[key] = (wall, cpu, {k: b[k] for k in ("GB/s", "MB", "adapted_MB")})
            elif name.startswith("BM_fma_peak"):
                rounds.setdefault(r, {})[("molora", dtype, 0, t, "fma_peak", 1)] = (wall, cpu, {"GFLOP/s": b["GFLOP/s"]})
    for path in sorted(glob.glob(os.path.join(out, "py_*_r*.json"))):
        r = int(re.search(r"_r(\d+)\.json$", path).group(1))
        data = read_json(path)
        for x in (data or {}).get("results", []):
            key = ("pytorch", x["dtype"], x["adapter"], x["threads"], x["phase"], x["batch"])
            rounds.setdefault(r, {})[key] = (x["wall_ms"] / 1e3, x["cpu_ms"] / 1e3, {})
    return rounds


TOKENS = {"prefill": 128}


def tokens_of(key) -> int:
    return TOKENS.get(key[4], key[5])


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def span(values, pct: bool = False):
    """median (min to max); as signed percentages with pct."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    f = (lambda v: f"{v * 100:+.1f} %") if pct else (lambda v: f"{v:.2f}")
    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.median(values))} ({f(min(values))} to {f(max(values))})"


def summary(out: str) -> str:
    rounds = load(out)
    if not rounds:
        return f"no results in {out}"
    lines = []
    keys = sorted({k for d in rounds.values() for k in d})
    dtypes = [d for d in ("f32", "bf16") if any(k[1] == d for k in keys)]
    threads = sorted({k[3] for k in keys})

    def per_round(key, i=0):
        return [d[key][i] if key in d else None for _, d in sorted(rounds.items())]

    def rate(key, i=0):  # median tokens/s over the rounds (i = 0 wall, 1 CPU)
        m = med(per_round(key, i))
        return tokens_of(key) / m if m else None

    def fmt(v, digits=1):
        return "n/a" if v is None else f"{v:.{digits}f}"

    def ratios(num, den, invert=False):  # time(num) / time(den) round by round (tokens/s ratio if invert)
        out_ = []
        for _, d in sorted(rounds.items()):
            if num in d and den in d:
                a = d[num][0] / tokens_of(num)
                b = d[den][0] / tokens_of(den)
                out_.append(b / a if invert else a / b)
        return out_

    lines.append(f"rounds: {len(rounds)}; tokens/s from the median wall time (CPU time of the whole process in "
                 "parentheses, as tokens per CPU-second)")
    lines.append("")
    lines.append("| weights | threads | phase | molora plain | molora + MING-MOE | adapter cost | PyTorch plain | "
                 "PyTorch + MING | molora / PyTorch (adapted) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for dt in dtypes:
        for t in threads:
            for phase, batch in (("prefill", 1), ("decode", 1), ("decode", 4)):
                k = lambda impl, a: (impl, dt, a, t, phase, batch)  # noqa: E731
                if not any(k(i, a) in keys for i in ("molora", "pytorch") for a in (0, 1)):
                    continue
                cells = []
                for impl, a in (("molora", 0), ("molora", 1)):
                    cells.append(f"{fmt(rate(k(impl, a)))} ({fmt(rate(k(impl, a), 1))})")
                cost = ratios(k("molora", 1), k("molora", 0))
                cells.append(span([c - 1 for c in cost], pct=True))
                for impl, a in (("pytorch", 0), ("pytorch", 1)):
                    cells.append(f"{fmt(rate(k(impl, a)))} ({fmt(rate(k(impl, a), 1))})")
                cells.append(span(ratios(k("molora", 1), k("pytorch", 1), invert=True)))
                what = "prefill 128" if phase == "prefill" else f"decode b{batch}"
                lines.append(f"| {dt} | {t} | {what} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("adapter cost: adapted time / plain time - 1 (wall), round by round, median (min to max); "
                 "molora / PyTorch: tokens/s ratio of the adapted models, round by round")
    lines.append("")

    # Targets
    lines.append("Targets (ratios from one round's runs; median (min to max) over the rounds):")
    for dt in dtypes:
        for t in threads:
            rb = ("molora", dt, 0, t, "read", 1)
            dec = ("molora", dt, 1, t, "decode", 1)
            if dec not in keys:
                continue
            paired = [d[dec][2].get("over_read_bound") for _, d in sorted(rounds.items()) if dec in d]
            gbs = [d[dec][2].get("read_GB/s") for _, d in sorted(rounds.items()) if dec in d]
            lines.append(f"- {dt}, {t} thread(s): decode b1 adapted / cold read of its bytes, paired step by step = "
                         f"{span(paired)} (target <= 1.15; read at {span(gbs)} GB/s)  -> "
                         f"{verdict(paired, lambda v: v <= 1.15)}")
            vals = []
            for _, d in sorted(rounds.items()):
                if dec in d and rb in d:
                    extra = d[rb][2]
                    bound = d[rb][0] * extra["adapted_MB"] / extra["MB"]  # the same bandwidth over the adapted bytes
                    vals.append(d[dec][0] / bound)
            lines.append(f"  the same against BM_read_bound (flushed caches, run apart) = {span(vals)}")
            vs = ratios(("molora", dt, 1, t, "decode", 1), ("pytorch", dt, 1, t, "decode", 1), invert=True)
            lines.append(f"  decode b1 adapted, molora / PyTorch tokens/s = {span(vs)} (target >= 1)  -> "
                         f"{verdict(vs, lambda v: v >= 1)}")
            vs = ratios(("molora", dt, 1, t, "decode", 4), ("pytorch", dt, 1, t, "decode", 4), invert=True)
            lines.append(f"  decode b4 adapted, molora / PyTorch tokens/s = {span(vs)} (target >= 1.5 at one thread)"
                         f"  -> {verdict(vs, lambda v: v >= 1.5)}")
            for b, lim in ((1, 0.05), (4, 0.10)):
                vs = [c - 1 for c in ratios(("molora", dt, 1, t, "decode", b), ("molora", dt, 0, t, "decode", b))]
                lines.append(f"  adapter cost at decode b{b} = {span(vs, pct=True)} (target <= +{lim * 100:.0f} %)  -> "
                             f"{verdict(vs, lambda v, lim=lim: v <= lim)}")
            pk = []
            for _, d in sorted(rounds.items()):
                p = d.get(("molora", dt, 0, t, "projections", 128))
                if p:
                    pk.append(p[2]["of_peak"])
            peak = [d[("molora", dt, 0, t, "projections", 128)][2]["peak_GFLOP/s"] for _, d in sorted(rounds.items())
                    if ("molora", dt, 0, t, "projections", 128) in d]
            gf = [d[("molora", dt, 0, t, "projections", 128)][2]["GFLOP/s"] for _, d in sorted(rounds.items())
                  if ("molora", dt, 0, t, "projections", 128) in d]
            lines.append(f"  prefill projections: {span(gf)} GFLOP/s of an FMA peak of {span(peak)}: "
                         f"{span(pk)} (target >= 0.60)  -> {verdict(pk, lambda v: v >= 0.6)}")
            vs = ratios(("molora", dt, 1, t, "prefill", 1), ("pytorch", dt, 1, t, "prefill", 1), invert=True)
            vp = ratios(("molora", dt, 0, t, "prefill", 1), ("pytorch", dt, 0, t, "prefill", 1), invert=True)
            lines.append(f"  prefill molora / PyTorch tokens/s: adapted {span(vs)}, plain {span(vp)}")
    return "\n".join(lines)


def verdict(values, ok) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not measured"
    m = statistics.median(values)
    every = all(ok(v) for v in values)
    return "met" + ("" if every else " (median; not in every round)") if ok(m) else "missed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--threads", default="1,2", help="thread counts of the PyTorch runs (the C++ bench runs 1 and 2 "
                                                     "in an OpenMP build)")
    ap.add_argument("--reps", type=int, default=5, help="the peer script's --reps")
    ap.add_argument("--bench", default=os.path.join(ROOT, "build-bench", "bench", "bench_qwen2"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--lock", default="/tmp/molora-cpu.lock", help="flock file ('' for none)")
    ap.add_argument("--timeout", type=int, default=290, help="seconds per invocation")
    ap.add_argument("--out", default="/tmp/qwen2_peers")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    if not args.summary_only:
        if not os.access(args.bench, os.X_OK):
            sys.exit(f"{args.bench}: not built (see the commands at the top of this script)")
        measure(args)
    text = summary(args.out)
    print(text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
