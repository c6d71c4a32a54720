"""Embeddings shared by the diffusion backbones (UNet, DiT)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as DiT and improved-diffusion compute it:
    freqs_i = exp(-ln(max_period) * i / (dim / 2)), output [cos(t freqs), sin(t freqs)], (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal frequencies -> Linear - SiLU - Linear (DiT's ``t_embedder``: ``mlp.0`` and ``mlp.2``)."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))  # (N, hidden)


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra row (index ``num_classes``) for "no label": the null condition
    of classifier-free guidance. ``drop`` replaces labels by the null class with probability ``drop_prob``."""

    def __init__(self, num_classes: int, hidden: int, drop_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.drop_prob = drop_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        if self.drop_prob <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.drop_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train:
            labels = self.drop(labels)
        return self.embedding_table(labels)
