"""Interoperability with weights trained elsewhere: Stable Diffusion's VAE (LDM and diffusers layouts) and DiT
(the official checkpoints and diffusers' DiTTransformer2DModel)."""

from difflineage.interop.dit import (
    diffusers_to_dit,
    dit_to_diffusers,
    load_diffusers_dit,
    load_official_dit,
    save_official_dit,
)
from difflineage.interop.sd_vae import (
    detect_layout,
    diffusers_to_ldm,
    infer_sd_vae_config,
    ldm_to_diffusers,
    load_sd_vae,
    save_sd_vae,
)

__all__ = ["detect_layout", "diffusers_to_ldm", "infer_sd_vae_config", "ldm_to_diffusers", "load_sd_vae",
           "save_sd_vae", "diffusers_to_dit", "dit_to_diffusers", "load_diffusers_dit", "load_official_dit",
           "save_official_dit"]
