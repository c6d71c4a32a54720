"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"): the
autoregressive prior over VQ-VAE code maps.

The image of codes is generated in raster order, p(x) = prod_i p(x_i | x_<i, condition). Two stacks keep every
output causal without the blind spot of a single masked convolution:

- the vertical stack sees the rows above (and, inside the stack, the current row; it reaches the horizontal
  stack only after a one-row shift down, so the horizontal stack receives rows strictly above);
- the horizontal stack sees the pixels to the left in the current row (the first layer excludes the current
  pixel: "mask A"; later layers include it, since by then it carries only earlier information: "mask B").

Both stacks use gated activations tanh(a) * sigmoid(b), with the condition added before the gate: a class
embedding (global) and/or a conditioning map (per position, e.g. VQ-VAE-2's top codes for the bottom prior).
Convolutions are written with explicit padding and crops instead of masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError


@dataclass
class PixelCNNConfig:
    """:param channels: width of both stacks. :param layers: gated layers. :param kernel: odd kernel size."""

    channels: int = 64
    layers: int = 8
    kernel: int = 5

    def check(self) -> None:
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise ConfigError(f"PixelCNN kernel={self.kernel} must be odd and at least 3")
        if self.layers < 1 or self.channels < 1:
            raise ConfigError("PixelCNN layers and channels must be at least 1")


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int, cond_channels: int):
        super().__init__()
        n = kernel // 2
        self.n, self.first = n, first
        self.v_conv = nn.Conv2d(channels, 2 * channels, (n + 1, kernel))  # rows i-n..i, columns j-n..j+n
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, n + 1))  # columns j-n..j (first layer: j-n-1..j-1)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.class_emb = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        self.cond = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, labels: Optional[torch.Tensor],
                cond_map: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n
        height, width = v.shape[-2:]
        v_feat = self.v_conv(F.pad(v, (n, n, n, 0)))  # (N, 2C, H, W): sees rows <= i
        if self.first:  # mask A: pixels strictly to the left
            h_feat = self.h_conv(F.pad(h, (n + 1, 0, 0, 0)))[..., :width]
        else:
            h_feat = self.h_conv(F.pad(h, (n, 0, 0, 0)))
        v_down = F.pad(v_feat, (0, 0, 1, 0))[..., :height, :]  # shift down one row: rows < i only
        h_feat = h_feat + self.v_to_h(v_down)
        bias = 0
        if self.class_emb is not None and labels is not None:
            bias = bias + self.class_emb(labels)[:, :, None, None]
        if self.cond is not None and cond_map is not None:
            bias = bias + self.cond(cond_map)
        if not isinstance(bias, int):
            bv, bh = bias.chunk(2, dim=1)
            v_feat, h_feat = v_feat + bv, h_feat + bh
        v_out = _gate(v_feat)
        h_gated = self.h_out(_gate(h_feat))
        h_out = h_gated if self.first else h + h_gated  # no residual from the first layer's input (it holds x_i)
        return v_out, h_out


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedPixelCNN(nn.Module):
    """Logits (N, K, H, W) over ``codes`` values at every position of an (N, H, W) map of code indices,
    each depending only on the positions before it in raster order (and on the condition)."""

    def __init__(self, cfg: PixelCNNConfig, codes: int, num_classes: int = 0, cond_channels: int = 0):
        super().__init__()
        self.cfg, self.codes, self.num_classes = cfg, codes, num_classes
        c = cfg.channels
        self.embed = nn.Embedding(codes, c)
        self.layers = nn.ModuleList([GatedLayer(c, cfg.kernel, i == 0, num_classes, cond_channels)
                                     for i in range(cfg.layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, codes, 1))

    def forward(self, indices: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cond_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(indices).movedim(-1, 1)  # (N, C, H, W)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels, cond_map)
        return self.head(h)

    def nll(self, indices: torch.Tensor, labels: Optional[torch.Tensor] = None,
            cond_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-map negative log-likelihood in nats per position, (N,)."""
        logits = self(indices, labels, cond_map).float()
        return F.cross_entropy(logits, indices, reduction="none").flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int], labels: Optional[torch.Tensor] = None,
               cond_map: Optional[torch.Tensor] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw (n, H, W) code maps position by position in raster order (one network pass per position),
        from softmax(logits / temperature)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        height, width = shape
        out = torch.zeros(n, height, width, dtype=torch.long, device=device)
        for i in range(height):
            for j in range(width):
                logits = self(out, labels, cond_map)[:, :, i, j].float() / temperature
                probs = logits.softmax(-1).cpu()
                out[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        return out
