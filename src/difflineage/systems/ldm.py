"""Latent diffusion (Rombach et al. 2022), Stable Diffusion's design: diffusion in the latent space of a
separately trained KL autoencoder, with text entering the UNet through cross-attention.

Three parts: the first stage (``model.first_stage``: an ``autoencoder_kl`` checkpoint of this project, or a
Stable Diffusion VAE file as ``sd-vae:PATH``), frozen; the text encoder (trained with the UNet, as LDM's own
text-to-image models were); the UNet over latents. Latents are scaled by 1 / std measured on the training
data (LDM's ``scale_by_std``; SD's 0.18215 is that number for its VAE), and the scale is a buffer, so the
checkpoint carries it. The posterior moments of every training image are computed once before training
(``model.cache_latents``) and each step draws z from them, as encoding would.

A checkpoint holds all three parts, so it samples without the first stage's own files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from difflineage.config import Config
from difflineage.data import Batch, ImageDataset
from difflineage.errors import ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.systems.ddpm import DDPMConfig, DDPMSystem
from difflineage.systems.first_stage import EncodedTrainingSet, autoencoder_architecture, autoencoder_weights
from difflineage.weights import load_state_dict_strict


@dataclass
class LDMConfig(DDPMConfig):
    """:param first_stage: the frozen autoencoder: a checkpoint (or run) directory of an ``autoencoder_kl``
    system, or ``sd-vae:PATH`` for Stable Diffusion VAE weights (LDM or diffusers layout).
    :param autoencoder: its architecture; filled in from ``first_stage`` when training starts.
    :param sd_vae_norm_groups: GroupNorm groups of an SD VAE file (not stored in the weights; 32 for SD)."""

    first_stage: str = ""
    autoencoder: Optional[AutoencoderKLConfig] = None
    sd_vae_norm_groups: int = 32
    cache_latents: bool = True


class LDMSystem(DDPMSystem):
    name = "ldm"
    ModelConfig = LDMConfig

    def __init__(self, config: Config):
        if config.model.autoencoder is None:
            raise ConfigError("model.autoencoder is not set: name the first stage with model.first_stage "
                              "(an autoencoder_kl checkpoint or sd-vae:PATH); training fills the architecture in")
        self._ae_cfg = config.model.autoencoder
        super().__init__(config)
        self.first_stage = AutoencoderKL(config.model.autoencoder, image_channels=config.data.channels or 1)
        self.first_stage.requires_grad_(False)
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self._cache: Optional[EncodedTrainingSet] = None

    # -- resolving and loading the first stage ---------------------------------------------------

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """Read the first stage's architecture from its checkpoint or file into model.autoencoder."""
        m = config.model
        if not m.first_stage:
            if m.autoencoder is None:
                raise ConfigError("model.first_stage is empty: train an autoencoder first "
                                  "(difflineage train autoencoder-mnist) and set model.first_stage=RUN_DIR, "
                                  "or give a Stable Diffusion VAE as model.first_stage=sd-vae:PATH")
            return config
        ae_cfg, channels = autoencoder_architecture(m.first_stage, m.sd_vae_norm_groups)
        if channels != (config.data.channels or 1):
            raise ConfigError(f"the first stage {m.first_stage} reads {channels}-channel images but data.channels="
                              f"{config.data.channels}; make them agree")
        if m.autoencoder is not None and m.autoencoder != ae_cfg:
            raise ConfigError(f"model.autoencoder differs from the architecture of {m.first_stage}; leave it unset")
        return replace(config, model=replace(m, autoencoder=ae_cfg))

    def prepare(self, dataset: ImageDataset) -> None:
        """Load the frozen first stage, cache the training images' posterior moments, measure the latent scale."""
        if not self.config.model.first_stage:
            raise ConfigError("model.first_stage is empty: nothing to load the autoencoder from")
        state = autoencoder_weights(self.config.model.first_stage, self.config.model.sd_vae_norm_groups)
        load_state_dict_strict(self.first_stage, state, self.config.model.first_stage)
        self.cache_posteriors(dataset, measure_scale=True)

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.first_stage.encode(x)
        return mean.float(), logvar.float()

    def cache_posteriors(self, dataset: ImageDataset, measure_scale: bool) -> None:
        """Keep the training images' posterior moments (``model.cache_latents``; encoded once, at the first
        training batch) and, with ``measure_scale``, set the latent scale now to 1 / std of one draw of them."""
        encoded = EncodedTrainingSet(self._posterior, dataset, self.device, batch=250)
        if measure_scale:
            mean, logvar = encoded.compute()
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)).to(mean.device)
            self.latent_scale.fill_(1.0 / z.std().item())
        self._cache = encoded if self.config.model.cache_latents else None

    # -- the latent space -------------------------------------------------------------------------

    clip_denoised = False  # scaled latents have unit variance, not a [-1, 1] range: clipping would cut them

    def model_space(self) -> tuple[int, int]:
        f = 2 ** (len(self._ae_cfg.channels) - 1)
        if self.config.data.image_size % f:
            raise ConfigError(f"data.image_size={self.config.data.image_size} is not divisible by the first stage's "
                              f"downsampling factor {f}")
        return self._ae_cfg.latent_channels, self.config.data.image_size // f

    def to_model_space(self, batch: Batch) -> torch.Tensor:
        """z ~ q(z|x), scaled: from the cache while training on the prepared data, by encoding otherwise."""
        if self._cache is not None and self.training and batch.get("index") is not None:
            mean, logvar = self._cache.lookup(batch["index"])
        else:
            with torch.no_grad():
                mean, logvar = self._posterior(batch["image"])
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.latent_scale

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(z / self.latent_scale).float().clamp(-1, 1)

    def pictures(self, dataset: ImageDataset, out_dir, generator: Optional[torch.Generator] = None) -> dict:
        """Held-out images beside their first-stage reconstructions (what the diffusion model can reach at best)."""
        x = self.spread_images(dataset)
        with torch.no_grad():
            mean, _ = self.first_stage.encode(x)
            recon = self.first_stage.decode(mean).float().clamp(-1, 1)
        return {"first-stage reconstructions": self.save_reconstructions(x, recon, out_dir)}

    def bpd_space(self) -> str:
        return "latents (the bound of the latent model; not comparable with pixel bits/dim)"

    def forward_passes(self):
        passes = super().forward_passes()
        z = torch.zeros(1, self.channels, self.side, self.side, device=self.device)
        passes["sampling: first-stage decoder (one image, once)"] = lambda: self.first_stage.decode(z)
        return passes
