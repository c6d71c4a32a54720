"""Embeddings shared by the diffusion backbones (UNet, DiT)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

TIMESTEP_LAYOUTS = ("cos_sin", "ddpm")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, layout: str = "cos_sin") -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N, dim).

    ``layout="cos_sin"`` as DiT, improved-diffusion and Stable Diffusion compute it: freqs_i = exp(-ln(max_period) *
    i / (dim / 2)), output [cos(t freqs), sin(t freqs)]. ``"ddpm"`` as Ho et al.'s code (and the released DDPM
    weights): freqs_i = exp(-ln(max_period) * i / (dim / 2 - 1)), output [sin, cos]."""
    if layout not in TIMESTEP_LAYOUTS:
        raise ValueError(f"timestep embedding layout {layout!r}; choose one of {', '.join(TIMESTEP_LAYOUTS)}")
    half = dim // 2
    steps = half - 1 if layout == "ddpm" else half
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(1, steps))
    args = t.float()[:, None] * freqs[None]
    pair = (torch.sin(args), torch.cos(args)) if layout == "ddpm" else (torch.cos(args), torch.sin(args))
    emb = torch.cat(pair, dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal frequencies -> Linear - SiLU - Linear (DiT's ``t_embedder``: ``mlp.0`` and ``mlp.2``)."""

    def __init__(self, hidden: int, frequency_dim: int = 256, layout: str = "cos_sin"):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.layout = layout
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the frequencies are computed in float32 and given to the MLP in its weights' type (a half-precision network)
        freq = timestep_embedding(t, self.frequency_dim, layout=self.layout)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, hidden)


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
