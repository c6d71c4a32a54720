"""The diffusion settings of a config (``model.diffusion``): the process and the default sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from difflineage.diffusion.gaussian import GaussianDiffusion
from difflineage.diffusion.schedules import make_betas
from difflineage.errors import ConfigError


@dataclass
class DiffusionConfig:
    """:param schedule: linear (1e-4..0.02, DDPM and DiT), cosine, or scaled_linear (Stable Diffusion's).
    :param prediction: what the network predicts: eps (noise), x0 or v.
    :param variance: fixed_small, fixed_large, or learned_range (the hybrid loss of improved-diffusion and DiT).
    :param loss_weighting: none, or min_snr (Hang et al. 2023, faster convergence).
    :param sampler, sample_steps, eta, guidance: sampling defaults (overridable per call); sampler ddpm, ddim or
        dpmpp_2m (DPM-Solver++(2M), for 10-20 steps)."""

    schedule: Literal["linear", "cosine", "scaled_linear"] = "linear"
    timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    variance: Literal["fixed_small", "fixed_large", "learned_range"] = "fixed_small"
    loss_weighting: Literal["none", "min_snr"] = "none"
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0

    def check(self) -> None:
        if self.timesteps < 2:
            raise ConfigError(f"diffusion.timesteps={self.timesteps} must be at least 2")
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ConfigError(f"diffusion.sample_steps={self.sample_steps} must lie in 1..{self.timesteps}")
        if self.eta < 0 or self.guidance < 0:
            raise ConfigError("diffusion.eta and diffusion.guidance must be 0 or more")

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(make_betas(self.schedule, self.timesteps), self.prediction, self.variance,
                                 self.loss_weighting)
