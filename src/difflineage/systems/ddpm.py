"""DDPM (Ho et al. 2020): a UNet learns to predict the noise added to an image, and sampling runs the
noising backwards: the diffusion system (``systems/diffusion.py``) with a UNet denoiser in pixel space.
Conditioned on a class label or a caption, with the condition dropped for a share of training examples so that
one network serves classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from difflineage.models.unet import UNet, UNetConfig
from difflineage.systems.diffusion import DiffusionModelConfig, DiffusionSystem


@dataclass
class DDPMConfig(DiffusionModelConfig):
    """:param unet: the denoiser (see ``DiffusionModelConfig`` for the process and the conditioning)."""

    unet: UNetConfig = field(default_factory=UNetConfig)


class UNetDenoiser:
    """Systems whose denoiser is the UNet (``model.unet``), kept under ``unet`` in checkpoints."""

    network_name = "unet"

    def build_network(self, out_channels: int, num_classes: int, context_dim: Optional[int]) -> torch.nn.Module:
        m = self.config.model
        return UNet(m.unet, self.channels, out_channels, self.side, num_classes=num_classes, context_dim=context_dim,
                    class_drop=m.cond_drop)


class DDPMSystem(UNetDenoiser, DiffusionSystem):
    """A UNet in pixel space."""

    name = "ddpm"
    title = "DDPM"
    ModelConfig = DDPMConfig
