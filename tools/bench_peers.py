#!/usr/bin/env python3
"""Peer comparison on CPU: base nn.Linear vs MING-MOE MoLoRA vs PEFT LoRA (PyTorch).

    python tools/bench_peers.py [--threads 1,2] [--tokens 1,4,16,64,256,1024]
                                [--shapes 4096x4096,4096x11008,11008x4096]
                                [--budget 1.5] [--json out.json]

For every thread count, shape (in x out) and token count T it times, in one process and
interleaved rep by rep (so that machine noise hits all three alike):
  base  - the frozen nn.Linear alone
  ming  - tools/ming_moe_reference.MingMoLoRALinear in eval mode (E=8, k=2, r=16,
          alpha=32, router with bias; T=1 takes MING's single-token path)
  peft  - a PEFT LoRA layer (r=16, alpha=32, dropout 0) around the same base weight
All under torch.no_grad(), float32, input shaped [1, T, in] like a decoder call.  Every
weight is random and non-zero.  Reps are chosen adaptively: at least --min-reps, at most
--max-reps, stopping when a (T, shape) cell has used --budget seconds.  Reported: median
wall time per call (ms) and the ratios median(adapted)/median(base).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ming_moe_reference import MingMoLoRALinear  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def build(in_f: int, out_f: int, E: int, k: int, r: int, alpha: float, seed: int):
    import peft

    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    base.weight.requires_grad_(False)

    ming = MingMoLoRALinear(in_f, out_f, num_experts=E, num_experts_per_token=k, r=r,
                            lora_alpha=alpha, bias=False)
    ming.weight = base.weight  # share the base weight, no copy
    with torch.no_grad():
        ming.switch.weight.copy_(torch.randn(E, in_f, generator=g) / in_f ** 0.5)
        ming.switch.bias.copy_(torch.randn(E, generator=g) * 0.1)
        for i in range(E):
            ming.A(i).weight.copy_(torch.randn(r, in_f, generator=g) / in_f ** 0.5)
            ming.B(i).weight.copy_(torch.randn(out_f, r, generator=g) / r ** 0.5)
    ming.eval()

    holder = nn.Module()
    holder.proj = base
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    pm = peft.get_peft_model(holder, cfg)
    lora_layer = pm.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(torch.randn(r, in_f, generator=g) / in_f ** 0.5)
        lora_layer.lora_B["default"].weight.copy_(torch.randn(out_f, r, generator=g) / r ** 0.5)
    assert lora_layer.base_layer is base
    pm.eval()
    return base, ming, lora_layer


def time_cell(fns: dict, x: torch.Tensor, budget: float, min_reps: int, max_reps: int):
    for fn in fns.values():  # warm-up
        fn(x)
        fn(x)
    times = {n: [] for n in fns}
    t_start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - t_start < budget):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[n].append(time.perf_counter() - t0)
        reps += 1
    return {n: statistics.median(v) for n, v in times.items()}, reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds per (shape, T) cell")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    args = ap.parse_args(argv)

    threads = [int(t) for t in args.threads.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    import peft

    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__, "peft": peft.__version__,
        "cpu": cpu_model(), "nproc": os.cpu_count(),
        "E": args.experts, "k": args.topk, "r": args.rank, "alpha": args.alpha,
        "loadavg_start": loadavg(),
    }
    print(f"# {meta['date']}  torch {meta['torch']}  peft {meta['peft']}  cpu {meta['cpu']}")
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for in_f, out_f in shapes:
            base, ming, lora_layer = build(in_f, out_f, args.experts, args.topk, args.rank, args.alpha, 1234)
            fns = {"base": base, "ming": ming, "peft": lora_layer}
            for nt in threads:
                torch.set_num_threads(nt)
                print(f"\n## {in_f} -> {out_f}, threads={nt}")
                print(f"{'T':>6} {'base ms':>10} {'ming ms':>10} {'peft ms':>10} {'ming/base':>10} {'peft/base':>10} {'reps':>5} {'load':>5}")
                for T in tokens:
                    x = torch.randn(1, T, in_f)
                    med, reps = time_cell(fns, x, args.budget, args.min_reps, args.max_reps)
                    row = {"threads": nt, "in": in_f, "out": out_f, "T": T, "reps": reps,
                           "base_ms": med["base"] * 1e3, "ming_ms": med["ming"] * 1e3, "peft_ms": med["peft"] * 1e3,
                           "ratio_ming": med["ming"] / med["base"], "ratio_peft": med["peft"] / med["base"],
                           "loadavg": loadavg()}
                    rows.append(row)
                    print(f"{T:>6} {row['base_ms']:>10.3f} {row['ming_ms']:>10.3f} {row['peft_ms']:>10.3f} "
                          f"{row['ratio_ming']:>10.3f} {row['ratio_peft']:>10.3f} {reps:>5} {row['loadavg']:>5.2f}",
                          flush=True)
            del base, ming, lora_layer, fns
    meta["loadavg_end"] = loadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_tables(rows))
        print(f"wrote {args.markdown}")
    return 0


def markdown_tables(rows) -> str:
    """One table per (shape, threads): median ms and adapted/base ratios per T."""
    out = []
    keys = sorted({(r["in"], r["out"], r["threads"]) for r in rows}, key=lambda k: (k[2], k[0], k[1]))
    for in_f, out_f, nt in keys:
        out.append(f"\n### {in_f} -> {out_f}, {nt} thread{'s' if nt > 1 else ''}\n")
        out.append("| T | base ms | MING-MOE ms | PEFT LoRA ms | MING/base | PEFT/base | reps | load avg |")
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            if (r["in"], r["out"], r["threads"]) != (in_f, out_f, nt):
                continue
            out.append(f"| {r['T']} | {r['base_ms']:.3f} | {r['ming_ms']:.3f} | {r['peft_ms']:.3f} | "
                       f"{r['ratio_ming']:.3f} | {r['ratio_peft']:.3f} | {r['reps']} | {r['loadavg']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
