"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"):
the multistep second-order solver of the diffusion ODE in its data-prediction form, the few-step sampler that keeps
guided samples sharp at 10-20 network evaluations.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t), one
step from s to t (h = lambda_t - lambda_s) given the model's data prediction x0_s is the exact solution of the
linear part plus an exponential integrator of x0 (eq. 10 of the paper):

    first order (DDIM):   x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s
    second order (2M):    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2),
                          D0 = x0_s,  D1 = (x0_s - x0_prev) / r,  r = h_prev / h     (the "midpoint" form)

where x0_prev is the data prediction of the step before. The first step has no earlier prediction and takes the
first-order step; the last step goes to sigma = 0 and returns the data prediction itself, as diffusers'
``DPMSolverMultistepScheduler`` does with ``final_sigmas_type="zero"`` (tests/test_dpm_solver.py checks every step
against it). Timesteps are spaced as its ``linspace`` spacing: ``round(linspace(0, T - 1, K + 1))[::-1][:-1]``.

A learned-variance model's variance channels are dropped: the ODE needs only the mean prediction. Guidance acts
before the solver, on the model output (``guided``), as for the other samplers.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from difflineage.diffusion.schedules import diffusers_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dpm_solver_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The K timesteps the solver visits, ascending: diffusers' ``linspace`` spacing (the top one is T - 1)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DPM-Solver++ takes 1 to {num_timesteps} steps, not {steps}")
    try:
        return diffusers_timesteps(num_timesteps, steps, "linspace", solver=True)
    except ValueError:
        raise ValueError(f"{steps} steps do not fit in {num_timesteps} timesteps without repeating one") from None


def data_prediction(chain, out: torch.Tensor, x: torch.Tensor, i: int,
                    clip_denoised: bool) -> torch.Tensor:
    """The model's prediction of x_0 at step ``i`` of ``chain`` (a GaussianDiffusion; eps, x0 or v prediction; variance channels dropped)."""
    pred, _ = chain.split_output(out.float(), x.shape[1])
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    kind = chain.prediction.value
    x0 = chain.x0_from_eps(x, t, pred) if kind == "eps" else pred if kind == "x0" else chain.x0_from_v(x, t, pred)
    return x0.clamp(-1, 1) if clip_denoised else x0


@torch.no_grad()
def dpm_solver_pp_2m(chain, model_fn: ModelFn, x: torch.Tensor, clip_denoised: bool = False,
                     progress: bool = False, on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Solve from x (noise at the chain's top step) to x_0 over the chain's K steps (K network evaluations).
    ``chain``: the respaced diffusion whose steps are the timesteps to visit; ``on_step(i, x)`` sees each new x."""
    abar = chain.alphas_cumprod  # float64, one per kept timestep
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    n = chain.num_timesteps
    previous: Optional[torch.Tensor] = None
    for i in tqdm(range(n - 1, -1, -1), desc=f"dpm-solver++ {n} steps", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = data_prediction(chain, model_fn(x, chain.model_timesteps(t)), x, i, clip_denoised)
        if i == 0:  # to sigma = 0: the data prediction itself
            x = x0
        else:
            h = lam[i - 1] - lam[i]
            phi = float(np.expm1(-h))  # e^{-h} - 1
            update = x0
            if previous is not None:  # second order: the finite difference of the last two predictions
                r = (lam[i] - lam[i + 1]) / h
                update = x0 + (x0 - previous) / (2.0 * r)
            x = float(sigma[i - 1] / sigma[i]) * x - float(alpha[i - 1] * phi) * update
        previous = x0
        if on_step is not None:
            on_step(i, x)
    return x


__all__ = ["data_prediction", "dpm_solver_pp_2m", "dpm_solver_timesteps"]
