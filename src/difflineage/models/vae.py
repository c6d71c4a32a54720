"""The variational autoencoder of Kingma & Welling (2014), convolutional.

q(z|x) = N(mu(x), diag sigma^2(x)) from a strided-conv encoder; z = mu + sigma * eps
(the reparameterisation trick); p(x|z) from a transposed-conv decoder, either Bernoulli
(binarised digits) or a discretised Gaussian over 256 grey levels (gray and colour images);
p(z) = N(0, I). With ``num_classes`` set, encoder and decoder also see a one-hot label
(the conditional VAE of Sohn et al. 2015), so samples can be asked for a class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError


@dataclass
class VAEConfig:
    """The VAE's settings.

    :param latent_dim: size of z. With 2, the decoded latent manifold is drawn as in the paper.
    :param channels: conv channels of each stride-2 stage of the encoder (mirrored in the decoder);
        the image side must be divisible by 2 ** len(channels).
    :param hidden: width of the fully connected layer between conv features and z.
    :param likelihood: ``bernoulli`` for binarised digits, ``discretized_gaussian`` for 8-bit images.
    :param binarize: for Bernoulli: ``dynamic`` (a fresh Bernoulli draw of each pixel every step,
        evaluation on one fixed draw, the usual protocol) or ``threshold`` (pixel > 0.5).
    :param conditional: condition encoder and decoder on the class label.
    """

    latent_dim: int = 16
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 512
    likelihood: Literal["bernoulli", "discretized_gaussian"] = "bernoulli"
    binarize: Literal["dynamic", "threshold"] = "dynamic"
    conditional: bool = False

    def check(self) -> None:
        if self.latent_dim < 1 or self.hidden < 1:
            raise ConfigError(f"model.latent_dim={self.latent_dim} and model.hidden={self.hidden} must be at least 1")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"model.channels={list(self.channels)} must list at least one positive width, e.g. [32, 64]")


class VAE(nn.Module):
    """Encoder q(z|x), decoder p(x|z); the objective lives in ``systems/vae.py``."""

    def __init__(self, cfg: VAEConfig, image_channels: int, image_size: int, num_classes: Optional[int] = None):
        super().__init__()
        stride = 2 ** len(cfg.channels)
        if image_size % stride:
            raise ConfigError(f"data.image_size={image_size} is not divisible by 2**len(model.channels)={stride}; "
                              f"use image_size {image_size // stride * stride or stride} or fewer channel stages")
        if cfg.conditional and not num_classes:
            raise ConfigError("model.conditional=true needs labelled data (data.num_classes); this source has no labels")
        self.cfg = cfg
        self.image_channels = image_channels
        self.image_size = image_size
        self.num_classes = num_classes if cfg.conditional else 0
        self.bottom = image_size // stride  # side of the smallest feature map
        k = self.num_classes

        layers, prev = [], image_channels + k
        for ch in cfg.channels:  # each stage halves the side: (N, ch, S/2, S/2)
            layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.SiLU()]
            prev = ch
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(prev * self.bottom**2, cfg.hidden), nn.SiLU(),
                                     nn.Linear(cfg.hidden, 2 * cfg.latent_dim))

        top = cfg.channels[-1]
        self.decoder_fc = nn.Sequential(nn.Linear(cfg.latent_dim + k, cfg.hidden), nn.SiLU(),
                                        nn.Linear(cfg.hidden, top * self.bottom**2), nn.SiLU())
        layers, prev = [], top
        for ch in reversed(cfg.channels[:-1]):
            layers += [nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1), nn.SiLU()]
            prev = ch
        layers += [nn.ConvTranspose2d(prev, image_channels, 4, stride=2, padding=1)]
        self.decoder_conv = nn.Sequential(*layers)
        # The discretised Gaussian's scale: one learned log-sigma per channel, shared by all pixels.
        self.log_scale = nn.Parameter(torch.full((1, image_channels, 1, 1), -2.0)) \
            if cfg.likelihood == "discretized_gaussian" else None

    def _one_hot(self, label: Optional[torch.Tensor], n: int, device) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        if label is None:
            raise ValueError("this VAE is class-conditional: pass a label for every image")
        return F.one_hot(label.to(device), self.num_classes).float()  # (N, K)

    def encode(self, x: torch.Tensor, label: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] (N, C, H, W) -> mean, log-variance of q(z|x), each (N, latent_dim)."""
        y = self._one_hot(label, len(x), x.device)
        if y is not None:
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (N, latent_dim) -> decoder output (N, C, H, W): Bernoulli logits or Gaussian means."""
        y = self._one_hot(label, len(z), z.device)
        if y is not None:
            z = torch.cat([z, y], dim=1)
        h = self.decoder_fc(z).view(len(z), self.cfg.channels[-1], self.bottom, self.bottom)
        return self.decoder_conv(h)

    def mean_image(self, decoded: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) as an image in [-1, 1]."""
        if self.cfg.likelihood == "bernoulli":
            return torch.sigmoid(decoded.float()) * 2.0 - 1.0
        return decoded.float().clamp(-1.0, 1.0)
