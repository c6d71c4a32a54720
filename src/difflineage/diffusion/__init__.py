"""The Gaussian diffusion process (schedules, noising, posterior, losses, respacing) and its samplers."""

from difflineage.diffusion.config import DiffusionConfig
from difflineage.diffusion.gaussian import GaussianDiffusion, LossWeighting, Prediction, Variance
from difflineage.diffusion.guidance import guided
from difflineage.diffusion.schedules import cosine_betas, linear_betas, make_betas, space_timesteps

__all__ = ["DiffusionConfig", "GaussianDiffusion", "LossWeighting", "Prediction", "Variance", "guided", "cosine_betas", "linear_betas",
           "make_betas", "space_timesteps"]
