"""VQ-VAE (van den Oord et al. 2017): a convolutional encoder, the vector quantiser of ``nn/quantize.py`` and a
decoder. Images (N, C, S, S) map to code maps (N, S / 2^d, S / 2^d) of indices into the codebook; the decoder
turns codes back into images. The prior over code maps is a separate network (``models/pixelcnn.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from difflineage.errors import ConfigError
from difflineage.nn.quantize import Quantized, VectorQuantizer


@dataclass
class VQVAEConfig:
    """:param channels: convolution width. :param downsample: stride-2 stages (2: 32x32 images -> 8x8 codes).
    :param codes: codebook size K. :param code_dim: code width. :param beta: commitment weight.
    :param ema: EMA codebook updates instead of the codebook loss. :param restart_after: re-seed codes unused
    for this many steps (0: never)."""

    channels: int = 64
    res_blocks: int = 2
    downsample: int = 2
    codes: int = 256
    code_dim: int = 32
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    restart_after: int = 100

    def check(self) -> None:
        if self.downsample < 1 or self.channels < 2 or self.codes < 2 or self.code_dim < 1:
            raise ConfigError("VQ-VAE needs downsample >= 1, channels >= 2, codes >= 2 and code_dim >= 1")


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))) (the VQ-VAE paper's residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def encoder(in_channels: int, channels: int, out_channels: int, downsample: int, res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for i in range(downsample):
        width = channels // 2 if i < downsample - 1 else channels
        layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.ReLU()]
        c = width
    layers += [nn.Conv2d(c, channels, 3, padding=1)] + [ResBlock(channels) for _ in range(res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(channels, out_channels, 1)]
    return nn.Sequential(*layers)


def decoder(in_channels: int, channels: int, out_channels: int, upsample: int, res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
    layers += [ResBlock(channels) for _ in range(res_blocks)] + [nn.ReLU()]
    c = channels
    for i in range(upsample):
        last = i == upsample - 1
        width = out_channels if last else channels // 2
        layers.append(nn.ConvTranspose2d(c, width, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        c = width
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder(image_channels, cfg.channels, cfg.code_dim, cfg.downsample, cfg.res_blocks)
        self.quantizer = VectorQuantizer(cfg.codes, cfg.code_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay,
                                         restart_after=cfg.restart_after)
        self.decoder = decoder(cfg.code_dim, cfg.channels, image_channels, cfg.downsample, cfg.res_blocks)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.cfg.downsample

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (N, S', S') code indices."""
        return self.quantizer.nearest(self.encoder(x).float().movedim(1, -1).reshape(-1, self.cfg.code_dim)) \
            .view(x.shape[0], x.shape[2] // self.downsampling_factor, x.shape[3] // self.downsampling_factor)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, S', S') code indices -> images."""
        return self.decoder(self.quantizer.lookup(indices))


class VQVAE2(nn.Module):
    """VQ-VAE-2 (Razavi et al. 2019) with two levels: bottom codes at 1 / 2^d of the image side, top codes at half
    that. The top encoder reads the bottom encoder's features; the bottom quantiser reads the bottom features
    together with the decoded top codes, so the bottom codes hold the detail the top ones miss; the decoder reads
    both (the top codes upsampled). Returns and takes ``(top, bottom)`` code maps."""

    def __init__(self, cfg: VQVAEConfig, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        c, k = cfg.channels, cfg.code_dim
        self.enc_b = encoder(image_channels, c, c, cfg.downsample, cfg.res_blocks)
        self.enc_t = encoder(c, c, k, 1, cfg.res_blocks)
        self.quant_t = VectorQuantizer(cfg.codes, k, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay, restart_after=cfg.restart_after)
        self.dec_t = decoder(k, c, c, 1, cfg.res_blocks)
        self.pre_b = nn.Conv2d(2 * c, k, 1)
        self.quant_b = VectorQuantizer(cfg.codes, k, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay, restart_after=cfg.restart_after)
        self.up_t = nn.ConvTranspose2d(k, k, 4, stride=2, padding=1)
        self.decoder = decoder(2 * k, c, image_channels, cfg.downsample, cfg.res_blocks)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.cfg.downsample  # of the bottom codes; the top codes are half as wide again

    def _quantize(self, x: torch.Tensor) -> tuple[Quantized, Quantized]:
        h_b = self.enc_b(x)
        q_t = self.quant_t(self.enc_t(h_b))
        q_b = self.quant_b(self.pre_b(torch.cat([h_b, self.dec_t(q_t.quantized)], 1)))
        return q_t, q_b

    def _decode(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([bottom, self.up_t(top)], 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Quantized, Quantized]]:
        q_t, q_b = self._quantize(x)
        return self._decode(q_t.quantized, q_b.quantized), (q_t, q_b)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (top (N, S'/2, S'/2), bottom (N, S', S')) code indices."""
        with torch.no_grad():
            q_t, q_b = self._quantize(x)
        return q_t.indices, q_b.indices

    def decode(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return self._decode(self.quant_t.lookup(top), self.quant_b.lookup(bottom))
