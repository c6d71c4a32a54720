"""LoRA (Hu et al. 2022): a frozen linear layer W plus a trained low-rank update (alpha / r) B A, B initialised to
zero so that training starts from the frozen network exactly.

The project's attention keeps q, k and v in one stacked projection (``qkv``; ``kv`` in cross-attention). An adapter
on such a layer has one (A, B) pair per stacked part, the same parameters as separate adapters on ``to_q``, ``to_k``
and ``to_v`` (diffusers' and peft's layout), so a rank-r adapter means the same thing here as there. ``merge``
folds the update into W and unwraps the layer.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from difflineage.nn.attention import Attention


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) [B_1 A_1 x; ...; B_p A_p x]`` over ``parts`` equal row blocks of the base's output."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None, parts: int = 1):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank {rank} must be at least 1")
        if base.out_features % parts:
            raise ValueError(f"a {base.out_features}-wide layer does not split into {parts} parts")
        self.base = base
        base.requires_grad_(False)
        self.rank, self.parts = rank, parts
        self.scale = (alpha if alpha is not None else rank) / rank
        out = base.out_features // parts
        self.lora_a = nn.ParameterList([nn.Parameter(torch.empty(rank, base.in_features)) for _ in range(parts)])
        self.lora_b = nn.ParameterList([nn.Parameter(torch.zeros(out, rank)) for _ in range(parts)])
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The update of the weight, (out, in)."""
        return self.scale * torch.cat([b @ a for a, b in zip(self.lora_a, self.lora_b)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.cat([nn.functional.linear(nn.functional.linear(x, a), b) for a, b in zip(self.lora_a, self.lora_b)],
                        dim=-1)
        return self.base(x) + self.scale * low

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in."""
        with torch.no_grad():
            self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def _targets(attn: Attention) -> list[tuple[str, int]]:
    return ([("q", 1), ("kv", 2)] if attn.cross else [("qkv", 3)]) + [("proj", 1)]


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None,
             only: Optional[Iterable[type]] = None) -> int:
    """Freeze ``model`` and wrap every attention projection (q, k, v and output) of its ``Attention`` modules (those
    inside modules of the types ``only``, when given) in a rank-``rank`` adapter. Returns the adapted layers."""
    model.requires_grad_(False)
    count = 0
    holders = [m for m in model.modules() if isinstance(m, tuple(only))] if only else [model]
    seen: set[int] = set()
    for holder in holders:
        for attn in holder.modules():
            if not isinstance(attn, Attention) or id(attn) in seen:
                continue
            seen.add(id(attn))
            for name, parts in _targets(attn):
                layer = getattr(attn, name)
                if isinstance(layer, nn.Linear):
                    setattr(attn, name, LoRALinear(layer, rank, alpha, parts))
                    count += 1
    return count


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone (what a LoRA checkpoint keeps)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer and unwrap it (the plain network again, updated). Returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                count += 1
    return count


__all__ = ["LoRALinear", "add_lora", "lora_state_dict", "merge_lora"]
