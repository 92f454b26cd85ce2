"""Generate tests/data/qwen2/: a tiny Qwen2 decoder with MING-MOE adapters and its logits.

A random transformers Qwen2ForCausalLM (no download; 2 layers, hidden 64, 4 heads, 2 KV
heads, intermediate 176, vocab 512, rope_theta 1e6) gets a MING-MOE adapter (E = 4, k = 2,
r = 4, lora_alpha = 8, B != 0) on every MLP gate/up/down projection, by replacing those
nn.Linear modules with MingMoLoRALinear from tools/ming_moe_reference.py. The script records
the logits of every prompt position and 8 greedily decoded tokens (with the logits each was
chosen from), with and without the adapter, for two variants of one model (untied LM head):

  f32/   float32 weights
  bf16/  the same weights (model and adapter) rounded to bfloat16 and stored as BF16; the
         reference is PyTorch computing in float32 on the rounded weights

It asserts margins so float rounding cannot change a choice: the k-th and (k+1)-th router
logits of every token of every layer and projection differ by > 1e-3, and the first and
second logits of every decode step by > 1e-3 of the largest |logit|; the seed is advanced
until both hold in both variants (and the greedy tokens are not one token repeated). It writes deterministic files (fixed seeds, one thread).

    python tools/make_qwen2_fixture.py [--out tests/data/qwen2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ming_moe_reference import MingMoLoRALinear, wrap_linear  # noqa: E402

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6)
ADAPTER = dict(E=4, k=2, r=4, alpha=8)
PROMPT = [5, 17, 250, 3, 511, 42, 128]
NEW_TOKENS = 8
PROJ = ("gate_proj", "up_proj", "down_proj")
META = {"generator": "tools/make_qwen2_fixture.py"}


class MarginError(Exception):
    pass


def rnd(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def build(seed: int, tied: bool, bf16: bool):
    """The base model (float32 modules) and one MING layer per MLP projection, not yet installed."""
    cfg = Qwen2Config(**SHAPE, tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    H = SHAPE["hidden_size"]
    with torch.no_grad():
        # Scaled so activations stay O(1) and the logits spread over several units.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + rnd(g, *p.shape, scale=0.2))
            elif name.endswith(".bias"):
                p.copy_(rnd(g, *p.shape, scale=0.1))
            elif "embed_tokens" in name:
                # small when tied, or each token's own embedding dominates its logits
                p.copy_(rnd(g, *p.shape, scale=0.2 if tied else 1.0))
            elif name == "lm_head.weight":
                p.copy_(rnd(g, *p.shape, scale=0.5))
            else:
                p.copy_(rnd(g, *p.shape, scale=1.0 / math.sqrt(p.shape[1])))
        ming = {}
        for L, layer in enumerate(model.model.layers):
            for proj in PROJ:
                base = getattr(layer.mlp, proj)
                m = wrap_linear(base, num_experts=ADAPTER["E"], num_experts_per_token=ADAPTER["k"], r=ADAPTER["r"],
                                lora_alpha=ADAPTER["alpha"], lora_dropout=0.05, expert_selection="topk")
                din, dout = base.in_features, base.out_features
                m.switch.weight.copy_(rnd(g, ADAPTER["E"], din, scale=1.0 / math.sqrt(din)))
                m.switch.bias.copy_(rnd(g, ADAPTER["E"], scale=0.2))
                for i in range(ADAPTER["E"]):
                    m.A(i).weight.copy_(rnd(g, ADAPTER["r"], din, scale=1.0 / math.sqrt(din)))
                    m.B(i).weight.copy_(rnd(g, dout, ADAPTER["r"], scale=0.3 / math.sqrt(ADAPTER["r"])))
                m.eval()
                ming[(L, proj)] = m
        if bf16:
            # the MING layers hold copies of the MLP weights: round those too
            for t in list(model.parameters()) + [p for m in ming.values() for p in m.parameters()]:
                t.copy_(t.to(torch.bfloat16).to(torch.float32))
    return model, ming


def install(model, ming, on: bool):
    """Puts the MING layers (on) or plain nn.Linear copies of their base weights (off) into the MLPs."""
    for (L, proj), m in ming.items():
        if on:
            setattr(model.model.layers[L].mlp, proj, m)
        else:
            lin = nn.Linear(m.in_features, m.out_features, bias=False)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
            setattr(model.model.layers[L].mlp, proj, lin)


def run(model, ming, adapted: bool, what: str):
    """Prompt logits, greedy tokens and their logits (KV cache, one token per step), expert load."""
    install(model, ming, adapted)
    E, k = ADAPTER["E"], ADAPTER["k"]
    load = torch.zeros(SHAPE["num_hidden_layers"], len(PROJ), E, dtype=torch.int32)
    hooks = []
    if adapted:
        for (L, proj), m in ming.items():
            def hook(mod, args, L=L, p=PROJ.index(proj)):
                x = args[0].reshape(-1, mod.in_features)
                logits = mod.switch(x)
                top = logits.sort(dim=-1, descending=True).values
                gap = (top[:, k - 1] - top[:, k]).min().item()
                if gap <= 1e-3 * max(1.0, logits.abs().max().item()):
                    raise MarginError(f"{what}: router margin {gap:.2e} at layer {L} {PROJ[p]}")
                ids = logits.topk(k, dim=-1).indices
                load[L, p] += torch.bincount(ids.flatten(), minlength=E).to(torch.int32)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ids = torch.tensor([PROMPT])
            out = model(ids, use_cache=True)
            prompt_logits = out.logits[0]
            past = out.past_key_values
            steps, tokens = [prompt_logits[-1]], []
            for i in range(NEW_TOKENS):
                row = steps[-1]
                top = row.topk(2).values
                if (top[0] - top[1]).item() <= 1e-3 * row.abs().max().item():
                    raise MarginError(f"{what}: decode margin {(top[0] - top[1]).item():.2e} at step {i}")
                tokens.append(int(row.argmax()))
                if i + 1 < NEW_TOKENS:
                    out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    steps.append(out.logits[0, -1])
            step_logits = torch.stack(steps)
            if len(set(tokens)) < NEW_TOKENS // 2:
                raise MarginError(f"{what}: greedy tokens {tokens} repeat (a weak test)")
    finally:
        for h in hooks:
            h.remove()
    # The cache must agree with running the whole sequence again (no hooks: load counted once).
    with torch.no_grad():
        full = model(torch.tensor([PROMPT + tokens[:-1]]), use_cache=False).logits[0]
    P = len(PROMPT)
    assert torch.allclose(full[:P], prompt_logits, atol=1e-4), what
    assert torch.allclose(full[P - 1:], step_logits, atol=1e-4), what
    return prompt_logits.clone(), torch.tensor(tokens, dtype=torch.int32), step_logits.clone(), load


def save_model(model, ming, out_dir: str, tied: bool, bf16: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    install(model, ming, False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    tensors = {n: t.detach().to(dtype).contiguous().clone() for n, t in model.state_dict().items()
               if not (tied and n == "lm_head.weight")}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata=META)
    cfg = model.config.to_dict()
    cfg["dtype"] = "bfloat16" if bf16 else "float32"
    cfg.pop("transformers_version", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_adapter(ming, out_dir: str, bf16: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    tensors = {}
    for (L, proj), m in ming.items():
        for k, v in m.molora_state_dict(f"base_model.model.model.layers.{L}.mlp.{proj}").items():
            tensors[k] = v.to(dtype).contiguous()
    save_file(tensors, os.path.join(out_dir, "non_lora_trainables.safetensors"), metadata=META)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": SHAPE["hidden_size"], "intermediate_size": SHAPE["intermediate_size"],
        "num_hidden_layers": SHAPE["num_hidden_layers"], "num_attention_heads": SHAPE["num_attention_heads"],
        "num_key_value_heads": SHAPE["num_key_value_heads"], "vocab_size": SHAPE["vocab_size"],
        "torch_dtype": "bfloat16" if bf16 else "float32",
        "num_experts": ADAPTER["E"], "num_experts_per_token": ADAPTER["k"], "expert_selection": "topk",
        "share_expert": False, "r": ADAPTER["r"], "lora_alpha": ADAPTER["alpha"], "lora_dropout": 0.05,
        "use_rslora": False,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "qwen2"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    ref = {"input_ids": torch.tensor(PROMPT, dtype=torch.int32)}
    variants = (("f32", False), ("bf16", True))
    for seed in range(1000, 1200):
        try:
            found = {}
            for variant, bf16 in variants:
                model, ming = build(seed, tied=False, bf16=bf16)
                found[variant] = (model, ming, {mode: run(model, ming, mode == "adapter", f"{variant} {mode} seed {seed}")
                                                for mode in ("adapter", "plain")})
        except MarginError as e:
            print("retry:", e)
            continue
        break
    else:
        raise SystemExit("no seed gave the margins")
    print(f"seed {seed}")
    for variant, bf16 in variants:
        model, ming, results = found[variant]
        for mode, (pl, toks, sl, load) in results.items():
            ref[f"{variant}.{mode}.prompt_logits"] = pl
            ref[f"{variant}.{mode}.tokens"] = toks
            ref[f"{variant}.{mode}.step_logits"] = sl
            if mode == "adapter":
                ref[f"{variant}.adapter.expert_load"] = load
            print(f"  {variant} {mode}: tokens {toks.tolist()}, |logit| max {pl.abs().max().item():.2f}")
        # Adapted and plain runs must differ, or the adapter would not show.
        assert not torch.allclose(results["adapter"][0], results["plain"][0], atol=1e-2)
        save_model(model, ming, os.path.join(args.out, variant), False, bf16)
        save_adapter(ming, os.path.join(args.out, f"adapter_{variant}"), bf16)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(args.out, "reference.safetensors"),
              metadata=META)


if __name__ == "__main__":
    main()
