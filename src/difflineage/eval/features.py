"""Feature networks for the sample-quality metrics, and batched feature extraction.

``mnist``: the 128-d penultimate features of difflineage's MNIST classifier ("FID (MNIST features)"),
the right instrument for 1-channel digit data. ``openmoji``: the 256-d features of the shipped OpenMoji subgroup
classifier (eval/openmoji_instrument.py), the instrument for OpenMoji. ``inception``: the 2048-d pool features of the FID
InceptionV3, from the standard weights file given by path, the instrument for natural images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from difflineage.eval.classifier import mnist_classifier
from difflineage.eval.inception import load_fid_inception
from difflineage.eval.openmoji_instrument import openmoji_classifier

FEATURE_KINDS = ("auto", "mnist", "openmoji", "inception")


@dataclass
class FeatureNetwork:
    """A network that turns images in [-1, 1] into feature vectors and class logits."""

    name: str  # how reports name it, e.g. "MNIST features"
    kind: str  # mnist | openmoji | inception
    module: nn.Module  # has features(images), logits_from_features(feats), num_features

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 250, progress: bool = False,
                desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [-1, 1] -> (features (N, D), logits (N, K)), computed in batches, float32."""
        self.module.eval()
        device = next(self.module.parameters()).device
        feats = []
        for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            feats.append(self.module.features(images[s : s + batch_size].to(device)).float().cpu())
        f = torch.cat(feats) if feats else torch.zeros(0, self.module.num_features)
        return f, self.module.logits_from_features(f.to(device)).float().cpu()


def data_instrument(source: str, digits: bool = False) -> Optional[str]:
    """The shipped instrument made for a data set (``openmoji`` for OpenMoji, ``mnist`` for digits), or None: its
    classes are the data's, so its class accuracy and (OpenMoji's) caption scores apply."""
    if source == "openmoji":
        return "openmoji"
    return "mnist" if digits else None


def feature_network(kind: str = "auto", channels: int = 1, inception_weights: Optional[str | Path] = None,
                    progress: bool = True, device: str | torch.device = "cpu",
                    inception_resize: str = "tf", source: str = "") -> FeatureNetwork:
    """Pick the feature network: ``auto`` is the OpenMoji classifier for the ``openmoji`` source, the MNIST
    classifier for other 1-channel data, InceptionV3 otherwise (``inception_resize``: ``tf``, the FID graph's resize,
    or ``pytorch-fid``'s; eval.inception)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature network {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")
    if kind == "auto":
        kind = "openmoji" if data_instrument(source) == "openmoji" else "mnist" if channels == 1 else "inception"
    if kind == "mnist":
        return FeatureNetwork("MNIST features", "mnist", mnist_classifier().to(device))
    if kind == "openmoji":
        return FeatureNetwork("OpenMoji features", "openmoji", openmoji_classifier().to(device))
    net = load_fid_inception(inception_weights, resize=inception_resize).to(device)
    return FeatureNetwork(f"InceptionV3 features ({inception_resize} resize)", "inception", net)
