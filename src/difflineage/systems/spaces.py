"""The spaces a diffusion system can run in: pixels, or the scaled latent space of a frozen first stage.

A space turns a training batch into the tensors the diffusion runs on (``encode``) and samples back into images
(``decode``), says whether the sampler may clip its x_0 estimate to [-1, 1] (pixels: yes; unit-variance latents:
no) and holds whatever the space needs (the frozen autoencoder and the latent scale). Any denoiser (UNet, DiT,
DyDiT) runs in either.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from difflineage.config import Config
from difflineage.data import Batch, ImageDataset
from difflineage.errors import ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKL
from difflineage.systems.base import save_reconstructions, spread_images
from difflineage.systems.first_stage import (
    EncodedTrainingSet,
    autoencoder_architecture,
    autoencoder_weights,
    trains_from_store,
)
from difflineage.weights import load_state_dict_strict


class PixelSpace(nn.Module):
    """The images themselves, in [-1, 1]."""

    clip_denoised = True  # pixels live in [-1, 1], so the sampler may clip its x_0 estimate there
    bpd_space = "pixels"

    def __init__(self, config: Config):
        super().__init__()
        self.shape = self.shape_of(config)

    @staticmethod
    def shape_of(config: Config) -> tuple[int, int]:
        """(channels, side) of the images."""
        return config.data.channels or 1, config.data.image_size

    @staticmethod
    def resolve_config(config: Config) -> Config:
        return config

    def prepare(self, dataset: ImageDataset) -> None:
        """Nothing to load or measure."""

    def cache(self, dataset: ImageDataset, measure_scale: bool) -> None:
        """Nothing to cache: the images are the batch."""

    def encode(self, batch: Batch) -> torch.Tensor:
        return batch["image"]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    def pictures(self, dataset: ImageDataset, out_dir: Path, device: torch.device) -> dict[str, Path]:
        return {}

    def forward_passes(self, device: torch.device) -> dict[str, Callable]:
        return {}


class LatentSpace(nn.Module):
    """The latent space of a frozen KL autoencoder (``model.first_stage``: an ``autoencoder_kl`` run or a Stable
    Diffusion VAE file, ``sd-vae:PATH``), scaled by 1 / std measured on the training data (LDM's ``scale_by_std``;
    SD's 0.18215 is that number for its VAE). The scale is a buffer, so the checkpoint carries it, and the
    autoencoder's weights are in the checkpoint too: a trained system samples without the first stage's files.
    With ``model.cache_latents`` the posterior moments of every training image are computed once and each step
    draws z from them, as encoding would."""

    clip_denoised = False  # scaled latents have unit variance, not a [-1, 1] range: clipping would cut them
    bpd_space = "latents (the bound of the latent model; not comparable with pixel bits/dim)"

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.spec, self.norm_groups, self.cache_latents = m.first_stage, m.sd_vae_norm_groups, m.cache_latents
        self.fixed_scale = getattr(m, "latent_scale", None)
        self.shape = self.shape_of(config)
        self.first_stage = AutoencoderKL(m.autoencoder, image_channels=config.data.channels or 1)
        self.first_stage.requires_grad_(False)
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self._cache: Optional[EncodedTrainingSet] = None

    @staticmethod
    def shape_of(config: Config) -> tuple[int, int]:
        """(latent channels, latent side) of a config's first stage, without building it."""
        ae, side = config.model.autoencoder, config.data.image_size
        if ae is None:
            raise ConfigError("model.autoencoder is not set: name the first stage with model.first_stage "
                              "(an autoencoder_kl checkpoint or sd-vae:PATH); training fills the architecture in")
        f = 2 ** (len(ae.channels) - 1)
        if side % f:
            raise ConfigError(f"data.image_size={side} is not divisible by the first stage's downsampling factor {f}")
        return ae.latent_channels, side // f

    @staticmethod
    def resolve_config(config: Config) -> Config:
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
        """Load the frozen first stage from ``model.first_stage``, cache the training images' posterior moments and
        measure the latent scale."""
        if not self.spec:
            raise ConfigError("model.first_stage is empty: nothing to load the autoencoder from")
        load_state_dict_strict(self.first_stage, autoencoder_weights(self.spec, self.norm_groups), self.spec)
        self.cache(dataset, measure_scale=True)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.first_stage.encode(x)
        return mean.float(), logvar.float()

    def cache(self, dataset: ImageDataset, measure_scale: bool) -> None:
        """Keep the training images' posterior moments (``model.cache_latents``; encoded once, at the first
        training batch) and, with ``measure_scale``, set the latent scale now to 1 / std of one draw of them. A
        dataset streamed from disk is not cached (each batch is encoded as it comes) and its scale is measured on
        2,048 images spread over it."""
        device = self.latent_scale.device
        if self.fixed_scale is not None and measure_scale:
            self.latent_scale.fill_(self.fixed_scale)
            measure_scale = False
        if trains_from_store(dataset, self.first_stage, "gaussian", self.spec):
            if measure_scale:
                spread = torch.linspace(0, len(dataset) - 1, min(2048, len(dataset))).long()
                b = dataset.batch(spread, device)
                noise = torch.randn(b["latent_mean"].shape, generator=torch.Generator().manual_seed(0)).to(device)
                self.latent_scale.fill_(1.0 / (b["latent_mean"] + b["latent_std"] * noise).std().item())
            self._cache = None
            return
        if not getattr(dataset, "in_memory", True):
            if measure_scale:
                spread = torch.linspace(0, len(dataset) - 1, min(2048, len(dataset))).long()
                self._measure_scale(EncodedTrainingSet(self.posterior, dataset.subset(spread).load(), device, batch=64))
            self._cache = None
            return
        encoded = EncodedTrainingSet(self.posterior, dataset, device, batch=250)
        if measure_scale:
            self._measure_scale(encoded)
        self._cache = encoded if self.cache_latents else None

    def _load_from_state_dict(self, *args, **kwargs):
        """A checkpoint's first stage and scale replace the prepared ones (a resumed run): the cache made while
        measuring the scale with the first stage of ``model.first_stage``, which may have trained on since, is
        dropped and made again, lazily, with the carried one."""
        super()._load_from_state_dict(*args, **kwargs)
        if self._cache is not None:
            self._cache.forget()

    def _measure_scale(self, encoded: EncodedTrainingSet) -> None:
        mean, logvar = encoded.compute()
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)).to(mean.device)
        self.latent_scale.fill_(1.0 / z.std().item())

    def encode(self, batch: Batch) -> torch.Tensor:
        """z ~ q(z|x), scaled: from a latent store's moments, from the cache while training on the prepared data,
        by encoding otherwise."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            return (mean + std * torch.randn_like(mean)) * self.latent_scale
        if self._cache is not None and self.training and batch.get("index") is not None:
            mean, logvar = self._cache.lookup(batch["index"], batch.get("flip"))
        else:
            with torch.no_grad():
                mean, logvar = self.posterior(batch["image"])
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(z / self.latent_scale).float().clamp(-1, 1)

    def pictures(self, dataset: ImageDataset, out_dir: Path, device: torch.device) -> dict[str, Path]:
        """Held-out images beside their first-stage reconstructions (what the diffusion model can reach at best)."""
        x = spread_images(dataset, device)
        with torch.no_grad():
            mean, _ = self.first_stage.encode(x)
            recon = self.first_stage.decode(mean).float().clamp(-1, 1)
        return {"first-stage reconstructions": save_reconstructions(x, recon, out_dir)}

    def forward_passes(self, device: torch.device) -> dict[str, Callable]:
        c, side = self.shape
        z = torch.zeros(1, c, side, side, device=device)
        return {"sampling: first-stage decoder (one image, once)": lambda: self.first_stage.decode(z)}
