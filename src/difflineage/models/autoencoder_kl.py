"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), Stable Diffusion's VAE.

"the encoder E encodes x into a latent representation z = E(x), and the decoder D reconstructs
the image from the latent, giving x~ = D(z) = D(E(x))"; "the encoder downsamples the image by a
factor f = H/h = W/w". To avoid "arbitrarily high-variance latent spaces" the latent is lightly
regularised: "KL-reg., imposes a slight KL-penalty towards a standard normal on the learned
latent, similar to a VAE" (``kl_weight``, ~1e-6 in the paper). The diffusion model then works on
z instead of on pixels.

The architecture is the convolutional one of the paper's ``first_stage_model``: ResNet blocks
with GroupNorm and swish at each resolution, stride-2 convolutions between them, one
self-attention block in the middle, and a mirrored decoder with nearest-neighbour upsampling.
Parameter names follow the original LDM / CompVis code exactly (``encoder.down.0.block.0.conv1``,
``encoder.mid.attn_1.q``, ...), so a Stable Diffusion checkpoint loads with no renaming; the
diffusers layout is translated in :mod:`difflineage.interop.sd_vae`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError


@dataclass
class AutoencoderKLConfig:
    """The KL autoencoder's settings.

    :param channels: conv width at each resolution level (LDM's ``ch * ch_mult``); ``len(channels) - 1``
        stride-2 downsamplings, so the downsampling factor is ``2 ** (len(channels) - 1)``.
        Stable Diffusion uses ``(128, 256, 512, 512)``, f = 8.
    :param layers_per_block: ResNet blocks per level in the encoder (LDM's ``num_res_blocks``); the
        decoder has one more per level. SD uses 2.
    :param latent_channels: channels of z (LDM's ``z_channels`` / ``embed_dim``). SD uses 4.
    :param norm_groups: GroupNorm groups; every width must be divisible by it. SD uses 32.
    :param mid_attention: a self-attention block in the middle of encoder and decoder, as SD has.
    :param kl_weight: weight of KL(q(z|x) || N(0, I)) in the training loss.
    """

    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8
    mid_attention: bool = True
    kl_weight: float = 1e-6

    def check(self) -> None:
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"model.channels={list(self.channels)} must list at least one positive width, "
                              "e.g. [128, 256, 512, 512]")
        if self.norm_groups < 1:
            raise ConfigError(f"model.norm_groups={self.norm_groups} must be at least 1 (Stable Diffusion uses 32)")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ConfigError(f"model.channels={list(self.channels)}: widths {bad} are not divisible by "
                              f"model.norm_groups={self.norm_groups}; GroupNorm needs every width to be a multiple")
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block={self.layers_per_block} must be at least 1")
        if self.latent_channels < 1:
            raise ConfigError(f"model.latent_channels={self.latent_channels} must be at least 1")
        if self.kl_weight < 0:
            raise ConfigError(f"model.kl_weight={self.kl_weight} must be non-negative")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-conv2 plus a residual (1x1 ``nin_shortcut`` when widths differ); no timestep."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (N, C_out, H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)  # (N, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1 conv projections and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, 1, c, h * w).transpose(2, 3)  # (N, 1 head, h*w, C)

        # softmax(q k^T / sqrt(c)) v; the default scale of scaled_dot_product_attention is 1/sqrt(C)
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.transpose(2, 3).reshape(n, c, h, w)  # (N, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the side: zero-pad right and bottom by one, then a 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks) and optionally ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    """The middle of encoder and decoder: block_1, attn_1 (when enabled), block_2."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        if attention:
            self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if hasattr(self, "attn_1"):
            x = self.attn_1(x)
        return self.block_2(x)  # (N, C, h, w)


class Encoder(nn.Module):
    """x -> moments: conv_in, levels of ResNet blocks with downsampling between, mid, norm-swish-conv_out."""

    def __init__(self, cfg: AutoencoderKLConfig, image_channels: int):
        super().__init__()
        ch, g = tuple(cfg.channels), cfg.norm_groups
        self.conv_in = nn.Conv2d(image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = ch[0]
        for i, width in enumerate(ch):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(prev, width, g))
                prev = width
            level = _Level(blocks)
            if i != len(ch) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = _Mid(prev, g, cfg.mid_attention)
        self.norm_out = _norm(prev, g)
        # "double_z": the encoder emits mean and log-variance of q(z|x)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (N, ch[0], H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)  # (N, ch[i], H/2^i, W/2^i)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (N, ch[i], H/2^(i+1), W/2^(i+1))
        h = self.mid(h)  # (N, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2z, H/f, W/f)


class Decoder(nn.Module):
    """z -> x: conv_in, mid, levels of ResNet blocks from the deepest up with upsampling between, norm-swish-conv_out.

    ``up[i]`` is resolution level i (as in the encoder's ``down[i]``), so the forward pass runs
    ``up[n-1], ..., up[0]``; each level has ``layers_per_block + 1`` blocks.
    """

    def __init__(self, cfg: AutoencoderKLConfig, image_channels: int):
        super().__init__()
        ch, g = tuple(cfg.channels), cfg.norm_groups
        prev = ch[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, prev, 3, padding=1)
        self.mid = _Mid(prev, g, cfg.mid_attention)
        levels: list[_Level] = []
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(ResnetBlock(prev, ch[i], g))
                prev = ch[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(prev)
            levels.insert(0, level)  # keep up[i] == level i, as LDM does
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(prev, g)
        self.conv_out = nn.Conv2d(prev, image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (N, ch[-1], h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)  # (N, ch[i], h * 2^(n-1-i), w * 2^(n-1-i))
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # side doubled
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, C, H, W)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE: ``encode`` gives the moments of q(z|x), ``decode`` maps z back to pixels.

    ``quant_conv`` (1x1 on the moments) and ``post_quant_conv`` (1x1 on z) are the "quantisation"
    convolutions kept from the VQ variant of the same code; with the KL regulariser they are plain
    1x1 maps. Images are in [-1, 1]; the training objective lives with the system.
    """

    def __init__(self, cfg: AutoencoderKLConfig, image_channels: int = 3):
        super().__init__()
        cfg.check()
        if image_channels < 1:
            raise ConfigError(f"image_channels={image_channels} must be at least 1")
        self.cfg = cfg
        self.image_channels = image_channels
        self.encoder = Encoder(cfg, image_channels)
        self.decoder = Decoder(cfg, image_channels)
        z = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def downsampling_factor(self) -> int:
        """f = H/h = W/w."""
        return 2 ** (len(self.cfg.channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) in [-1, 1] -> (mean, logvar) of q(z|x), each (N, z, H/f, W/f); logvar in [-30, 20]."""
        moments = self.quant_conv(self.encoder(x))  # (N, 2z, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # (N, z, H/f, W/f) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, z, h, w) -> x~ (N, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x through z = mean + sigma * eps (reparameterised; eps drawn on the CPU with the
        CPU ``generator`` and then moved, so a seed gives the same z on any device), or z = mean.

        Returns ``(recon, mean, logvar)``.
        """
        mean, logvar = self.encode(x)  # (N, z, h, w) each
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        return self.decode(z), mean, logvar  # (N, C, H, W), (N, z, h, w), (N, z, h, w)
