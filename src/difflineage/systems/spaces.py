"""The spaces a diffusion system can run in: pixels, or the scaled latent space of a frozen first stage.

A space turns a training batch into the tensors the diffusion runs on (``encode``) and samples back into images
(``decode``), says whether the sampler may clip its x_0 estimate to [-1, 1] (pixels: yes; unit-variance latents:
no) and holds whatever the space needs (the frozen autoencoder and the latent scale). Any denoiser (UNet, DiT,
DyDiT) runs in either.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from difflineage.config import Config
from difflineage.checkpoint import Checkpoint
from difflineage.data import AnyBatch, Batch, Dataset
from difflineage.errors import ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.systems.base import read_stage, save_reconstructions, spread_images
from difflineage.systems.autoencoder import AutoencoderKLSystem
from difflineage.systems.frozen import EncodedTrainingSet, FrozenPart, GaussianStage, sd_vae


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

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """Nothing to load, cache or measure: the images are the batch."""

    def encode(self, batch: Batch) -> torch.Tensor:
        return batch["image"]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    def parts(self) -> list[FrozenPart]:
        """The frozen parts of this space: none."""
        return []

    def pictures(self, dataset: Dataset, out_dir: Path, device: torch.device) -> dict[str, Path]:
        return {}

    def forward_passes(self, device: torch.device) -> dict[str, Callable]:
        return {}


class LatentSpace(nn.Module):
    """The latent space of a frozen KL autoencoder (``model.first_stage``: an ``autoencoder_kl`` run or a Stable
    Diffusion VAE file, ``sd-vae:PATH``), scaled by 1 / std measured on the training data (LDM's ``scale_by_std``;
    SD's 0.18215 is that number for its VAE). The scale is a buffer, so the checkpoint carries it, and the
    autoencoder's weights are in the checkpoint too: a trained system samples without the first stage's files.
    The autoencoder is a frozen part (``self.part``, a ``GaussianStage``): with ``model.cache_latents`` the posterior
    moments of every training image are computed once and each step draws z from them, as encoding would."""

    clip_denoised = False  # scaled latents have unit variance, not a [-1, 1] range: clipping would cut them
    bpd_space = "latents (the bound of the latent model; not comparable with pixel bits/dim)"

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.spec, self.norm_groups, self.cache_latents = m.first_stage, m.sd_vae_norm_groups, m.cache_latents
        self.fixed_scale = getattr(m, "latent_scale", None)
        self.shape = self.shape_of(config)
        self.first_stage = AutoencoderKL(m.autoencoder, image_channels=config.data.channels or 1)
        self.part = GaussianStage(self.first_stage, self.spec, config.data.channels or 1)
        self.register_buffer("latent_scale", torch.tensor(1.0))

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

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """Before training: the frozen first stage loaded from ``model.first_stage`` (a fresh run; a resumed one
        carries it), the training set attached to it (a store checked, or the in-memory images encoded once) and,
        in a fresh run, the latent scale set (measured, or ``model.latent_scale``)."""
        if not restored:
            if not self.spec:
                raise ConfigError("model.first_stage is empty: nothing to load the autoencoder from")
            self.part.load(autoencoder_weights(self.spec, self.norm_groups))
        self.part.attach(dataset, self.latent_scale.device, cache=self.cache_latents)
        if not restored:
            self.latent_scale.fill_(self.fixed_scale if self.fixed_scale is not None else self._measured_scale(dataset))

    def parts(self) -> list[FrozenPart]:
        """The frozen parts of this space: its first stage."""
        return [self.part]

    def _measured_scale(self, dataset: Dataset) -> float:
        """1 / std of one draw (seeded) of the training latents: all of an in-memory set, 2,048 images spread over a
        store or a set streamed from disk."""
        device = self.latent_scale.device
        spread = torch.linspace(0, len(dataset) - 1, min(2048, len(dataset))).long()
        if not dataset.holds_images:
            mean, std = self.part.from_store(dataset.batch(spread, device))
        elif self.part.cache is not None:
            mean, std = self.part.cache.compute()
        elif not dataset.in_memory:
            mean, std = EncodedTrainingSet(self.part.encode_images, dataset.subset(spread).load(), device, 64).compute()
        else:
            mean, std = EncodedTrainingSet(self.part.encode_images, dataset, device, self.part.cache_batch).compute()
        z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)).to(mean.device)
        return 1.0 / z.std().item()

    def encode(self, batch: AnyBatch) -> torch.Tensor:
        """z ~ q(z|x), scaled (the moments from the frozen part: a store, the cache or the encoder)."""
        mean, std = self.part.encode(batch, self.training)
        return (mean + std * torch.randn_like(mean)) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.part.decode(z / self.latent_scale)

    def pictures(self, dataset: Dataset, out_dir: Path, device: torch.device) -> dict[str, Path]:
        """Held-out images beside their first-stage reconstructions (what the diffusion model can reach at best)."""
        x = spread_images(dataset, device)
        with torch.no_grad():
            mean, _ = self.first_stage.encode(x)
            recon = self.part.decode(mean)
        return {"first-stage reconstructions": save_reconstructions(x, recon, out_dir)}

    def forward_passes(self, device: torch.device) -> dict[str, Callable]:
        c, side = self.shape
        z = torch.zeros(1, c, side, side, device=device)
        return {"sampling: first-stage decoder (one image, once)": lambda: self.first_stage.decode(z)}


def _autoencoder_run(spec: str) -> Checkpoint:
    return read_stage(spec, "first_stage", (AutoencoderKLSystem,), "it must be an autoencoder_kl one (or sd-vae:PATH)")


def autoencoder_architecture(spec: str, norm_groups: int) -> tuple[AutoencoderKLConfig, int]:
    """(architecture, image channels) of a latent model's first stage: ``sd-vae:PATH`` (a Stable Diffusion VAE
    file, LDM or diffusers layout) or an ``autoencoder_kl`` checkpoint or run directory."""
    if spec.startswith("sd-vae:"):
        vae = sd_vae(spec, norm_groups)
        return vae.cfg, vae.image_channels
    ckpt = _autoencoder_run(spec)
    return ckpt.config.model, ckpt.config.data.channels or 1


def autoencoder_weights(spec: str, norm_groups: int) -> dict[str, torch.Tensor]:
    """The weights of the first stage named by ``spec`` (see :func:`autoencoder_architecture`)."""
    if spec.startswith("sd-vae:"):
        return sd_vae(spec, norm_groups).state_dict()
    return _autoencoder_run(spec).part("ae.")
