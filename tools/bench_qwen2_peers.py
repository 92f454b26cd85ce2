"""Time transformers' Qwen2ForCausalLM with MING-MOE's layer at bench/bench_qwen2.cpp's shape.

Qwen1.5-0.5B-like: hidden 1024, 24 layers, 16 heads (16 KV heads), intermediate 2816, vocab
32000, tied head. The base weights are bench_qwen2's own, value for value: the same 64-bit LCG
seeded per tensor name, the same scales (uniform with the variance of N(0, 1/cols); norm
weights 1 +- 0.1, biases +- 0.02), float32 arithmetic done the same way (checked value for
value against the C++ generator built with -march=native), so the float model is
bit-identical to the C++ one; for bf16 the model is cast with torch (round to nearest even,
as molora::to_bf16). The MING-MOE adapters (tools/ming_moe_reference.py, E = 8, k = 2, r = 16,
lora_alpha = 32, on every MLP gate/up/down projection) have the C++ bench's shapes and
distributions but not its values (router and A as PyTorch initialises them, B uniform in
+-0.01), so the routing differs token by token; they stay float32 in the bf16 model, as MING
keeps them.

Measures, for f32 or bf16 weights (the whole model in that dtype, as a PyTorch user runs it),
each thread count (torch.set_num_threads), plain and adapted:
  prefill   one 128-token prompt
  decode    one step at batch 1 (context 32) and batch 4 (contexts 32, 40, 48, 56 as the C++
            bench; transformers has no ragged batch, so they are left-padded to 56 with an
            attention mask); the cache is cropped back after every step
MING's eval path asserts batch 1 for a single-token step; for batch 4 the script sends the 4
tokens through MING's grouped path (the one it takes for several tokens of one sequence),
which gives each token the same result. Times are wall time and the process's CPU time
(every thread), medians of --reps runs after one warm-up.

    python tools/bench_qwen2_peers.py [--dtype f32] [--threads 1,2] [--reps 5] [--json out.json]
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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ming_moe_reference  # noqa: E402
from ming_moe_reference import MingMoLoRALinear, wrap_linear  # noqa: E402

import transformers  # noqa: E402
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

VOCAB, PROMPT, CONTEXTS = 32000, 128, (32, 40, 48, 56)

# ---- bench_qwen2's random weights ----------------------------------------------------------

_MASK = (1 << 64) - 1
_A, _C = 6364136223846793005, 1442695040888963407
_BLOCK = 1 << 16


def _lcg_tables():
    """a^(k+1) and c (a^k + ... + 1) mod 2^64 for k < _BLOCK: state k+1 after state 0."""
    mul, add = np.empty(_BLOCK, np.uint64), np.empty(_BLOCK, np.uint64)
    m, c = _A, _C
    for k in range(_BLOCK):
        mul[k], add[k] = m, c
        m, c = (m * _A) & _MASK, (c * _A + _C) & _MASK
    return mul, add


_TABLES = None


def seed_of(name: str) -> int:
    """FNV-1a of the tensor name, as RandomWeights::seed_of."""
    h = 1469598103934665603
    for ch in name.encode():
        h = ((h ^ ch) * 1099511628211) & _MASK
    return h


def lcg_fill(n: int, seed: int, scale: float, offset: float) -> np.ndarray:
    """RandomWeights::fill: offset + scale * (2u - 1), u the top 24 bits of each LCG state."""
    global _TABLES
    if _TABLES is None:
        _TABLES = _lcg_tables()
    mul, add = _TABLES
    blocks = -(-n // _BLOCK)
    starts = np.empty(blocks, np.uint64)
    s = seed | 1
    jump_m, jump_c = int(mul[-1]), int(add[-1])
    for j in range(blocks):
        starts[j] = s
        s = (s * jump_m + jump_c) & _MASK
    with np.errstate(over="ignore"):
        states = starts[:, None] * mul[None, :] + add[None, :]  # wraps mod 2^64
    u = (states.reshape(-1)[:n] >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    v = np.float32(2) * u - np.float32(1)  # exact
    # One rounding of offset + scale * v, as the FMA a -march=native build contracts it to (exact
    # in float64). With offset 0 (every matrix and bias) this equals the unfused product; only
    # the norm weights (offset 1) could differ by an ulp from a build without FMA.
    return (np.float64(offset) + np.float64(np.float32(scale)) * v.astype(np.float64)).astype(np.float32)


def bench_values(name: str, shape) -> np.ndarray:
    if len(shape) == 2:  # RandomWeights::matrix / weight
        scale = np.sqrt(np.float32(3.0) / np.float32(shape[1]))
        return lcg_fill(shape[0] * shape[1], seed_of(name), float(scale), 0.0).reshape(shape)
    norm = "norm" in name  # RandomWeights::vector
    return lcg_fill(shape[0], seed_of(name), np.float32(0.1) if norm else np.float32(0.02), 1.0 if norm else 0.0)


# ---- the models ------------------------------------------------------------------------------


def build(attn: str) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, rope_theta=1e6, tie_word_embeddings=True,
                      attn_implementation=attn)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # lm_head.weight is embed_tokens' (tied)
            p.copy_(torch.from_numpy(bench_values(name, tuple(p.shape))))
    return model


def attach_adapters(model: Qwen2ForCausalLM) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                base = getattr(layer.mlp, proj)
                # weight and router in the model's dtype, the experts float32 (as MING keeps them)
                m = wrap_linear(base, num_experts=8, num_experts_per_token=2, r=16, lora_alpha=32,
                                expert_selection="topk")
                for i in range(8):
                    torch.nn.init.uniform_(m.B(i).weight, -0.01, 0.01)  # non-zero, as the C++ bench
                m.eval()
                setattr(layer.mlp, proj, m)


_ming_sparse = MingMoLoRALinear._sparse


def _sparse_any_batch(self, x3):
    """MING's eval helper, with a batch of single tokens sent through its grouped path."""
    bsz, n, d = x3.shape
    if n == 1 and bsz > 1:
        return _ming_sparse(self, x3.reshape(1, bsz, d)).reshape(bsz, 1, -1)
    return _ming_sparse(self, x3)


MingMoLoRALinear._sparse = _sparse_any_batch
assert ming_moe_reference.MingMoLoRALinear is MingMoLoRALinear

# ---- timing ----------------------------------------------------------------------------------


def timed(fn, reps: int):
    """Median (wall, process CPU) seconds of fn over reps runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(wall), statistics.median(cpu)


def prefill_case(model):
    prompt = torch.tensor([[(i * 7919 + 104729) % VOCAB for i in range(PROMPT)]])
    return lambda: model(prompt, use_cache=True), PROMPT


def decode_case(model, batch: int):
    lens = CONTEXTS[:batch]
    width = max(lens)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for s, n in enumerate(lens):  # left padding
        ids[s, width - n:] = torch.tensor([(i * 7919 + (s + 2) * 104729) % VOCAB for i in range(n)])
        mask[s, width - n:] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    padded = batch > 1 and min(lens) != width
    model(ids, attention_mask=mask if padded else None, position_ids=pos, cache=cache, use_cache=True)
    nxt = torch.tensor([[s + 11] for s in range(batch)])
    step_mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1) if padded else None
    step_pos = torch.tensor([[n] for n in lens])

    def step():
        model(nxt, attention_mask=step_mask, position_ids=step_pos, cache=cache, use_cache=True)
        cache.crop(-1)  # drop the step just added

    return step, batch


def machine() -> dict:
    model_name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model_name, "loadavg": list(os.getloadavg()), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of prefill (decode: at least 10)")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    ap.add_argument("--adapters", default="0,1", help="0 plain, 1 MING-MOE; comma-separated")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    adapters = [int(a) for a in args.adapters.split(",")]
    out = {"machine_before": machine(), "dtype": args.dtype, "attn": args.attn, "reps": args.reps,
           "weights": "base: bench_qwen2's values; adapters: same shapes and distributions", "results": []}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, attention {args.attn}, "
          f"load {os.getloadavg()[0]:.2f}")

    model = build(args.attn)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    for adapter in sorted(adapters):
        if adapter:
            attach_adapters(model)
        name = "MING-MOE" if adapter else "plain"
        with torch.no_grad():
            for t in threads:
                torch.set_num_threads(t)
                cases = [("prefill", 1, *prefill_case(model), args.reps)]
                cases += [("decode", b, *decode_case(model, b), max(args.reps, 10)) for b in (1, 4)]
                for phase, batch, fn, tokens, reps in cases:
                    wall, cpu = timed(fn, reps)
                    rec = {"impl": "pytorch", "dtype": args.dtype, "adapter": adapter, "threads": t, "phase": phase,
                           "batch": batch, "tokens": tokens, "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                           "tokens_per_s": tokens / wall, "reps": reps}
                    out["results"].append(rec)
                    what = f"prefill {PROMPT}" if phase == "prefill" else f"decode batch {batch}"
                    print(f"{name:9s} {args.dtype:4s} {t} thr {what:15s} wall {wall * 1e3:9.1f} ms  "
                          f"CPU {cpu * 1e3:9.1f} ms  {tokens / wall:8.1f} tokens/s", flush=True)
    out["machine_after"] = machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
