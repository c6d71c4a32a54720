"""DiT as a system: the Gaussian diffusion of DDPM / improved-diffusion (learned-range variance and the hybrid
loss by default, as DiT trains) with a DiT denoiser, in the latent space of a frozen first stage (as the paper
does over the Stable Diffusion VAE, ``model.first_stage=sd-vae:PATH``, or over an ``autoencoder_kl`` run of
this project) or, with no first stage, in pixel space. Class- or caption-conditional (the text encoder of the
LDM system: pooled embedding into adaLN, tokens into the cross-attention blocks), with classifier-free guidance
applied to every prediction channel or, as the official sampler does, to the first three only
(``model.guidance_channels=3``, kept to reproduce its FIDs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from difflineage.config import Config
from difflineage.diffusion import DiffusionConfig, guided
from difflineage.errors import ConfigError
from difflineage.models.dit import DiT, DiTConfig
from difflineage.systems.ddpm import DDPMSystem
from difflineage.systems.ldm import LDMConfig, LDMSystem


@dataclass
class DiTSystemConfig(LDMConfig):
    """:param dit: the transformer (a named config such as DiT-S/2, or custom sizes).
    :param guidance_channels: how many prediction channels guidance touches (0: all; 3: the official code)."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(variance="learned_range"))
    guidance_channels: int = 0

    def check(self) -> None:
        super().check()
        if self.condition == "none":
            raise ConfigError("model.condition=none: the DiT system is conditioned on a class or a caption "
                              "(condition: class or caption)")
        if self.guidance_channels < 0:
            raise ConfigError("model.guidance_channels must be 0 (all) or a positive count")


class DiTSystem(LDMSystem):
    name = "dit"
    ModelConfig = DiTSystemConfig
    network_name = "dit"

    def __init__(self, config: Config):
        self.latent = config.model.autoencoder is not None or bool(config.model.first_stage)
        if self.latent:
            super().__init__(config)
        else:  # pixel space: the DDPM system with a DiT
            DDPMSystem.__init__(self, config)

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        if not config.model.first_stage and config.model.autoencoder is None:
            return config  # pixel-space DiT
        return super().resolve_config(config)

    def build_network(self, out_channels: int, num_classes: int, context_dim: Optional[int]) -> torch.nn.Module:
        m = self.config.model
        learn_sigma = out_channels == 2 * self.channels
        cfg = replace(m.dit, learn_sigma=learn_sigma, class_dropout=m.cond_drop)
        return DiT(cfg, self.channels, self.side, num_classes, context_dim=context_dim)

    # pixel space falls back to DDPM's behaviour
    clip_denoised = property(lambda self: not self.latent)  # type: ignore[assignment]

    def model_space(self) -> tuple[int, int]:
        return LDMSystem.model_space(self) if self.latent else DDPMSystem.model_space(self)

    def prepare(self, dataset) -> None:
        if self.latent:
            super().prepare(dataset)

    def to_model_space(self, batch):
        return super().to_model_space(batch) if self.latent else DDPMSystem.to_model_space(self, batch)

    def to_images(self, x):
        return super().to_images(x) if self.latent else DDPMSystem.to_images(self, x)

    def bpd_space(self) -> str:
        return super().bpd_space() if self.latent else "pixels"

    def pictures(self, dataset, out_dir, generator=None):
        return super().pictures(dataset, out_dir, generator) if self.latent else {}

    def forward_passes(self):
        return super().forward_passes() if self.latent else DDPMSystem.forward_passes(self)

    def guide(self, scale: float, cond: dict[str, Any], null: dict[str, Any]):
        k = self.config.model.guidance_channels or self.channels
        return guided(self.net, scale, cond, null, guide_channels=min(k, self.channels))
