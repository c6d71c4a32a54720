"""The noise predictor of DDPM and latent diffusion: a UNet of residual blocks with a timestep embedding,
self-attention at low resolution, and conditioning on a class label (added to the timestep embedding) or a
caption (cross-attention to text tokens, plus the pooled text added to the timestep embedding).

Layout as in Ho et al. (2020) and improved-diffusion: ``num_res_blocks`` residual blocks per level, a
stride-2 convolution between levels, a middle of (res, attention, res), a mirrored decoder that
concatenates the encoder's skip activations, and zero-initialised output layers so that every residual
branch starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.nn.attention import Attention
from difflineage.nn.embeddings import LabelEmbedder, TimestepEmbedder


@dataclass
class UNetConfig:
    """:param channels: width of the first level; level i has channels * channel_mult[i].
    :param attention_resolutions: feature-map sides (pixels of the model's input space) that get attention.
    :param norm_groups: GroupNorm groups (32 in the papers; small widths need fewer)."""

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 8

    def check(self) -> None:
        widths = [self.channels * m for m in self.channel_mult]
        if not self.channel_mult or min(widths) < 1:
            raise ConfigError(f"unet.channel_mult={list(self.channel_mult)} must list positive multipliers")
        bad = [w for w in widths if w % self.norm_groups or w % self.heads]
        if bad:
            raise ConfigError(f"unet widths {widths} must be divisible by unet.norm_groups={self.norm_groups} and "
                              f"unet.heads={self.heads}; {bad[0]} is not")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"unet.dropout={self.dropout} must lie in [0, 1)")


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm - SiLU - conv, then the timestep embedding as a per-channel scale and shift of the second
    norm (improved-diffusion's scale-shift norm), SiLU - dropout - conv (zero-initialised), plus the skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, then (captions) cross-attention to the text tokens; the output
    projection is zero-initialised so the block starts as the identity."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.ln1 = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads)
        self.cross = None
        if context_dim is not None:
            self.ln2 = nn.LayerNorm(channels)
            self.cross = Attention(channels, heads, context_dim=context_dim)
        self.out = zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        h = h + self.attn(self.ln1(h))
        if self.cross is not None:
            h = h + self.cross(self.ln2(h), context, context_mask)
        return x + self.out(h).transpose(1, 2).reshape(n, c, hgt, wid)


class UNet(nn.Module):
    """(x_t (N, C, S, S), t (N,), labels or text) -> (N, out_channels, S, S)."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, image_size: int, num_classes: int = 0,
                 context_dim: Optional[int] = None, class_drop: float = 0.0):
        super().__init__()
        levels = len(cfg.channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ConfigError(f"a UNet with {levels} levels needs an input side divisible by {2 ** (levels - 1)}, "
                              f"got {image_size}; change data.image_size or unet.channel_mult")
        sides = [image_size // 2 ** i for i in range(levels)]
        unmatched = [r for r in cfg.attention_resolutions if r not in sides]
        if unmatched:  # an attention level that no feature map has would silently vanish
            fit = sorted({min(sides, key=lambda s: abs(s - r)) for r in cfg.attention_resolutions}, reverse=True)
            raise ConfigError(f"unet.attention_resolutions={list(cfg.attention_resolutions)}: {unmatched} matches no "
                              f"level of this UNet, whose feature maps are {', '.join(map(str, sides))} px (input "
                              f"{image_size} px); --set model.unet.attention_resolutions=[{','.join(map(str, fit))}] "
                              "(or [] for none)")
        self.cfg = cfg
        ch, g = cfg.channels, cfg.norm_groups
        emb_dim = 4 * ch
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim=ch)
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, class_drop) if num_classes else None
        self.text_proj = nn.Linear(context_dim, emb_dim) if context_dim is not None else None

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width, side = [ch], ch, image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(width, ch * mult, emb_dim, g, cfg.dropout)])
                width = ch * mult
                if side in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(width, cfg.heads, g, context_dim))
                self.down.append(blocks)
                skips.append(width)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skips.append(width)
                side //= 2
        self.mid = nn.ModuleList([ResBlock(width, width, emb_dim, g, cfg.dropout),
                                  AttentionBlock(width, cfg.heads, g, context_dim),
                                  ResBlock(width, width, emb_dim, g, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(width + skips.pop(), ch * mult, emb_dim, g, cfg.dropout)])
                width = ch * mult
                if side in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(width, cfg.heads, g, context_dim))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(width, width, 3, padding=1))
                    side *= 2
                self.up.append(blocks)
        self.norm_out = nn.GroupNorm(g, width)
        self.conv_out = zero(nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.t_embedder(t)  # (N, 4ch)
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(labels)
        if self.text_proj is not None:
            emb = emb + self.text_proj(pooled)

        def run(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                if isinstance(block, ResBlock):
                    h = block(h, emb)
                elif isinstance(block, AttentionBlock):
                    h = block(h, context, context_mask)
                else:
                    h = block(h)
            return h

        h = self.conv_in(x)  # (N, ch, S, S)
        hs = [h]
        for blocks in self.down:
            h = run(blocks, h)
            hs.append(h)
        h = run(self.mid, h)  # (N, ch * mult[-1], S / 2^(L-1), ...)
        for blocks in self.up:
            h = run(blocks, torch.cat([h, hs.pop()], dim=1))
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, S, S)
