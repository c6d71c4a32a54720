"""CLIP's text tower (Radford et al. 2021) as Stable Diffusion conditions on it: OpenAI's ViT-L/14 text encoder for
SD 1.x (quick-GELU, the last layer's output) and OpenCLIP ViT-H/14's for SD 2.x (GELU, the penultimate layer's).

Token and position embeddings, ``layers`` pre-norm transformer blocks under a causal mask, and the final
LayerNorm applied to the output of the layer SD reads (``skip_last`` layers before the end: 0 for 1.x, 1 for the
original 2.x file; diffusers' 2.x folders drop the unused last layer and read the end). The weights load from
transformers' ``CLIPTextModel`` layout or OpenCLIP's (``interop/sd_text.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.nn.attention import Attention

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    """:param vocab_size: tokens of the BPE vocabulary (49,408 for both released towers).
    :param max_length: positions (77). :param skip_last: final layers whose output SD does not read."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    activation: str = "quick_gelu"
    skip_last: int = 0
    eps: float = 1e-5

    def check(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"clip_text.width={self.width} must be divisible by clip_text.heads={self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"clip_text.activation={self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not 0 <= self.skip_last < self.layers:
            raise ConfigError(f"clip_text.skip_last={self.skip_last} must lie in [0, layers={self.layers})")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads, causal=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPTextEncoder(nn.Module):
    """Token ids (N, L <= max_length) -> token features (N, L, width), what SD's cross-attention reads."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))
        self.layers = nn.ModuleList([CLIPTextLayer(cfg) for _ in range(cfg.layers)])
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: torch.Tensor, skip_last: Optional[int] = None) -> torch.Tensor:
        """``skip_last`` overrides the config's (e.g. "clip skip" 2 for some 1.x fine-tunes reads one layer earlier)."""
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"{ids.shape[1]} tokens; the text encoder has {self.cfg.max_length} positions")
        skip = self.cfg.skip_last if skip_last is None else skip_last
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (N, L, W)
        for layer in self.layers[: len(self.layers) - skip]:
            x = layer(x)
        return self.final_norm(x)
