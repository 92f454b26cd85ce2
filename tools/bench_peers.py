#!/usr/bin/env python3
"""Peer comparison on CPU: base nn.Linear vs MING-MOE MoLoRA vs PEFT LoRA (PyTorch).

    python tools/bench_peers.py [--threads 1,2] [--tokens 1,4,16,64,256,1024]
                                [--shapes 4096x4096,4096x11008,11008x4096]
                                [--budget 1.5] [--json out.json]
                                [--molora BUILD_DIR/python] [--peers base,ming,peft,molora]
                                [--dtypes f32,bf16] [--bf16-dot]

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

With --molora DIR (the folder holding the molora_py module: cmake -DMOLORA_PYTHON=ON
-DMOLORA_OPENMP=ON, see docs/peers.md) a fourth variant runs in the same loop:
  molora - molora's MoLoRALinear<float> over the same arrays (base weight wrapped in place,
           router and experts copied from the MING layer), x and y numpy views of torch
           tensors, the GIL released during the call
and every cell first checks that molora's output equals the MING layer's within 1e-5 of
the output's largest magnitude (the script stops otherwise). Both OpenMP runtimes (torch's
and molora's) are told OMP_WAIT_POLICY=passive so they do not spin against each other.
With --bf16-dot, molora's bf16 layer runs in its opt-in bf16-dot mode (set_bf16_dot: x rounded
to bf16, AVX512_BF16 dot products, PyTorch's bf16 numerics); the output check keeps the bf16
tolerance, and the tables say "bf16-dot".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch or molora_py load OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

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


def molora_layer(mod, ming, base, in_f: int, out_f: int, E: int, k: int, r: int, alpha: float,
                 bf16_dot: bool = False):
    """molora's layer holding the MING layer's weights (base wrapped in place, no copy).

    A bf16 MING layer gives MoLoRALinearBF16: the base's bf16 bits wrapped in place, the
    router widened to float (exactly: every bf16 value is a float), the experts as they are;
    bf16_dot turns on its bf16-dot mode."""
    half = base.weight.dtype == torch.bfloat16
    cls = mod.MoLoRALinearBF16 if half else mod.MoLoRALinear
    layer = cls(in_f, out_f, num_experts=E, top_k=k, rank=r, lora_alpha=alpha, router_bias=True)
    if half:
        layer.wrap_base_weight(base.weight.detach().view(torch.int16).numpy().view(np.uint16))
        if bf16_dot:
            layer.set_bf16_dot(True)
    else:
        layer.wrap_base_weight(base.weight.detach().numpy())

    def f32(t):
        return t.detach().float().contiguous().numpy()
    layer.set_router(f32(ming.switch.weight), f32(ming.switch.bias))
    for i in range(E):
        layer.set_expert(i, f32(ming.A(i).weight), f32(ming.B(i).weight))
    return layer


def to_bf16(base, ming):
    """bf16 copies of the base and the MING layer as MING-MOE runs in bf16: the base weight
    (shared) and the router in bf16; the experts stay float32 (MING's layer casts x to float32
    for them and casts their sum back)."""
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    ming16 = copy.deepcopy(ming)
    ming16.weight = base16.weight
    ming16.switch.to(torch.bfloat16)
    return base16, ming16


def bf16_input(module):
    """Calls module on a bf16 copy of x, made once per x (outside the timed call after warm-up)."""
    cache = {}

    def call(x: torch.Tensor):
        key = id(x)
        if key not in cache:
            cache.clear()
            cache[key] = (x, x.to(torch.bfloat16))
        return module(cache[key][1])
    return call


def molora_call(layer, out_f: int):
    """A callable like an nn.Module's: y = layer(x) into a buffer kept per token count."""
    bufs = {}

    def call(x: torch.Tensor):
        key = tuple(x.shape)
        if key not in bufs:
            bufs[key] = np.empty(key[:-1] + (out_f,), dtype=np.float32)
        return layer.forward(x.numpy(), out=bufs[key])
    return call


# molora against the MING layer, relative to the output's largest magnitude. f32: the same
# products in another order. bf16: PyTorch keeps bf16 activations (x, h, each output rounded
# to 8 significant bits, 2^-9 relative each), molora float activations over the same bf16
# weights, so the two differ by a few bf16 roundings of the output.
TOLERANCE = {"f32": 1e-5, "bf16": 2e-2}


def check_same(ming, ming_call, call, x: torch.Tensor, dtype: str):
    """(max |molora - MING| / max |MING| on x, tokens left out); stops the script if the error
    is above TOLERANCE[dtype].

    bf16: PyTorch computes the router's logits in bf16, molora in float on the same weights,
    so a token whose top-k experts differ between the two (a near tie in the logits) is left
    out of the comparison and counted instead."""
    want = ming_call(x).float().numpy()
    got = call(x)
    keep = np.ones(want.shape[:-1], dtype=bool)
    if dtype == "bf16":
        x2 = x.reshape(-1, x.shape[-1])
        k = ming.num_experts_per_token
        ids_pt = torch.sort(ming.route(x2.to(ming.switch.weight.dtype))[0], dim=-1).values
        logits32 = x2.float() @ ming.switch.weight.float().T + ming.switch.bias.float()
        ids_32 = torch.sort(torch.topk(logits32, k, dim=-1).indices, dim=-1).values
        keep = (ids_pt == ids_32).all(dim=-1).numpy().reshape(keep.shape)
    diff = np.abs(got - want)[keep]
    err = float(diff.max() / max(np.abs(want).max(), 1e-30)) if diff.size else 0.0
    if not err <= TOLERANCE[dtype]:
        raise SystemExit(f"molora and MING-MOE ({dtype}) differ: max error {err:.3g} of the output's max "
                         f"(limit {TOLERANCE[dtype]:g})")
    return err, int((~keep).sum())


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
    ap.add_argument("--molora", default=None, help="folder holding the molora_py module (adds the molora variant)")
    ap.add_argument("--peers", default="base,ming,peft,molora", help="variants to time (molora needs --molora)")
    ap.add_argument("--dtypes", default="f32", help="weight types: f32, bf16 (PEFT runs in f32 only)")
    ap.add_argument("--bf16-dot", action="store_true",
                    help="molora's bf16 layer in its bf16-dot mode (set_bf16_dot: AVX512_BF16 dot products)")
    args = ap.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    mod = None
    if args.molora and "molora" in peers:
        sys.path.insert(0, os.path.abspath(args.molora))
        import molora_py as mod  # noqa: E402
    else:
        peers = [p for p in peers if p != "molora"]

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
        "loadavg_start": loadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "molora_isa": mod.active_isa() if mod else None, "peers": peers, "molora_bf16_dot": args.bf16_dot,
    }
    print(f"# {meta['date']}  torch {meta['torch']}  peft {meta['peft']}  cpu {meta['cpu']}")
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for in_f, out_f in shapes:
          base32, ming32, lora_layer = build(in_f, out_f, args.experts, args.topk, args.rank, args.alpha, 1234)
          for dtype in args.dtypes.split(","):
            if dtype == "f32":
                base, ming = base32, ming32
                every = {"base": base, "ming": ming, "peft": lora_layer}
            elif dtype == "bf16":
                base, ming = to_bf16(base32, ming32)
                every = {"base": bf16_input(base), "ming": bf16_input(ming)}
            else:
                raise SystemExit(f"--dtypes: expected f32 or bf16, got {dtype}")
            if mod:
                every["molora"] = molora_call(
                    molora_layer(mod, ming, base, in_f, out_f, args.experts, args.topk, args.rank, args.alpha,
                                 args.bf16_dot), out_f)
            mode = "bf16-dot" if dtype == "bf16" and args.bf16_dot and mod else dtype
            fns = {n: every[n] for n in peers if n in every}
            names = list(fns)
            for nt in threads:
                torch.set_num_threads(nt)
                if mod:
                    mod.set_num_threads(nt)
                print(f"\n## {in_f} -> {out_f}, {mode}, threads={nt}")
                print(f"{'T':>6} " + " ".join(f"{n + ' ms':>10}" for n in names)
                      + (f" {'ming/molora':>11} {'err':>8} {'flips':>5}" if mod else "") + f" {'reps':>5} {'load':>5}")
                for T in tokens:
                    x = torch.randn(1, T, in_f)
                    err, flips = check_same(ming, every["ming"], every["molora"], x, dtype) if mod else (None, 0)
                    med, reps = time_cell(fns, x, args.budget, args.min_reps, args.max_reps)
                    row = {"threads": nt, "in": in_f, "out": out_f, "dtype": dtype, "mode": mode, "T": T, "reps": reps,
                           "loadavg": loadavg()}
                    for n in names:
                        row[n + "_ms"] = med[n] * 1e3
                    for n in ("ming", "peft", "molora"):
                        if n in med and "base" in med:
                            row["ratio_" + n] = med[n] / med["base"]
                    if mod and "ming" in med:
                        row["ming_over_molora"] = med["ming"] / med["molora"]
                        row["max_err"] = err
                        row["route_flips"] = flips
                    rows.append(row)
                    print(f"{T:>6} " + " ".join(f"{row[n + '_ms']:>10.3f}" for n in names)
                          + (f" {row.get('ming_over_molora', float('nan')):>11.3f} {err:>8.1e} {flips:>5}" if mod else "")
                          + f" {reps:>5} {row['loadavg']:>5.2f}", flush=True)
            del base, ming, fns, every
          del base32, ming32, lora_layer
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
    """One table per (shape, threads): median ms per variant, ratios, per T."""
    out = []
    keys = sorted({(r["in"], r["out"], r.get("mode", r.get("dtype", "f32")), r["threads"]) for r in rows},
                  key=lambda k: (k[2], k[3], k[0], k[1]))
    names = {"base": "base", "ming": "MING-MOE", "peft": "PEFT LoRA", "molora": "molora"}
    for in_f, out_f, dtype, nt in keys:
        cell = [r for r in rows
                if (r["in"], r["out"], r.get("mode", r.get("dtype", "f32")), r["threads"]) == (in_f, out_f, dtype, nt)]
        ms = [n for n in names if n + "_ms" in cell[0]]
        ratios = [n for n in ("ming", "peft", "molora") if "ratio_" + n in cell[0]]
        extra = ["ming_over_molora", "max_err"] if "ming_over_molora" in cell[0] else []
        label = "bf16 weights, molora bf16-dot" if dtype == "bf16-dot" else f"{dtype} weights"
        out.append(f"\n### {in_f} -> {out_f}, {label}, {nt} thread{'s' if nt > 1 else ''}\n")
        head = (["T"] + [names[n] + " ms" for n in ms] + [names[n] + "/base" for n in ratios]
                + (["MING/molora", "max err", "tokens left out"] if extra else []) + ["reps", "load avg"])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + " ---: |" * len(head))
        for r in cell:
            vals = ([str(r["T"])] + [f"{r[n + '_ms']:.3f}" for n in ms] + [f"{r['ratio_' + n]:.3f}" for n in ratios]
                    + ([f"{r['ming_over_molora']:.2f}", f"{r['max_err']:.1e}", str(r.get("route_flips", 0))] if extra else [])
                    + [str(r["reps"]), f"{r['loadavg']:.2f}"])
            out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
