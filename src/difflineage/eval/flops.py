"""Counting a model's arithmetic with PyTorch's own FlopCounterMode.

The papers of the lineage count differently, so both units are reported, named without ambiguity:

- ``macs``: multiply-accumulates. This is what the DiT paper calls "Gflops" (fvcore's convention), and
  what DyDiT's FLOPs ratios are ratios of.
- ``flops``: floating-point operations, 2 per multiply-accumulate, as FlopCounterMode counts them.

Only the operations FlopCounterMode knows are counted: matrix products, convolutions and attention
(scaled_dot_product_attention); element-wise work (activations, norms, additions) is not, as in fvcore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class FlopCount:
    flops: int  # floating-point operations (2 per multiply-accumulate)
    by_module: dict[str, int] = field(default_factory=dict)  # flops per top-level module

    @property
    def macs(self) -> int:
        """Multiply-accumulates: the DiT paper's "Gflops" unit, times 1e9."""
        return self.flops // 2

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "flops": self.flops, "gmacs": round(self.gmacs, 6), "gflops": round(self.gflops, 6)}


@torch.no_grad()
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Run ``fn(*args, **kwargs)`` once under FlopCounterMode and return what it computed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; the math backend spells
    # attention out as two batched matrix products, which it counts (same arithmetic, any device).
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False, depth=1) as counter:
        fn(*args, **kwargs)
    total = counter.get_total_flops()
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and name.count(".") == 1:  # "Module.child": the first level below the root
            per_module[name.split(".", 1)[1]] = int(sum(ops.values()))
    return FlopCount(flops=int(total), by_module=per_module)
