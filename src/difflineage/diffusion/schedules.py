"""Noise schedules (in float64, as improved-diffusion computes them) and timestep respacing."""

from __future__ import annotations

import math

import numpy as np


def linear_betas(num_timesteps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020): betas rising linearly from ``start`` to ``end`` (1e-4..0.02 at T = 1000; for other T the
    ends are scaled by 1000 / T, as improved-diffusion does, so the total noise stays comparable)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(start * scale, end * scale, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas clipped at 0.999."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose linear or cosine")


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """The original timesteps a respaced sampler visits, ascending.

    ``steps`` = K (int or "K"): K steps evenly spread over 0..T-1, first and last included (improved-diffusion's
    spacing for one section); "ddimK": the strided steps 0, T/K, 2T/K, ... that DDIM uses.
    """
    if isinstance(steps, str) and steps.startswith("ddim"):
        k = int(steps[4:])
        stride = num_timesteps // k
        if k < 1 or stride < 1:
            raise ValueError(f"cannot take {k} DDIM steps out of {num_timesteps}")
        return list(range(0, num_timesteps, stride))[:k]
    k = int(steps)
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"cannot take {k} steps out of {num_timesteps}; choose 1..{num_timesteps}")
    if k == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (k - 1)
    return sorted({round(i * stride) for i in range(k)})
