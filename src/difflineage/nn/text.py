"""A small text encoder for captions: UTF-8 bytes -> transformer -> token features and a pooled vector.

Byte-level tokens need no vocabulary file, so a checkpoint rebuilds the tokenizer from its config alone. The
empty caption "" is the null condition of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from difflineage.errors import ConfigError

PAD, BOS = 256, 257  # byte values are 0..255


@dataclass
class TextEncoderConfig:
    """:param width: token feature size. :param depth: transformer layers. :param max_length: tokens kept,
    BOS included (longer captions are cut)."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    max_length: int = 40

    def check(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} must be divisible by text.heads={self.heads}")
        if self.max_length < 2 or self.depth < 1:
            raise ConfigError("text.max_length must be at least 2 and text.depth at least 1")


def token_length(captions: list[str], max_length: int) -> int:
    """The tokens the longest of ``captions`` takes (BOS included, at most ``max_length``), from the text alone."""
    return min(max_length, 1 + max((len(c.encode("utf-8")) for c in captions), default=0))


def tokenize(captions: list[str], max_length: int, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (tokens (N, L) long, mask (N, L) bool, True on real tokens): L is ``max_length``, or with ``trim``
    the longest caption's length (what the padding adds is masked out either way)."""
    ids = [[BOS, *c.encode("utf-8")[: max_length - 1]] for c in captions]
    length = token_length(captions, max_length) if trim else max_length
    tokens = torch.full((len(captions), length), PAD, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, tokens != PAD


class TextEncoder(nn.Module):
    """Pre-norm transformer encoder over caption bytes; returns (tokens (N, L, width), mask (N, L), pooled (N, width))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(258, cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.max_length, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, captions: list[str], trim: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``trim``: tokens only up to the longest caption's length (the pooled vector is the same; the token
        features are then as long as that, not ``max_length``)."""
        device = self.position_embedding.device
        tokens, mask = tokenize(captions, self.cfg.max_length, trim)
        tokens, mask = tokens.to(device), mask.to(device)
        x = self.token_embedding(tokens) + self.position_embedding[:, : tokens.shape[1]]  # (N, L, W)
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens (N, W)
        return x, mask, pooled
