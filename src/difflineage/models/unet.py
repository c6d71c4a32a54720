"""The noise predictor of DDPM, latent diffusion and Stable Diffusion: a UNet of residual blocks with a timestep
embedding, attention at chosen resolutions, and conditioning on a class label (added to the timestep embedding)
or a caption (cross-attention to text tokens, plus optionally the pooled text added to the timestep embedding).

Layout as in Ho et al. (2020), improved-diffusion and Stable Diffusion: ``num_res_blocks`` residual blocks per
level, a stride-2 convolution between levels, a middle of (res, attention, res), a mirrored decoder that
concatenates the encoder's skip activations (upsampled to each skip's size, so any input side works).

One network, three families of blocks, chosen by the config:

* ``time_conditioning``: ``scale_shift`` (improved-diffusion: the timestep embedding scales and shifts the second
  norm) or ``add`` (DDPM and Stable Diffusion: it is added after the first convolution);
* ``attention_block``: ``difflineage`` (self-attention then cross-attention with LayerNorms and a zero-initialised
  output, so every block starts as the identity), ``plain`` (DDPM: GroupNorm, one self-attention, its output
  projection) or ``transformer`` (Stable Diffusion: GroupNorm, a 1x1 convolution or linear ``proj_in``,
  ``transformer_depth`` blocks of self-attention, cross-attention and a GEGLU feed-forward, ``proj_out``);
* ``timestep_embedding``: ``cos_sin`` (improved-diffusion, DiT, Stable Diffusion) or ``ddpm`` (sin first).

With them the released weights of DDPM (CIFAR-10) and Stable Diffusion 1.x/2.x load into this class
(``interop/sd_unet.py``); the project's own recipes keep the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.nn.attention import Attention
from difflineage.nn.embeddings import TIMESTEP_LAYOUTS, LabelEmbedder, TimestepEmbedder

TIME_CONDITIONING = ("scale_shift", "add")
ATTENTION_BLOCKS = ("difflineage", "plain", "transformer")


@dataclass
class UNetConfig:
    """:param channels: width of the first level; level i has channels * channel_mult[i].
    :param attention_resolutions: feature-map sides (pixels of the model's input space) that get attention.
    :param norm_groups: GroupNorm groups (32 in the papers; small widths need fewer).
    :param head_channels: when positive, each attention layer has width / head_channels heads (Stable Diffusion
        2.x: 64); otherwise ``heads`` at every level (SD 1.x: 8; DDPM: 1).
    :param norm_eps: epsilon of the residual blocks' and the output's GroupNorms (DDPM 1e-6).
    :param downsample_padding: 1, or 0 for DDPM's padding of one row and column at the bottom-right.
    :param pooled_text: add the projected pooled caption to the timestep embedding (Stable Diffusion does not).
    :param upcast_attention: the transformer blocks' attention in float32 under autocast (SD 2.1's).
    See the module's docstring for ``time_conditioning``, ``attention_block``, ``timestep_embedding``;
    ``transformer_depth`` and ``linear_projection`` (SD 2.x) shape the ``transformer`` block."""

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 8
    head_channels: int = 0
    time_conditioning: str = "scale_shift"
    attention_block: str = "difflineage"
    timestep_embedding: str = "cos_sin"
    transformer_depth: int = 1
    linear_projection: bool = False
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    pooled_text: bool = True
    upcast_attention: bool = False

    def heads_at(self, width: int) -> int:
        return width // self.head_channels if self.head_channels > 0 else self.heads

    def check(self) -> None:
        widths = [self.channels * m for m in self.channel_mult]
        if not self.channel_mult or min(widths) < 1:
            raise ConfigError(f"unet.channel_mult={list(self.channel_mult)} must list positive multipliers")
        per_head = f"unet.head_channels={self.head_channels}" if self.head_channels > 0 else f"unet.heads={self.heads}"
        bad = [w for w in widths if w % self.norm_groups or w % (self.head_channels or self.heads)]
        if bad:
            raise ConfigError(f"unet widths {widths} must be divisible by unet.norm_groups={self.norm_groups} and "
                              f"{per_head}; {bad[0]} is not")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"unet.dropout={self.dropout} must lie in [0, 1)")
        for name, value, allowed in (("time_conditioning", self.time_conditioning, TIME_CONDITIONING),
                                     ("attention_block", self.attention_block, ATTENTION_BLOCKS),
                                     ("timestep_embedding", self.timestep_embedding, TIMESTEP_LAYOUTS)):
            if value not in allowed:
                raise ConfigError(f"unet.{name}={value!r}; choose one of {', '.join(allowed)}")
        if self.transformer_depth < 1:
            raise ConfigError(f"unet.transformer_depth={self.transformer_depth} must be at least 1")
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"unet.downsample_padding={self.downsample_padding}; choose 1, or 0 (DDPM's)")


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm - SiLU - conv, the timestep embedding (as a per-channel scale and shift of the second norm,
    improved-diffusion's scale-shift norm; or added to the features, DDPM's and SD's), GroupNorm - SiLU - dropout -
    conv (zero-initialised), plus the skip (a 1x1 conv where the width changes)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float, scale_shift: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C): a view when ``x`` is channels-last (the layout convolutions run fastest in on the
    CPU), one copy otherwise."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def from_tokens(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W) shaped and laid out as ``like`` (channels-last stays channels-last for free)."""
    n, c, hgt, wid = like.shape
    out = h.reshape(n, hgt, wid, c).permute(0, 3, 1, 2)  # channels-last strides
    return out if like.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, then (captions) cross-attention to the text tokens; the output
    projection is zero-initialised so the block starts as the identity. ``plain``: DDPM's block, GroupNorm and
    one self-attention (its own output projection) added to the input, no LayerNorms, no extra output layer."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: Optional[int] = None,
                 plain: bool = False, eps: float = 1e-5):
        super().__init__()
        self.plain = plain
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.ln1 = nn.Identity() if plain else nn.LayerNorm(channels)
        self.attn = Attention(channels, heads)
        self.cross = None
        if context_dim is not None:
            if plain:
                raise ConfigError("unet.attention_block=plain has no cross-attention; a caption-conditioned UNet "
                                  "needs attention_block=difflineage or transformer")
            self.ln2 = nn.LayerNorm(channels)
            self.cross = Attention(channels, heads, context_dim=context_dim)
        self.out = nn.Identity() if plain else zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = to_tokens(self.norm(x))  # (N, H*W, C)
        if self.plain:  # DDPM: the input plus the attention of its normalised positions
            return x + from_tokens(self.attn(h), x)
        h = h + self.attn(self.ln1(h))
        if self.cross is not None:
            h = h + self.cross(self.ln2(h), context, context_mask)
        return x + from_tokens(self.out(h), x)


class GEGLU(nn.Module):
    """Linear to twice the inner width, one half gating the other through GELU, back to the width (Shazeer 2020;
    Stable Diffusion's feed-forward)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context (self-attention again without one), GEGLU
    feed-forward, each added to the stream."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int], upcast: bool = False):
        super().__init__()
        self.upcast = upcast
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, bias=False, out_bias=True) \
            if context_dim is not None else Attention(dim, heads, bias=False, out_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, 4 * dim)

    def attend(self, attn: Attention, x: torch.Tensor, *context) -> torch.Tensor:
        """``attn(x, *context)``; with ``upcast`` in float32 even under autocast (SD 2.1's ``upcast_attention``:
        its attention overflows in half precision), the result cast back to the stream's type."""
        if not (self.upcast and torch.is_autocast_enabled(x.device.type)):
            return attn(x, *context)
        with torch.autocast(x.device.type, enabled=False):
            out = attn(x.float(), *(c.float() if isinstance(c, torch.Tensor) and c.is_floating_point() else c
                                    for c in context))
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attend(self.attn1, self.norm1(x))
        if self.attn2.cross:
            x = x + self.attend(self.attn2, self.norm2(x), context, context_mask)
        else:
            x = x + self.attend(self.attn2, self.norm2(x))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's attention block: GroupNorm, ``proj_in`` (1x1 conv, or linear over the tokens), ``depth``
    transformer blocks over the H*W positions, ``proj_out`` (zero-initialised), added to the input."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: Optional[int], depth: int = 1,
                 linear: bool = False, upcast: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth)])
        self.proj_out = zero(nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = self.norm(x)
        h = self.proj_in(to_tokens(h)) if self.linear else to_tokens(self.proj_in(h))  # (N, H*W, C)
        for block in self.blocks:
            h = block(h, context, context_mask)
        h = from_tokens(self.proj_out(h), x) if self.linear else self.proj_out(from_tokens(h, x))
        return x + h


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
        ch, g, eps = cfg.channels, cfg.norm_groups, cfg.norm_eps
        emb_dim = 4 * ch
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim=ch, layout=cfg.timestep_embedding)
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, class_drop) if num_classes else None
        self.text_proj = nn.Linear(context_dim, emb_dim) if context_dim is not None and cfg.pooled_text else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, g, cfg.dropout, cfg.time_conditioning == "scale_shift", eps)

        def attention(width: int) -> nn.Module:
            heads = cfg.heads_at(width)
            if cfg.attention_block == "transformer":
                return SpatialTransformer(width, heads, g, context_dim, cfg.transformer_depth, cfg.linear_projection,
                                          cfg.upcast_attention)
            return AttentionBlock(width, heads, g, context_dim, plain=cfg.attention_block == "plain", eps=eps)

        def downsample(width: int) -> list[nn.Module]:
            if cfg.downsample_padding == 0:  # DDPM: one zero row and column at the bottom-right, then no padding
                return [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(width, width, 3, stride=2)]
            return [nn.Conv2d(width, width, 3, stride=2, padding=1)]

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width, side = [ch], ch, image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([res(width, ch * mult)])
                width = ch * mult
                if side in cfg.attention_resolutions:
                    blocks.append(attention(width))
                self.down.append(blocks)
                skips.append(width)
            if level < levels - 1:
                self.down.append(nn.ModuleList(downsample(width)))
                skips.append(width)
                side //= 2
        self.mid = nn.ModuleList([res(width, width), attention(width), res(width, width)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([res(width + skips.pop(), ch * mult)])
                width = ch * mult
                if side in cfg.attention_resolutions:
                    blocks.append(attention(width))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(width, width, 3, padding=1))
                    side *= 2
                self.up.append(blocks)
        self.norm_out = nn.GroupNorm(g, width, eps=eps)
        self.conv_out = zero(nn.Conv2d(width, out_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
              pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The embedding every residual block reads: timestep, plus the class or the pooled caption, (N, 4ch)."""
        emb = self.t_embedder(t)
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(labels)
        if self.text_proj is not None:
            emb = emb + self.text_proj(pooled)
        return emb

    def run(self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor],
            context_mask: Optional[torch.Tensor], size: Optional[torch.Size] = None) -> torch.Tensor:
        """One entry of ``down``, ``mid`` or ``up``; ``size``: the side the upsampler reaches (the next skip's)."""
        for block in blocks:
            if isinstance(block, ResBlock):
                h = block(h, emb)
            elif isinstance(block, (AttentionBlock, SpatialTransformer)):
                h = block(h, context, context_mask)
            elif isinstance(block, nn.Upsample) and size is not None:
                h = F.interpolate(h, size=size, mode="nearest")
            else:
                h = block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                pooled: Optional[torch.Tensor] = None, feature_cache: Optional["FeatureCache"] = None) -> torch.Tensor:
        """``feature_cache``: reuse the deep features of an earlier sampler step where its schedule says (DeepCache)."""
        emb = self.embed(t, labels, pooled)
        h = self.conv_in(x)  # (N, ch, S, S)
        hs = [h]
        reuse = feature_cache is not None and feature_cache.next_call()
        branch = feature_cache.branch if feature_cache is not None else 0
        if reuse:  # only the shallow path: the first `branch` down entries, then the cached deep features
            for blocks in self.down[:branch]:
                h = self.run(blocks, h, emb, context, context_mask)
                hs.append(h)
            h = feature_cache.features
            up = self.up[len(self.up) - 1 - branch:]
        else:
            for blocks in self.down:
                h = self.run(blocks, h, emb, context, context_mask)
                hs.append(h)
            h = self.run(self.mid, h, emb, context, context_mask)  # (N, ch * mult[-1], S / 2^(L-1), ...)
            up = self.up
        for i, blocks in enumerate(up):
            if feature_cache is not None and not reuse and i == len(self.up) - 1 - branch:
                feature_cache.features = h  # what the shallow up entries read from below
            h = torch.cat([h, hs.pop()], dim=1)
            h = self.run(blocks, h, emb, context, context_mask, hs[-1].shape[-2:] if hs else None)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, out_channels, S, S)


class FeatureCache:
    """DeepCache (Ma et al. 2024) for the UNet: the deep part of the network (every level below the shallowest
    ``branch + 1`` skip connections, and the middle) changes little from one sampler step to the next, so it is
    computed on refresh steps only; between them a step runs the first ``branch`` down entries and the last
    ``branch + 1`` up entries on the features cached at the last refresh. ``interval`` N: a refresh every N network
    calls (the first always). One cache serves one sampling run (it counts calls; with guidance both halves run in
    one call); ``reset`` before another. ``interval=1`` is the plain network, exactly."""

    def __init__(self, interval: int = 3, branch: int = 0):
        if interval < 1 or branch < 0:
            raise ValueError(f"feature cache interval={interval} (at least 1), branch={branch} (at least 0)")
        self.interval, self.branch = interval, branch
        self.reset()

    def reset(self) -> None:
        self.calls, self.features = 0, None
        self.reused = 0

    def next_call(self) -> bool:
        """Whether this network call reuses the cache (and count it)."""
        reuse = self.calls % self.interval != 0 and self.features is not None
        self.calls += 1
        self.reused += int(reuse)
        return reuse
