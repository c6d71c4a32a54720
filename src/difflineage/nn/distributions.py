"""Log-likelihoods and KL terms shared by the likelihood-based models (VAE, diffusion decoders).

All functions return per-element values (no reduction), in nats, in float32 or wider.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kl_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) per dimension, closed form:
    0.5 * (mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) per dimension."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(logvar)) per dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def bernoulli_log_likelihood(logits: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """log p(target | logits) for binary targets in {0, 1} (or probabilities, for soft targets)."""
    return -F.binary_cross_entropy_with_logits(logits.float(), target01.float(), reduction="none")


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log P(x) for data in [-1, 1] quantised to ``bins`` levels, under N(mean, exp(log_scale)^2).

    Each level owns the interval of width 2 / (bins - 1) around it; the two end levels own the tails
    (-inf and +inf), so the probabilities of all levels sum to one and the result is a true
    discrete log-likelihood (bits/dim comparable across models).
    """
    x, mean, log_scale = x.float(), mean.float(), log_scale.float()
    half_bin = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = _standard_normal_cdf((x - mean + half_bin) * inv_scale)
    lower = _standard_normal_cdf((x - mean - half_bin) * inv_scale)
    log_cdf_upper = torch.log(upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - lower).clamp(min=1e-12))
    log_mid = torch.log((upper - lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_mid))


def nats_to_bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert a per-image negative log-likelihood in nats to bits per dimension."""
    return nats / (dims * math.log(2.0))
