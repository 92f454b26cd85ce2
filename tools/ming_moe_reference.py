"""A faithful PyTorch re-statement of MING-MOE's mixture-of-LoRA linear layer.

Source studied: MediaBrain-SJTU/MING, branch ``ming-moe``, ``ming/model/utils.py``,
class ``MoLoRALinear`` (methods ``molora_helper`` = eval path, ``molora_helper2`` =
training path).  This module is written independently; it reproduces the numbers
and the parameter names, not the code.

What MING does (and therefore what this class does):

* The layer *is* an ``nn.Linear`` (it subclasses it), so the frozen base weight and
  bias are ``<prefix>.weight`` / ``<prefix>.bias``; there is no ``base_layer`` level.
* Router ``<prefix>.switch``: ``nn.Linear(in, E)`` with bias (PyTorch default).
* Experts ``<prefix>.experts`` = ``nn.ModuleList`` of ``nn.ModuleDict``; entry i holds
  ``lora_A_{i}`` (Linear(in, r, bias=False)) and ``lora_B_{i}`` (Linear(r, out,
  bias=False)), both float32.  State-dict keys therefore read
  ``<prefix>.experts.{i}.lora_A_{i}.weight`` and ``<prefix>.experts.{i}.lora_B_{i}.weight``.
* scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
* Eval forward: ``logits = switch(x)`` (in x's own dtype); ``(w, ids) = topk(logits, k)``;
  ``w = softmax(w)`` over the k; x cast to float32; for every expert i the tokens that
  picked it get ``w * scaling * B_i(A_i(dropout(x)))`` added by index into a float32
  accumulator; the sum is cast back to x's dtype and added to ``F.linear(x, W, b)``.
  If the module is in eval mode and the sequence length N == 1 (MING asserts the batch is
  1 too), a "single token" path loops over the k selected experts only.
* Training forward (``molora_helper2``): all E experts computed densely, the k selected
  gathered, weights softmax over their logits -> the same output.
* ``expert_selection == "sampling"``: eval draws k distinct experts with
  ``multinomial(exp(logits))``; training with ``multinomial(softmax(logits))`` (same
  distribution); weights are the softmax over the drawn experts' logits.

Not reproduced: ``share_expert`` (broken in that version of MING: the eval path ignores the
shared expert and the training path looks up ``lora_B_{i}`` with an index shifted by one),
the router losses (``use_logit_sum`` / ``use_lbl_loss``; note that with ``use_lbl_loss``
MING's forward returns the base output *without* the adapter delta) and
``fan_in_fan_out``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MingMoLoRALinear", "wrap_linear", "routing_reference"]


class MingMoLoRALinear(nn.Linear):
    """Frozen ``nn.Linear`` + MING-MOE router + E LoRA experts (top-k or sampling)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 8,
        num_experts_per_token: int = 2,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        expert_selection: str = "topk",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise ValueError("r must be positive")
        if not 1 <= num_experts_per_token <= num_experts:
            raise ValueError("need 1 <= num_experts_per_token <= num_experts")
        if expert_selection not in ("topk", "sampling"):
            raise ValueError(f"unknown expert_selection {expert_selection!r}")
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.expert_selection = expert_selection
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

        if num_experts > 1:
            self.switch = nn.Linear(in_features, num_experts, bias=True, device=device, dtype=dtype)
        self.experts = nn.ModuleList()
        for i in range(num_experts):
            pair = nn.ModuleDict()
            pair[f"lora_A_{i}"] = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
            pair[f"lora_B_{i}"] = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
            self.experts.append(pair)
        self.reset_lora_parameters()

    # -- parameters -----------------------------------------------------------------
    def reset_lora_parameters(self) -> None:
        """PEFT/MING init: A kaiming-uniform(a=sqrt 5), B zero."""
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.A(i).weight, a=math.sqrt(5))
            nn.init.zeros_(self.B(i).weight)

    def A(self, i: int) -> nn.Linear:
        return self.experts[i][f"lora_A_{i}"]

    def B(self, i: int) -> nn.Linear:
        return self.experts[i][f"lora_B_{i}"]

    def expert_delta(self, i: int, x32: torch.Tensor) -> torch.Tensor:
        """scaling * B_i(A_i(dropout(x))) in float32."""
        return self.B(i)(self.A(i)(self.lora_dropout(x32))) * self.scaling

    # -- routing --------------------------------------------------------------------
    def route(self, x2d: torch.Tensor, sample: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (ids [T,k] int64 in topk order, weights [T,k]) for rows of x2d.

        Top-k is taken on the raw logits and the softmax is over the k selected logits,
        which equals softmax -> top-k -> renormalise.  Ids come in the order
        ``torch.topk`` returns them (descending logit).
        """
        k = self.num_experts_per_token
        logits = self.switch(x2d)
        sampling = (self.expert_selection == "sampling") if sample is None else sample
        if sampling:
            probs = logits.exp() if not self.training else F.softmax(logits, dim=-1)
            ids = torch.multinomial(probs, k, replacement=False)
            sel = torch.gather(logits, 1, ids)
        else:
            sel, ids = torch.topk(logits, k, dim=-1)
        return ids, F.softmax(sel, dim=-1)

    # -- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        if self.num_experts <= 1:
            return base + self.expert_delta(0, x.to(torch.float32)).to(base.dtype)
        squeeze = x.dim() == 2  # accept [T, in] as one sequence of T tokens
        x3 = x.unsqueeze(0) if squeeze else x
        delta = self._dense(x3) if self.training else self._sparse(x3)
        if squeeze:
            delta = delta.squeeze(0)
        return base + delta

    def _sparse(self, x3: torch.Tensor) -> torch.Tensor:
        """MING's eval helper: grouped by expert, or the single-token loop."""
        bsz, n, d = x3.shape
        in_dtype = x3.dtype
        x2 = x3.reshape(-1, d)
        ids, w = self.route(x2)
        x32 = x2.to(torch.float32)
        acc = torch.zeros(bsz * n, self.out_features, dtype=torch.float32, device=x2.device)
        if n == 1 and not self.training:
            # single token (decode): only the k selected experts run
            assert bsz == 1, "MING's single-token path asserts batch size 1"
            for slot in range(ids.shape[1]):
                e = int(ids[0, slot])
                acc += w[0, slot].to(torch.float32) * self.expert_delta(e, x32)
        else:
            for e in range(self.num_experts):
                tok, slot = torch.where(ids == e)
                if tok.numel() == 0:
                    continue
                contrib = w[tok, slot].unsqueeze(1).to(torch.float32) * self.expert_delta(e, x32[tok])
                acc.index_add_(0, tok, contrib)
        return acc.reshape(bsz, n, self.out_features).to(in_dtype)

    def _dense(self, x3: torch.Tensor) -> torch.Tensor:
        """MING's training helper: every expert on every token, then gather the k."""
        bsz, n, d = x3.shape
        in_dtype = x3.dtype
        x32 = x3.reshape(-1, d).to(torch.float32)
        ids, w = self.route(x32)
        all_out = torch.stack([self.expert_delta(e, x32) for e in range(self.num_experts)], dim=1)
        picked = torch.gather(all_out, 1, ids.unsqueeze(-1).expand(-1, -1, self.out_features))
        out = torch.einsum("tk,tko->to", w.to(torch.float32), picked)
        return out.reshape(bsz, n, self.out_features).to(in_dtype)

    # -- helpers --------------------------------------------------------------------
    def molora_state_dict(self, prefix: str) -> Dict[str, torch.Tensor]:
        """The tensors MING stores in non_lora_trainables.bin for this layer."""
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("experts.") or name.startswith("switch."):
                out[f"{prefix}.{name}"] = t.detach().clone()
        return out


def wrap_linear(base: nn.Linear, **kw) -> MingMoLoRALinear:
    """Build a MingMoLoRALinear that shares (copies) base's weight and bias."""
    m = MingMoLoRALinear(base.in_features, base.out_features, bias=base.bias is not None,
                         dtype=base.weight.dtype, **kw)
    with torch.no_grad():
        m.weight.copy_(base.weight)
        if base.bias is not None:
            m.bias.copy_(base.bias)
    return m


def routing_reference(logits, k):
    """numpy top-k / softmax-over-k (ties -> lower index); for independent checks."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    sel = np.take_along_axis(logits, ids, axis=1)
    e = np.exp(sel - sel.max(axis=1, keepdims=True))
    return ids, e / e.sum(axis=1, keepdims=True)


if __name__ == "__main__":  # quick self-check: sparse == dense == single-token
    torch.manual_seed(0)
    m = MingMoLoRALinear(16, 12, num_experts=4, num_experts_per_token=2, r=4, lora_alpha=8, bias=False)
    for i in range(4):
        nn.init.normal_(m.B(i).weight, std=0.3)
    x = torch.randn(2, 5, 16)
    m.eval()
    with torch.no_grad():
        ys = m(x)
        yd = F.linear(x, m.weight) + m._dense(x)
        y1 = torch.cat([m(x[0:1, t:t + 1]) for t in range(5)], dim=1)
    print("sparse vs dense", (ys - yd).abs().max().item(), "single vs sparse", (y1 - ys[0:1]).abs().max().item())
