"""Sample-quality metrics on feature vectors: FID, KID, Inception Score, precision/recall.

Features are extracted once (``eval/features.py``) and every metric reads them, so FID, KID and
precision/recall of one evaluation all see the same vectors. FID, KID and IS are torchmetrics'
implementations, fed through a pass-through "feature network" (and told not to synchronise across
processes: under torchrun only rank 0 scores, on the gathered samples); precision and recall follow
Kynkaanniemi et al. (2019), which torchmetrics does not have.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


class _Precomputed(nn.Module):
    """Lets torchmetrics' metrics take feature vectors we computed ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of feature vectors (N, D):
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), with unbiased covariances."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake, minimum=2, what="FID")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel, averaged over
    random subsets; returns (mean, std). Subsets shrink to the smaller set when it has fewer vectors."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake, minimum=2, what="KID")
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS (Salimans et al. 2016): exp E[KL(p(y|x) || p(y))] from classifier logits, mean and std over splits."""
    from torchmetrics.image.inception import InceptionScore

    if len(logits) < splits:
        raise ValueError(f"the Inception Score needs at least {splits} samples (one per split), got {len(logits)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each vector to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s : s + chunk], x)  # (c, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the vector itself sits at distance 0
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each point: does it fall inside some support vector's k-NN ball?"""
    inside = []
    for s in range(0, len(points), chunk):
        d = torch.cdist(points[s : s + chunk], support)  # (c, M)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its vectors reaching their k-th nearest neighbour.
    Precision: the share of fake vectors inside the real manifold (are samples realistic?).
    Recall: the share of real vectors inside the fake manifold (is the data's variety covered?).
    """
    _check(real, fake, minimum=k + 1, what="precision/recall")
    real, fake = real.double(), fake.double()
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int, what: str) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what} compares two (N, D) feature sets of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"{what} needs at least {minimum} vectors per set, got {len(real)} real and {len(fake)} generated")
