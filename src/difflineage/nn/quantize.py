"""Vector quantisation (van den Oord et al. 2017), shared by VQ-VAE and VQ-VAE-2.

Each encoder output vector z is replaced by its nearest codebook entry e_k. The network trains through the
non-differentiable lookup with the straight-through estimator (the decoder's gradient is copied to z), and two
losses place the codes and the encoder:

- codebook loss ``|| sg[z] - e ||^2`` moves the codes toward the encoder outputs assigned to them;
- commitment loss ``beta || z - sg[e] ||^2`` (beta = 0.25) keeps the encoder near its codes.

With ``ema=True`` the codebook is instead an exponential moving average of the assigned encoder outputs
(VQ-VAE's appendix, decay 0.99; counts Laplace-smoothed), and only the commitment loss remains. Codebook
collapse (most codes never used) is the common failure; ``restart_after`` re-seeds every code that no vector
chose for that many training steps with a random encoder output of the current batch. Under
DistributedDataParallel the EMA statistics are summed over processes and restarts draw from rank 0's batch, so
every process keeps the same codebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def code_usage(counts: torch.Tensor) -> tuple[float, int]:
    """(perplexity, codes used) of code counts (K,): exp of the entropy of the usage distribution (K if every
    code is used equally), and how many codes were chosen at all."""
    p = counts.float() / counts.sum()
    return math.exp(-(p * torch.log(p + 1e-10)).sum().item()), int((counts > 0).sum())


@dataclass
class Quantized:
    """``quantized``: the codes in z's shape, with straight-through gradients to z; ``indices`` (N, ...) of the
    codes; ``loss`` = codebook loss (0 with EMA) + beta x commitment loss; the parts and two usage metrics of
    the batch: ``perplexity`` (exp of the entropy of code usage; the number of codes if all were used equally)
    and ``used`` (distinct codes chosen)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    used: torch.Tensor


class VectorQuantizer(nn.Module):
    """Quantise (N, D, *spatial) tensors to a codebook of ``codes`` x ``dim`` (``dim`` = D)."""

    def __init__(self, codes: int = 512, dim: int = 64, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, restart_after: int = 0):
        super().__init__()
        if codes < 2 or dim < 1:
            raise ValueError(f"a codebook needs at least 2 codes of width >= 1 (got {codes} x {dim})")
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must lie in (0, 1)")
        self.codes, self.dim, self.beta, self.ema, self.decay, self.eps = codes, dim, beta, ema, decay, eps
        self.restart_after = restart_after
        self.embedding = nn.Embedding(codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codes, 1.0 / codes)
        if ema:
            self.embedding.weight.requires_grad_(False)
            # each code starts as one vector's worth of evidence for its initial value: m_k / N_k is then e_k, and
            # a code no batch picks decays toward it instead of growing as m_k / eps (with N_k = 0 and m_k = e_k,
            # one update made an unpicked code about 1e5 times its size, out of reach of every encoder output)
            self.register_buffer("ema_count", torch.ones(codes))
            self.register_buffer("ema_sum", self.embedding.weight.detach().clone())
        self.register_buffer("idle_steps", torch.zeros(codes, dtype=torch.long))  # training steps since last chosen

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes (squared Euclidean distance) of (M, D) vectors."""
        e = self.codebook.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of (N, *spatial) indices as (N, D, *spatial)."""
        return self.embedding(indices).movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> Quantized:
        if z.shape[1] != self.dim:
            raise ValueError(f"the quantiser expects {self.dim} channels, got a tensor of shape {tuple(z.shape)}")
        z = z.float()
        flat = z.movedim(1, -1).reshape(-1, self.dim)  # (M, D)
        idx = self.nearest(flat.detach())
        onehot = F.one_hot(idx, self.codes).to(flat.dtype)  # (M, K)
        counts = onehot.sum(0)
        if self.training:
            with torch.no_grad():
                global_counts = _all_reduce(counts.clone())
                if self.ema:
                    self._ema_update(global_counts, _all_reduce(onehot.t() @ flat.detach()))
                self.idle_steps.add_(1).masked_fill_(global_counts > 0, 0)
                if self.restart_after:
                    self._restart(flat.detach())
        q_flat = self.codebook[idx].float()
        codebook_loss = F.mse_loss(q_flat, flat.detach()) if not self.ema else flat.new_zeros(())
        commitment_loss = F.mse_loss(flat, q_flat.detach())
        q = q_flat.view(*z.movedim(1, -1).shape).movedim(-1, 1)
        quantized = z + (q - z).detach()  # straight-through: forward q, gradient to z unchanged
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return Quantized(quantized=quantized, indices=idx.view(z.shape[0], *z.shape[2:]),
                         loss=codebook_loss + self.beta * commitment_loss, codebook_loss=codebook_loss,
                         commitment_loss=commitment_loss, perplexity=perplexity.detach(), used=(counts > 0).sum().detach())

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """N_k <- d N_k + (1 - d) n_k; m_k <- d m_k + (1 - d) sum of the z assigned to k; e_k = m_k / N~_k with
        Laplace-smoothed counts N~_k = (N_k + eps) / (N + K eps) N."""
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codes * self.eps) * n
        self.embedding.weight.data.copy_(self.ema_sum / smoothed[:, None])

    def _restart(self, flat: torch.Tensor) -> None:
        """Re-seed codes idle for ``restart_after`` steps with random encoder outputs of this batch (rank 0's)."""
        dead = (self.idle_steps >= self.restart_after).nonzero().squeeze(1)
        if len(dead) == 0:
            return
        pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
        new = flat[pick] + 1e-3 * flat.std() * torch.randn(len(dead), self.dim, device=flat.device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        self.idle_steps[dead] = 0
        if self.ema:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = new


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t
