"""Latent diffusion (Rombach et al. 2022), Stable Diffusion's design: the diffusion system with a UNet denoiser in
the latent space of a separately trained, frozen KL autoencoder (``systems/spaces.py: LatentSpace``), with text
entering the UNet through cross-attention.

Three parts: the first stage (``model.first_stage``: an ``autoencoder_kl`` checkpoint of this project, or a
Stable Diffusion VAE file as ``sd-vae:PATH``), frozen; the text encoder (trained with the UNet, as LDM's own
text-to-image models were); the UNet over latents. A checkpoint holds all three, so it samples without the first
stage's own files.
"""

from __future__ import annotations

from dataclasses import dataclass

from difflineage.config import Config
from difflineage.systems.ddpm import DDPMConfig, UNetDenoiser
from difflineage.systems.diffusion import DiffusionSystem, LatentSpaceFields
from difflineage.systems.spaces import LatentSpace


@dataclass
class LDMConfig(DDPMConfig, LatentSpaceFields):
    """The UNet, the process and the conditioning (``DDPMConfig``), and the first stage (``LatentSpaceFields``)."""


class LDMSystem(UNetDenoiser, DiffusionSystem):
    """A UNet in a frozen first stage's latents (always: an LDM with no first stage is refused by name)."""

    name = "ldm"
    title = "Latent diffusion"
    ModelConfig = LDMConfig

    @classmethod
    def space_class(cls, config: Config) -> type:
        return LatentSpace
