"""Activations written for speed where the compiler can use it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, ``F.gelu(x, approximate="tanh")`` (DiT's MLP activation).

    Under ``torch.compile`` it is written as ``x * sigmoid(2u)`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)``: the
    same function, since ``(1 + tanh(u)) / 2 = sigmoid(2u)``, equal to float rounding. Inductor fuses that into one
    exp-based kernel, which on the CPU runs the forward pass 2.3-2.5x and forward plus backward 1.6-1.8x faster
    than its tanh kernel (``benchmarks/bench_gelu.py``; about 4% of a compiled DiT-B/2 bf16 training step). Run
    eagerly the separate operations would cost more memory traffic than they save, so eager mode keeps ``F.gelu``.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")
