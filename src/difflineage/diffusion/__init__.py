"""The Gaussian diffusion process (schedules, noising, posterior, losses, respacing) and its samplers."""

from difflineage.diffusion.config import DiffusionConfig
from difflineage.diffusion.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from difflineage.diffusion.gaussian import SAMPLERS, GaussianDiffusion, LossWeighting, Prediction, Sampler, Variance
from difflineage.diffusion.guidance import guided
from difflineage.diffusion.schedules import cosine_betas, linear_betas, make_betas, space_timesteps

__all__ = ["SAMPLERS", "DiffusionConfig", "GaussianDiffusion", "LossWeighting", "Prediction", "Sampler", "Variance", "cosine_betas",
           "dpm_solver_pp_2m", "dpm_solver_timesteps", "guided", "linear_betas", "make_betas", "space_timesteps"]
