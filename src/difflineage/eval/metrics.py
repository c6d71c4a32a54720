"""Sample-quality metrics on feature vectors and logits: FID, KID, Inception Score, precision/recall.

One implementation of each, as ADM's evaluator (guided-diffusion's ``evaluations/evaluator.py``) computes it; where
the digit evaluation (eval.scores) and FID-50K (eval.adm) follow different conventions, the convention is an argument.
Features are extracted once (``eval/features.py``, ``eval/adm.py``) and every metric reads them.

- FID: the Frechet distance between Gaussians fitted to two feature sets (float64 means and unbiased covariances),
  with scipy's sqrtm and the evaluator's 1e-6 diagonal offset when the product is singular.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel, over random subsets.
- Inception Score (Salimans et al. 2016): exp E[KL(p(y|x) || p(y))] within each split, in float64. The evaluator
  splits the logits in their order into splits of 5,000; the digit evaluation shuffles them (seeded) into 10 splits.
- Precision and recall (Kynkaanniemi et al. 2019): k = 3 nearest-neighbour manifolds over squared Euclidean
  distances, computed in float16 where finite (as the evaluator does), or in float32 or float64.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from scipy import linalg

from difflineage.errors import DataError


def statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features, in float64 (of float32 features, as the evaluator keeps
    them)."""
    features = np.asarray(features)
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)


def gaussian_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                              eps: float = 1e-6) -> float:
    """The Frechet distance between two Gaussians, |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as the evaluator
    computes it."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"the Frechet distance has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}; "
                            "too few samples for the feature size?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of feature vectors (N, D): the Frechet distance of their Gaussians."""
    _check(real, fake, minimum=2, what="FID")
    return gaussian_frechet_distance(*statistics(real), *statistics(fake))


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over ``subsets`` random subsets of
    ``subset_size`` vectors from each set (drawn from ``seed``; they shrink to the smaller set when it has fewer
    vectors); returns (mean, population std over the subsets)."""
    _check(real, fake, minimum=2, what="KID")
    real, fake = real.double(), fake.double()
    size = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    mmds = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:size]]
        y = fake[torch.randperm(len(fake), generator=g)[:size]]
        k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
        off_diagonal = (k_xx.sum(dim=-1) - k_xx.diag()).sum() + (k_yy.sum(dim=-1) - k_yy.diag()).sum()
        mmds.append(off_diagonal / (size * (size - 1)) - 2 * k_xy.sum(dim=0).sum() / size**2)
    mmd = torch.stack(mmds)
    return float(mmd.mean()), float(mmd.std(unbiased=False))


def _cubic_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T * (1.0 / x.shape[1]) + 1.0) ** 3


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000, splits: Optional[int] = None,
                    seed: Optional[int] = None) -> tuple[float, float]:
    """IS of (N, K) classifier logits: exp(E KL(p(y|x) || p(y))) within each split, then the mean (and the unbiased
    std; NaN for one split) over the splits.

    :param split_size: rows per split, in the logits' order (the evaluator's 5,000; the last split may be shorter).
    :param splits: instead, this many splits of ceil(N / splits) rows (torch.chunk's sizes, as torchmetrics splits).
    :param seed: shuffle the rows first with a permutation drawn from this seed (torchmetrics' convention).
    """
    logits = torch.as_tensor(logits).double()
    if splits is not None:
        if len(logits) < splits:
            raise ValueError(f"the Inception Score needs at least {splits} samples (one per split), got {len(logits)}")
        split_size = math.ceil(len(logits) / splits)
    if seed is not None:
        logits = logits[torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for s in range(0, len(p), split_size):
        part, log_part = p[s : s + split_size], log_p[s : s + split_size]
        kl = part * (log_part - part.mean(dim=0, keepdim=True).log())  # (n, K): p(y|x) log(p(y|x) / p(y))
        scores.append(kl.sum(dim=1).mean().exp())
    score = torch.stack(scores)
    return float(score.mean()), float(score.std()) if len(score) > 1 else math.nan


def _squared_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|u_i - v_j|^2 for every pair, computed in ``dtype``; float16 (the evaluator's distance block) falls back to
    float32 where it overflows."""
    def dist(a, b):
        return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)
    if dtype == torch.float16:
        d = dist(u.float().half().float(), v.float().half().float()).half()
        if torch.isfinite(d).all():
            return d.float()
        dtype = torch.float32
    return dist(u.to(dtype), v.to(dtype))


# The fewest images a set needs to be scored at all: precision/recall's k = 3 nearest neighbours need k + 1 per set
# (and a covariance 2). A number from so few means little: the papers score 50,000 samples against 10,000 images.
MIN_IMAGES = 4


def check_enough(count: int, what: str) -> None:
    """Refuse, in one line, a set of ``count`` images (``what`` names it) too small to be scored."""
    if count < MIN_IMAGES:
        raise DataError(f"{what} holds {count} image(s); scoring needs at least {MIN_IMAGES} per set (precision/"
                        f"recall's {MIN_IMAGES - 1} nearest neighbours), and thousands for a number that means "
                        "something: give more")


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     dtype: torch.dtype = torch.float16, chunk: int = 10000) -> tuple[float, float]:
    """Improved precision and recall.

    Each set's manifold is the union of balls around its vectors reaching their k-th nearest neighbour.
    Precision: the share of fake vectors inside the real manifold (are samples realistic?).
    Recall: the share of real vectors inside the fake manifold (is the data's variety covered?).

    :param dtype: the precision of the squared distances: float16 where finite (the evaluator's), float32 or float64.
    :param chunk: vectors per block of the distance matrix.
    """
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    _check(real, fake, minimum=k + 1, what="precision/recall")

    def blocks(points, support):  # rows of the distance matrix, ``chunk`` points at a time
        for s in range(0, len(points), chunk):
            yield torch.cat([_squared_distances(points[s : s + chunk], support[t : t + chunk], dtype)
                             for t in range(0, len(support), chunk)], 1)

    def radii(x):  # the k-th neighbour (the nearest is the point itself)
        return torch.cat([d.kthvalue(k + 1, dim=1).values for d in blocks(x, x)])

    def inside(points, support, r):
        return torch.cat([(d <= r[None]).any(1) for d in blocks(points, support)]).double().mean().item()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int, what: str) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what} compares two (N, D) feature sets of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"{what} needs at least {minimum} vectors per set, got {len(real)} real and {len(fake)} generated")


__all__ = ["frechet_distance", "gaussian_frechet_distance", "inception_score", "kernel_inception_distance",
           "precision_recall", "statistics"]
