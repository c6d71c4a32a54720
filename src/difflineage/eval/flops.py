"""Counting a model's arithmetic with PyTorch's own FlopCounterMode.

The papers of the lineage count differently, so both units are reported, named without ambiguity:

- ``macs``: multiply-accumulates. This is what the DiT paper calls "Gflops" (fvcore's convention), and
  what DyDiT's FLOPs ratios are ratios of.
- ``flops``: floating-point operations, 2 per multiply-accumulate, as FlopCounterMode counts them.

Only the operations FlopCounterMode knows are counted: matrix products, convolutions and attention
(scaled_dot_product_attention); element-wise work (activations, norms, additions) is not, as in fvcore.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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


@contextmanager
def flops_per_call(module: torch.nn.Module) -> Iterator[list[dict[str, int]]]:
    """Count the arithmetic of every call of ``module`` while the context is open; yields a list that gets
    one entry per call: ``t`` (the first timestep of the call's second positional argument, when it has one),
    ``batch`` (the first argument's length) and ``macs`` (for the whole batch). For a dynamic network (DyDiT)
    this is what each sampler step really computed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    records: list[dict[str, int]] = []
    open_: list = []

    def before(mod, args):
        ctx = (sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False, depth=None))
        for c in ctx:
            c.__enter__()
        open_.append(ctx)

    def after(mod, args, out):
        kernel, counter = open_.pop()
        counter.__exit__(None, None, None)
        kernel.__exit__(None, None, None)
        t = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].numel() else None
        records.append({"t": int(t.flatten()[0]) if t is not None else -1, "batch": len(args[0]),
                        "macs": counter.get_total_flops() // 2})

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def sampling_macs(system: Any, n: int, seed: int = 0, **sample_options: Any) -> list[tuple[int, float]]:
    """Draw ``n`` samples (the classes in turn) while counting the denoising network's arithmetic; returns one
    ``(t, MACs per image)`` per network call, i.e. per sampler step (guided: both halves counted)."""
    labels = torch.arange(n) % system.num_classes if system.num_classes else None
    with flops_per_call(system.net) as calls:
        system.sample(n, condition=labels, generator=torch.Generator().manual_seed(seed), **sample_options)
    return [(c["t"], c["macs"] / c["batch"]) for c in calls]
