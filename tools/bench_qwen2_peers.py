"""Time transformers' Qwen2ForCausalLM with MING-MOE's layer at bench/bench_qwen2.cpp's shape.

Qwen1.5-0.5B-like: hidden 1024, 24 layers, 16 heads (16 KV heads), intermediate 2816, vocab
32000, tied head; random weights (no download); MING-MOE adapters (tools/ming_moe_reference.py,
E = 8, k = 2, r = 16, lora_alpha = 32, B non-zero) on every MLP gate/up/down projection, or
none. Float32, one thread by default (as the C++ benchmark without OpenMP), eager attention.

Measures prefill tokens/s (prompt 128) and decode tokens/s at batch 1 and 4 (context 32 for
every sequence: transformers needs padding for ragged batches; the cache is cropped back
after every step so each step sees the same context). MING's eval path asserts batch 1 for
a single-token step, so the adapted model has no batch-4 decode figure.

    python tools/bench_qwen2_peers.py [--threads 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ming_moe_reference import wrap_linear  # noqa: E402

from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM  # noqa: E402


def build(adapted: bool) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, rope_theta=1e6, tie_word_embeddings=True,
                      attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    if adapted:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    m = wrap_linear(getattr(layer.mlp, proj), num_experts=8, num_experts_per_token=2, r=16,
                                    lora_alpha=32, expert_selection="topk")
                    for i in range(8):
                        torch.nn.init.normal_(m.B(i).weight, std=0.01)
                    m.eval()
                    setattr(layer.mlp, proj, m)
    return model


def timed(fn, reps: int) -> float:
    """Median process CPU time of fn (as Google Benchmark's default counters; on a shared
    machine wall time also counts other processes' turns). Wall time is printed too."""
    fn()  # warm-up
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    print(f"    (wall {statistics.median(wall) * 1e3:.1f} ms)", end="")
    return statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}")
    for adapted in (False, True):
        model = build(adapted)
        name = "MING-MOE" if adapted else "plain"
        with torch.no_grad():
            prompt = torch.randint(0, 32000, (1, 128))
            t = timed(lambda: model(prompt, use_cache=True), args.reps)
            print(f" {name:9s} prefill 128: {t * 1e3:8.1f} ms CPU  {128 / t:8.1f} tokens/s")
            for batch in (1, 4):
                if adapted and batch > 1:
                    print(f"{name:9s} decode batch {batch}: n/a (MING's single-token path asserts batch 1)")
                    continue
                cache = DynamicCache(config=model.config)
                ctx = torch.randint(0, 32000, (batch, 32))
                model(ctx, past_key_values=cache, use_cache=True)
                nxt = torch.randint(0, 32000, (batch, 1))

                def step():
                    model(nxt, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # drop the step just added

                t = timed(step, max(args.reps, 10))
                print(f" {name:9s} decode batch {batch}: {t * 1e3:8.1f} ms CPU/step  {batch / t:8.1f} tokens/s")
        del model


if __name__ == "__main__":
    main()
