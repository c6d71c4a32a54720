"""Interoperability with weights trained elsewhere: Stable Diffusion's VAE in the LDM and diffusers layouts."""

from difflineage.interop.sd_vae import (
    detect_layout,
    diffusers_to_ldm,
    infer_sd_vae_config,
    ldm_to_diffusers,
    load_sd_vae,
    save_sd_vae,
)

__all__ = ["detect_layout", "diffusers_to_ldm", "infer_sd_vae_config", "ldm_to_diffusers", "load_sd_vae",
           "save_sd_vae"]
