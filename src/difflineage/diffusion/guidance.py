"""Classifier-free guidance (Ho & Salimans 2022): one network trained with its condition sometimes dropped
predicts both the conditional and the unconditional output; sampling extrapolates from the second to the
first by the guidance scale s: out = uncond + s (cond - uncond). s = 1 is the conditional model."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def guided(model_fn: Callable[..., torch.Tensor], scale: float, cond: dict, null: dict,
           guide_channels: Optional[int] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t, **cond)`` -> a function of (x, t) that applies guidance.

    The conditional and unconditional halves run as one doubled batch. Only the first ``guide_channels``
    output channels (the prediction) are guided; any further channels (a learned variance) are taken from
    the conditional half. ``cond`` and ``null`` hold batched tensors or lists of the same keys.
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, **cond)

    both = {k: _concat(cond[k], null[k]) for k in cond}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        c, u = out.chunk(2)
        k = guide_channels if guide_channels is not None else c.shape[1]
        return torch.cat([u[:, :k] + scale * (c[:, :k] - u[:, :k]), c[:, k:]], dim=1)

    return fn


def _concat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, list):
        return a + b
    if a is None and b is None:
        return None
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")
