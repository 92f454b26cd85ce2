#!/usr/bin/env python3
"""Generate the reference fixtures in tests/data/ (PEFT LoRA, MixLoRA, MING-MOE).

    python tools/make_fixtures.py [--out tests/data]

Deterministic (fixed seeds, single thread, float32).  Every output is re-loaded from disk
at the end and recomputed with plain numpy from the saved tensors only; the script fails
unless numpy agrees with the packages to 1e-5.  See tests/data/README.md for the layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file as np_load
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ming_moe_reference import MingMoLoRALinear, routing_reference, wrap_linear  # noqa: E402

TOL = 1e-5
META = {"generator": "tools/make_fixtures.py"}


def rnd(g: torch.Generator, *shape, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(torch.float32)


def save(tensors: dict, path: str) -> None:
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path, metadata=META)


def check_margin(logits: torch.Tensor, k: int, what: str, min_gap=1e-3) -> None:
    """Fixtures must not depend on tie-breaking or rounding of the k-th logit."""
    s, _ = torch.sort(logits, dim=-1, descending=True)
    gap = (s[:, k - 1] - s[:, k]).min().item() if logits.shape[1] > k else float("inf")
    assert gap > min_gap, f"{what}: top-{k} margin {gap} too small; change the seed"


def close(a, b, what):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    err = np.max(np.abs(a - b) / (1.0 + np.abs(b)))
    assert err <= TOL, f"{what}: numpy disagrees, max rel err {err}"
    return err


# ---------------------------------------------------------------------------------------
# PEFT LoRA
# ---------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 20, bias=True)
        self.other = nn.Linear(20, 20, bias=True)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block()])


PEFT_TARGETS = {"layers.0.proj": (24, 20), "layers.0.other": (20, 20)}


def make_peft(out_dir: str, r: int, alpha: int, use_rslora: bool, seed: int) -> None:
    import peft

    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Tiny()
    with torch.no_grad():
        for name, (i, o) in PEFT_TARGETS.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(rnd(g, o, i, scale=1 / math.sqrt(i)))
            lin.bias.copy_(rnd(g, o, scale=0.1))
    base = {f"{n}.{p}": t.clone() for n in PEFT_TARGETS for p, t in model.get_submodule(n).state_dict().items()}
    save(base, os.path.join(out_dir, "base.safetensors"))

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj", "other"],
                          init_lora_weights=True, use_rslora=use_rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, (i, o) in PEFT_TARGETS.items():
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(rnd(g, r, i, scale=1 / math.sqrt(i)))
            layer.lora_B["default"].weight.copy_(rnd(g, o, r, scale=0.5))
    pm.eval()
    pm.save_pretrained(out_dir)
    # PEFT keeps target_modules in a set, so its order follows PYTHONHASHSEED: sort it so
    # that the file is reproducible (the only edit; PEFT writes indent=2, sorted keys).
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        written = json.load(f)
    written["target_modules"] = sorted(written["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
    card = os.path.join(out_dir, "README.md")  # PEFT's boilerplate model card: not needed
    if os.path.exists(card):
        os.remove(card)

    io = {}
    with torch.no_grad():
        for name, (i, o) in PEFT_TARGETS.items():
            x = rnd(g, 5, i)
            io[f"x.{name}"] = x
            io[f"y.{name}"] = pm.base_model.model.get_submodule(name)(x)
        merged = pm.merge_and_unload()
        for name in PEFT_TARGETS:
            lin = merged.get_submodule(name)
            assert type(lin) is nn.Linear
            io[f"y_merged.{name}"] = lin(io[f"x.{name}"])
            io[f"merged_weight.{name}"] = lin.weight.clone()
    save(io, os.path.join(out_dir, "io.safetensors"))


def verify_peft(out_dir: str) -> float:
    cfg = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
    base = np_load(os.path.join(out_dir, "base.safetensors"))
    ad = np_load(os.path.join(out_dir, "adapter_model.safetensors"))
    io = np_load(os.path.join(out_dir, "io.safetensors"))
    worst = 0.0
    for name in PEFT_TARGETS:
        W = base[f"{name}.weight"].astype(np.float64)
        b = base[f"{name}.bias"].astype(np.float64)
        A = ad[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        B = ad[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        assert np.abs(B).min() > 0, "B must be non-zero"
        x = io[f"x.{name}"].astype(np.float64)
        y = x @ W.T + b + s * (x @ A.T) @ B.T
        Wm = W + s * B @ A
        worst = max(worst, close(io[f"y.{name}"], y, f"{out_dir} y.{name}"),
                    close(io[f"merged_weight.{name}"], Wm, f"{out_dir} merged_weight.{name}"),
                    close(io[f"y_merged.{name}"], x @ Wm.T + b, f"{out_dir} y_merged.{name}"))
    return worst


# ---------------------------------------------------------------------------------------
# MixLoRA (pip package mixlora)
# ---------------------------------------------------------------------------------------
MIX = dict(hidden=32, inter=48, layers=2, heads=4, vocab=64, E=4, k=2, r=4, alpha=8, T=6)
MIX_PROJ = {"gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden")}


def make_mixlora(out_dir: str, seed: int, convert_script: str) -> dict:
    import mixlora
    from mixlora.config import MixLoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lcfg = LlamaConfig(hidden_size=MIX["hidden"], intermediate_size=MIX["inter"],
                       num_hidden_layers=MIX["layers"], num_attention_heads=MIX["heads"],
                       num_key_value_heads=MIX["heads"], vocab_size=MIX["vocab"],
                       max_position_embeddings=64, hidden_act="silu", tie_word_embeddings=False)
    model = LlamaForCausalLM(lcfg).to(torch.float32).eval()

    base = {}
    for L in range(MIX["layers"]):
        for p in MIX_PROJ:
            base[f"layers.{L}.mlp.{p}.weight"] = getattr(model.model.layers[L].mlp, p).weight.detach().clone()
    save(base, os.path.join(out_dir, "base.safetensors"))

    # adapter_config.json through the package's own config class (it has no saver).
    raw_cfg = {
        "base_model_name_or_path": "tiny-llama-random (LlamaConfig in tools/make_fixtures.py)",
        "task_type": "CAUSAL_LM", "peft_type": "MIXLORA", "r": MIX["r"], "lora_alpha": MIX["alpha"],
        "lora_dropout": 0.05, "target_modules": list(MIX_PROJ), "routing_strategy": "mixlora",
        "num_experts": MIX["E"], "top_k": MIX["k"], "act_fn": "silu",
    }
    cfg = MixLoraConfig.from_config(raw_cfg)
    exported = cfg.export()
    exported["router_init_range"] = cfg.router_init_range_
    exported["jitter_noise"] = cfg.jitter_noise_
    exported["router_aux_loss_coef"] = cfg.router_aux_loss_coef_

    H, I = MIX["hidden"], MIX["inter"]
    dims = {"hidden": H, "inter": I}
    weights = {}
    for L in range(MIX["layers"]):
        weights[f"mixlora.layers.{L}.mlp.moe_gate.weight"] = rnd(g, MIX["E"], H, scale=0.5)
        for p, (di, do) in MIX_PROJ.items():
            for e in range(MIX["E"]):
                pre = f"mixlora.layers.{L}.mlp.{p}.experts.{e}"
                weights[f"{pre}.lora_A.weight"] = rnd(g, MIX["r"], dims[di], scale=1 / math.sqrt(dims[di]))
                weights[f"{pre}.lora_B.weight"] = rnd(g, dims[do], MIX["r"], scale=0.3)

    tmp = tempfile.mkdtemp(prefix="mixlora_")
    try:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(exported, f, indent=2)
        torch.save(weights, os.path.join(tmp, "adapter_model.bin"))  # the file the package loads
        # load back with the package's own loader and injector
        cfg2, w2 = mixlora.load_adapter_weights(tmp, adapter_name="default", device="cpu", dtype=torch.float32)
        mixlora.inject_adapter_in_model(model, cfg2, w2)
        for L in range(MIX["layers"]):
            moe = model.model.layers[L].mlp.mixlora_moes["default"]
            # the experts live in plain dicts, so model.eval() does not reach their dropout
            for lora in moe.experts_.values():
                lora.eval()
        shutil.copy(os.path.join(tmp, "adapter_config.json"), os.path.join(out_dir, "adapter_config.json"))
        subprocess.run([sys.executable, convert_script, os.path.join(tmp, "adapter_model.bin"),
                        os.path.join(out_dir, "adapter_model.safetensors")], check=True)
    finally:
        shutil.rmtree(tmp)

    captured = {}

    def hook(L):
        def fn(mod, args, out):
            captured[L] = (args[0].detach().clone(), out.detach().clone())
        return fn

    hs = [model.model.layers[L].mlp.register_forward_hook(hook(L)) for L in range(MIX["layers"])]
    ids = torch.randint(0, MIX["vocab"], (1, MIX["T"]), generator=g)
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)  # twice: any dropout left active would show as a mismatch
    for h in hs:
        h.remove()
    io = {"input_ids": ids.to(torch.int32)}
    with torch.no_grad():
        for L in range(MIX["layers"]):
            x, y = captured[L]
            x2 = x.reshape(-1, H)
            logits = F.linear(x2, weights[f"mixlora.layers.{L}.mlp.moe_gate.weight"])
            check_margin(logits, MIX["k"], f"mixlora layer {L}")
            io[f"x.{L}"] = x2
            io[f"router_logits.{L}"] = logits
            io[f"y.{L}"] = y.reshape(-1, H)
            # determinism check: same MLP output again
            y_again = model.model.layers[L].mlp(x)
            assert torch.equal(y_again, y), "mixlora MLP is not deterministic (dropout active?)"
    save(io, os.path.join(out_dir, "io.safetensors"))
    return {"package_wrote": "none (mixlora 0.2.3 has no save function); its loader reads "
                             "adapter_model.bin via torch.load(weights_only=True)"}


def verify_mixlora(out_dir: str) -> float:
    cfg = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    E, k, r, alpha = cfg["num_experts"], cfg["top_k"], cfg["r"], cfg["lora_alpha"]
    s = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    base = np_load(os.path.join(out_dir, "base.safetensors"))
    ad = np_load(os.path.join(out_dir, "adapter_model.safetensors"))
    io = np_load(os.path.join(out_dir, "io.safetensors"))
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    worst = 0.0
    for L in range(MIX["layers"]):
        x = io[f"x.{L}"].astype(np.float64)
        W = {p: base[f"layers.{L}.mlp.{p}.weight"].astype(np.float64) for p in MIX_PROJ}
        Wr = ad[f"mixlora.layers.{L}.mlp.moe_gate.weight"].astype(np.float64)
        logits = x @ Wr.T
        worst = max(worst, close(io[f"router_logits.{L}"], logits, f"mixlora router_logits.{L}"))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
        g = np.take_along_axis(p, ids, 1)
        g /= g.sum(1, keepdims=True)
        y = np.zeros_like(x)

        def eff(proj, e):
            pre = f"mixlora.layers.{L}.mlp.{proj}.experts.{e}"
            return W[proj] + s * ad[f"{pre}.lora_B.weight"].astype(np.float64) @ ad[f"{pre}.lora_A.weight"].astype(np.float64)

        for t in range(x.shape[0]):
            for j in range(k):
                e = ids[t, j]
                h = silu(eff("gate_proj", e) @ x[t]) * (eff("up_proj", e) @ x[t])
                y[t] += g[t, j] * (eff("down_proj", e) @ h)
        worst = max(worst, close(io[f"y.{L}"], y, f"mixlora y.{L}"))
    return worst


# ---------------------------------------------------------------------------------------
# MING-MOE (tools/ming_moe_reference.py)
# ---------------------------------------------------------------------------------------
MING = dict(hidden=32, inter=48, E=4, k=2, r=4, alpha=8, T=7)
MING_PROJ = {"gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden")}
MING_PREFIX = "base_model.model.model.layers.0.mlp."


def make_ming(out_dir: str, seed: int, use_rslora: bool, convert_script: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    H, I, E, k, r = MING["hidden"], MING["inter"], MING["E"], MING["k"], MING["r"]
    dims = {"hidden": H, "inter": I}
    layers = {}
    for p, (di, do) in MING_PROJ.items():
        base_lin = nn.Linear(dims[di], dims[do], bias=False)
        with torch.no_grad():
            base_lin.weight.copy_(rnd(g, dims[do], dims[di], scale=1 / math.sqrt(dims[di])))
        m = wrap_linear(base_lin, num_experts=E, num_experts_per_token=k, r=r, lora_alpha=MING["alpha"],
                        lora_dropout=0.05, use_rslora=use_rslora, expert_selection="topk")
        with torch.no_grad():
            m.switch.weight.copy_(rnd(g, E, dims[di], scale=1.0 / math.sqrt(dims[di])))
            m.switch.bias.copy_(rnd(g, E, scale=0.2))
            for i in range(E):
                m.A(i).weight.copy_(rnd(g, r, dims[di], scale=1 / math.sqrt(dims[di])))
                m.B(i).weight.copy_(rnd(g, dims[do], r, scale=0.3))
        m.eval()
        layers[p] = m

    trainables = {}
    for p, m in layers.items():
        trainables.update(m.molora_state_dict(MING_PREFIX + p))
    tmp = tempfile.mkdtemp(prefix="ming_")
    try:
        torch.save(trainables, os.path.join(tmp, "non_lora_trainables.bin"))
        subprocess.run([sys.executable, convert_script, os.path.join(tmp, "non_lora_trainables.bin"),
                        os.path.join(out_dir, "non_lora_trainables.safetensors")], check=True)
    finally:
        shutil.rmtree(tmp)

    save({f"model.layers.0.mlp.{p}.weight": m.weight for p, m in layers.items()},
         os.path.join(out_dir, "base.safetensors"))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "torch_dtype": "float32",
        "num_experts": E, "num_experts_per_token": k, "expert_selection": "topk", "share_expert": False,
        "r": r, "lora_alpha": MING["alpha"], "lora_dropout": 0.05, "use_rslora": use_rslora,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    io = {}
    with torch.no_grad():
        x = rnd(g, MING["T"], H)
        xs = {"gate_proj": x, "up_proj": x}
        xs["down_proj"] = F.silu(layers["gate_proj"](x.unsqueeze(0))[0]) * layers["up_proj"](x.unsqueeze(0))[0]
        for p, m in layers.items():
            xp = xs[p]
            logits = m.switch(xp)
            check_margin(logits, k, f"ming {p}")
            ids, w = m.route(xp)
            y = m(xp.unsqueeze(0))[0]  # [1, T, in]: MING's multi-token eval path
            # the single-token path and the dense training path must give the same numbers
            y1 = torch.cat([m(xp[t:t + 1].unsqueeze(0))[0] for t in range(xp.shape[0])])
            yd = F.linear(xp, m.weight) + m._dense(xp.unsqueeze(0))[0]
            assert torch.allclose(y1, y, atol=1e-5, rtol=1e-5) and torch.allclose(yd, y, atol=1e-5, rtol=1e-5)
            io[f"x.{p}"] = xp
            io[f"y.{p}"] = y
            io[f"router_logits.{p}"] = logits
            io[f"routing_ids.{p}"] = ids.to(torch.int32)
            io[f"routing_weights.{p}"] = w
        io["y.mlp"] = io["y.down_proj"]
    save(io, os.path.join(out_dir, "io.safetensors"))


def verify_ming(out_dir: str) -> float:
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    E, k, r, alpha = cfg["num_experts"], cfg["num_experts_per_token"], cfg["r"], cfg["lora_alpha"]
    s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
    base = np_load(os.path.join(out_dir, "base.safetensors"))
    tr = np_load(os.path.join(out_dir, "non_lora_trainables.safetensors"))
    io = np_load(os.path.join(out_dir, "io.safetensors"))
    worst = 0.0
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    for p in MING_PROJ:
        pre = MING_PREFIX + p
        W = base[f"model.layers.0.mlp.{p}.weight"].astype(np.float64)
        x = io[f"x.{p}"].astype(np.float64)
        logits = x @ tr[f"{pre}.switch.weight"].astype(np.float64).T + tr[f"{pre}.switch.bias"].astype(np.float64)
        ids, w = routing_reference(logits, k)
        assert np.array_equal(ids, io[f"routing_ids.{p}"]), f"ming {p}: routing ids differ"
        worst = max(worst, close(io[f"routing_weights.{p}"], w, f"ming routing_weights.{p}"),
                    close(io[f"router_logits.{p}"], logits, f"ming router_logits.{p}"))
        y = x @ W.T
        for t in range(x.shape[0]):
            for j in range(k):
                e = ids[t, j]
                A = tr[f"{pre}.experts.{e}.lora_A_{e}.weight"].astype(np.float64)
                B = tr[f"{pre}.experts.{e}.lora_B_{e}.weight"].astype(np.float64)
                assert np.abs(B).min() > 0
                y[t] += w[t, j] * s * (B @ (A @ x[t]))
        worst = max(worst, close(io[f"y.{p}"], y, f"ming y.{p}"))
    # the down_proj input really is silu(gate) * up of the stored outputs
    worst = max(worst, close(io["x.down_proj"], silu(io["y.gate_proj"].astype(np.float64)) * io["y.up_proj"],
                             "ming x.down_proj"))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "data"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    conv = os.path.join(HERE, "convert_checkpoint.py")
    out = args.out
    make_peft(os.path.join(out, "peft_lora"), r=4, alpha=8, use_rslora=False, seed=101)
    make_peft(os.path.join(out, "peft_lora_rslora"), r=8, alpha=8, use_rslora=True, seed=102)
    info = make_mixlora(os.path.join(out, "mixlora"), seed=201, convert_script=conv)
    make_ming(os.path.join(out, "ming_moe"), seed=301, use_rslora=False, convert_script=conv)
    make_ming(os.path.join(out, "ming_moe_rslora"), seed=302, use_rslora=True, convert_script=conv)

    results = {
        "peft_lora": verify_peft(os.path.join(out, "peft_lora")),
        "peft_lora_rslora": verify_peft(os.path.join(out, "peft_lora_rslora")),
        "mixlora": verify_mixlora(os.path.join(out, "mixlora")),
        "ming_moe": verify_ming(os.path.join(out, "ming_moe")),
        "ming_moe_rslora": verify_ming(os.path.join(out, "ming_moe_rslora")),
    }
    print("mixlora:", info["package_wrote"])
    for name, err in results.items():
        print(f"numpy check {name}: max rel err {err:.2e} (tolerance {TOL})")
    total = 0
    for root, _, files in os.walk(out):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"tests/data total: {total} bytes")
    assert total < 2 * 1024 * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
