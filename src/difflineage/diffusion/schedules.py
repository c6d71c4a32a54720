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


def scaled_linear_betas(num_timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """Latent diffusion's and Stable Diffusion's: betas whose square roots rise linearly from sqrt(start) to
    sqrt(end) (diffusers' ``scaled_linear``)."""
    return np.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=np.float64) ** 2


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    if schedule == "scaled_linear":
        return scaled_linear_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose linear, cosine or scaled_linear")


SPACINGS = ("leading", "linspace", "trailing")


def diffusers_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", offset: int = 1,
                        solver: bool = False) -> list[int]:
    """The timesteps diffusers' schedulers visit, ascending, by their ``timestep_spacing`` (T train steps, K steps):

    * ``leading``: r, 2r, ..., plus ``steps_offset``: for DDIM r = T // K starting at 0 (SD's 20 steps: 1, 51, ...,
      951); for DPM-Solver++ (``solver``) r = T // (K + 1) starting at r;
    * ``linspace``: round(linspace(0, T - 1, K)) for DDIM; for the solver the top K of round(linspace(0, T - 1, K + 1));
    * ``trailing``: round(arange(T, 0, -T / K)) - 1.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot take {steps} steps out of {num_timesteps}")
    t = num_timesteps
    if spacing == "leading":
        ratio = t // (steps + 1) if solver else t // steps
        picked = [k * ratio + offset for k in range(1 if solver else 0, steps + (1 if solver else 0))]
    elif spacing == "linspace":
        picked = np.linspace(0, t - 1, steps + 1 if solver else steps).round().astype(np.int64).tolist()
        picked = picked[1:] if solver else picked
    else:
        picked = sorted((np.round(np.arange(t, 0, -t / steps)).astype(np.int64) - 1).tolist())
    if len(set(picked)) != steps or picked[0] < 0 or picked[-1] >= t:
        raise ValueError(f"{steps} steps with {spacing} spacing (offset {offset}) do not fit in {t} timesteps")
    return sorted(picked)


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """The original timesteps a respaced sampler visits, ascending, as improved-diffusion's ``space_timesteps``
    chooses them (the DiT code respaces with it).

    ``steps`` = K (int or "K"): K steps spread over 0..T-1, first and last included, each the rounding of a running
    sum of the stride (T - 1) / (K - 1); "K1,K2,...": the timesteps cut into that many equal sections (the first
    ones one longer when T does not divide), K1 steps spread over the first, and so on; "ddimK": the strided steps
    0, s, 2s, ... with the smallest stride s that gives exactly K of them (refused when none does). One deliberate
    difference: K = 1 visits T - 1, the pure-noise end, where improved-diffusion would visit 0.
    """
    if isinstance(steps, str) and steps.startswith("ddim"):
        k = int(steps[4:])
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == k:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no stride takes exactly {k} DDIM steps out of {num_timesteps}; choose another count, or "
                         f"give {k} (without 'ddim') for evenly spread steps")
    sections = [int(x) for x in steps.split(",")] if isinstance(steps, str) else [int(steps)]
    if sections == [1]:
        if num_timesteps < 1:
            raise ValueError(f"cannot take 1 step out of {num_timesteps}")
        return [num_timesteps - 1]
    base, extra = divmod(num_timesteps, len(sections))
    taken, start = [], 0
    for i, k in enumerate(sections):
        size = base + (1 if i < extra else 0)
        if not 1 <= k <= size:
            whole = f"section {i + 1} ({size} timesteps)" if len(sections) > 1 else str(num_timesteps)
            raise ValueError(f"cannot take {k} steps out of {whole}; choose 1..{size}")
        stride = (size - 1) / (k - 1) if k > 1 else 1.0
        position = 0.0
        for _ in range(k):
            taken.append(start + round(position))
            position += stride
        start += size
    return sorted(set(taken))
