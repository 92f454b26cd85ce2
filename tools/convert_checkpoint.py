#!/usr/bin/env python3
"""Convert a torch.save state dict (.bin / .pt) into a safetensors file.

    python tools/convert_checkpoint.py IN.bin OUT.safetensors [--dtype keep|float32]

Key names are kept exactly.  ``--dtype float32`` widens BF16/F16/F64 floating tensors to
float32; ``keep`` (default) writes each tensor in its own dtype (safetensors stores BF16).
The file is loaded with ``torch.load(weights_only=True)``, so pickled code never runs.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from safetensors.torch import save_file


def load_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any loader failure plainly
        raise SystemExit(f"error: cannot load {path} as a weights-only torch checkpoint: {exc}")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SystemExit(f"error: {path} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        lines = "\n".join(f"  {k!r}: {t}" for k, t in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise SystemExit(f"error: {len(bad)} entries of {path} are not tensors "
                         f"(safetensors holds tensors only):\n{lines}{more}")
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise SystemExit(f"error: non-string keys in {path}: {bad_keys[:5]}")
    return obj


def convert(state: dict, dtype: str) -> dict:
    out = {}
    for k, v in state.items():
        t = v.detach().cpu()
        if dtype == "float32" and t.is_floating_point() and t.dtype != torch.float32:
            t = t.to(torch.float32)
        out[k] = t.contiguous().clone()  # clone: shared storage is rejected by save_file
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="torch.save state dict (.bin/.pt)")
    ap.add_argument("output", help="output .safetensors path")
    ap.add_argument("--dtype", choices=["keep", "float32"], default="keep")
    ap.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                    help="string metadata for the safetensors header (repeatable)")
    args = ap.parse_args(argv)

    state = load_state_dict(args.input)
    before = Counter(str(v.dtype).replace("torch.", "") for v in state.values())
    out = convert(state, args.dtype)
    after = Counter(str(v.dtype).replace("torch.", "") for v in out.values())
    # one key by default: safetensors orders a multi-key metadata map by hash, so more keys
    # would make the output bytes vary from run to run
    meta = {"format": "pt"}
    for kv in args.metadata:
        if "=" not in kv:
            raise SystemExit(f"error: --metadata wants KEY=VALUE, got {kv!r}")
        key, val = kv.split("=", 1)
        meta[key] = val
    save_file(out, args.output, metadata=meta)

    n_el = sum(v.numel() for v in out.values())
    n_bytes = sum(v.numel() * v.element_size() for v in out.values())
    print(f"{args.input} -> {args.output}")
    print(f"  tensors: {len(out)}, elements: {n_el}, data bytes: {n_bytes}")
    print(f"  dtypes in : {dict(before)}")
    print(f"  dtypes out: {dict(after)}")
    for k in sorted(out)[:6]:
        print(f"  {k}: {str(out[k].dtype).replace('torch.', '')} {list(out[k].shape)}")
    if len(out) > 6:
        print(f"  ... ({len(out) - 6} more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
