"""The OpenMoji instrument: a subgroup classifier whose features give FID/KID/precision/recall, and a CLIP for scoring
captions, both trained once and shipped in the package, like the MNIST classifier.

- ``OpenMojiClassifier``: a small CNN over the 98 Unicode subgroups (3 x 32 x 32, drawn on white). Its 256-d
  penultimate activations are "FID (OpenMoji features)"; its logits give the subgroup accuracy of class-conditional
  samples and the Inception Score analogue.
- The scoring CLIP (``models/clip.py``, byte-level text tower): the CLIP score of samples against their captions,
  and caption retrieval: for each image, the rank of its own caption among 100 (itself and 99 others of the same
  set, the same 99 for every image drawn for that caption), reported as top-1 and top-5.

The scoring CLIP is trained apart from every recipe's text encoder (its own stage, its own seed) and no recipe
conditions on it, so no generator is tuned toward its judge. Both are trained by
``python benchmarks/train_openmoji_instrument.py`` on the training split only, and loaded from the shipped files
after their sha256 is checked; they never train at run time. docs/text-to-image.md gives their held-out scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflineage.data import ImageDataset
from difflineage.eval.classifier import FeatureClassifier, load_shipped, random_shift
from difflineage.models.clip import CLIP, CLIPConfig, clip_score
from difflineage.nn.text import TextEncoderConfig

INPUT_SIZE = 32
NUM_SUBGROUPS = 98
CLASSIFIER_ARCH = "openmoji-cnn-v1"
CLASSIFIER_RECIPE = {"epochs": 60, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "max_shift": 2, "seed": 0}
CLIP_ARCH = "openmoji-clip-v1"
CLIP_CONFIG = CLIPConfig(embed=128, channels=32, text=TextEncoderConfig(width=128, depth=3, heads=4, max_length=81))
CLIP_RECIPE = {"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.05, "max_shift": 2, "seed": 20211}
RETRIEVAL_CANDIDATES = 100

_HERE = Path(__file__).resolve()
CLASSIFIER_PATH = _HERE.with_name("openmoji-classifier.safetensors")
CLASSIFIER_SHA256 = "8888ba6eb4a4f544d309415d5df20b33f5ba0e78d6dbbd5975054749677bd4bd"
CLIP_PATH = _HERE.with_name("openmoji-clip.safetensors")
CLIP_SHA256 = "85782f55dc3a2e19ac760919beeae7a33c3030b07ae270d733b14d2e643c2a89"
TRAIN_COMMAND = "python benchmarks/train_openmoji_instrument.py"


def to_instrument_input(images: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) batch in [-1, 1] -> (N, 3, 32, 32): grey repeated to three channels, other sizes resized
    (antialiased when shrinking)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"the OpenMoji instrument reads 1- or 3-channel images, got {x.shape[1]} channels")
    h, w = x.shape[-2:]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=h > INPUT_SIZE)
    return x


class OpenMojiClassifier(FeatureClassifier):
    """Conv(32)x2 - pool - Conv(64)x2 - pool - Conv(128)x2 - pool - Linear(256) - Linear(98); GroupNorm, ReLU."""

    num_features = 256
    prepare = staticmethod(to_instrument_input)

    def __init__(self, num_classes: int = NUM_SUBGROUPS):
        super().__init__()

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(3, 32), *conv(32, 32), nn.MaxPool2d(2),  # (N, 32, 16, 16)
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),  # (N, 64, 8, 8)
            *conv(64, 128), *conv(128, 128), nn.MaxPool2d(2),  # (N, 128, 4, 4)
            nn.Flatten(), nn.Linear(128 * 16, self.num_features), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.4)
        self.head = nn.Linear(self.num_features, num_classes)


def _epochs(recipe: dict, n: int, what: str, progress: bool):
    """(generator, steps per epoch, a progress bar over the recipe's epochs) with the recipe's seed set."""
    torch.manual_seed(recipe["seed"])
    g = torch.Generator().manual_seed(recipe["seed"])
    steps = max(1, n // recipe["batch_size"])
    return g, steps, tqdm(range(recipe["epochs"]), desc=f"training {what} (once)", disable=not progress, leave=False)


def _augment(images: torch.Tensor, recipe: dict, g: torch.Generator, flip: bool) -> torch.Tensor:
    x = random_shift(to_instrument_input(images), recipe["max_shift"], g, fill=1.0)  # drawn on white
    if flip:
        mirror = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def train_classifier(train: ImageDataset, progress: bool = True) -> OpenMojiClassifier:
    """The subgroup classifier with the fixed recipe: AdamW, one-cycle schedule, shifts of up to 2 px and mirroring
    (a subgroup holds both hands, both arrows)."""
    r = CLASSIFIER_RECIPE
    with torch.random.fork_rng():
        g, steps, bar = _epochs(r, len(train), "the OpenMoji subgroup classifier", progress)
        model = OpenMojiClassifier(train.num_classes or NUM_SUBGROUPS)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps)
        model.train()
        for _ in bar:
            order = torch.randperm(len(train), generator=g)
            for i in range(steps):
                b = train.batch(order[i * r["batch_size"]: (i + 1) * r["batch_size"]])
                x = _augment(b["image"], r, g, flip=True)
                loss = F.cross_entropy(model.head(model.dropout(model.body(x))), b["label"], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_clip(train: ImageDataset, progress: bool = True) -> CLIP:
    """The scoring CLIP with its fixed recipe and seed (no mirroring: "leftwards" and "rightwards" are captions)."""
    r = CLIP_RECIPE
    with torch.random.fork_rng():
        g, steps, bar = _epochs(r, len(train), "the OpenMoji scoring CLIP", progress)
        model = CLIP(CLIP_CONFIG, image_channels=3)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                                lr=r["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps, pct_start=0.1)
        model.train()
        for _ in bar:
            order = torch.randperm(len(train), generator=g)
            for i in range(steps):
                pick = order[i * r["batch_size"]: (i + 1) * r["batch_size"]]
                b = train.batch(pick)
                loss, acc = model.loss(_augment(b["image"], r, g, flip=False), [train.captions[j] for j in pick.tolist()])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
    return model.eval()


class _InstrumentCLIP(CLIP):
    """The scoring CLIP: reads any image size and 1- or 3-channel images (brought to its 3 x 32 x 32)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return super().encode_image(to_instrument_input(images))


def openmoji_classifier(path: Path = CLASSIFIER_PATH, sha256: Optional[str] = None) -> OpenMojiClassifier:
    """The shipped subgroup classifier, in eval mode; a missing or altered file is refused (CheckpointError)."""
    return load_shipped(path, CLASSIFIER_SHA256 if sha256 is None else sha256, OpenMojiClassifier(),
                        "the OpenMoji subgroup classifier", TRAIN_COMMAND)


def scoring_clip(path: Path = CLIP_PATH, sha256: Optional[str] = None) -> CLIP:
    """The shipped scoring CLIP, in eval mode; a missing or altered file is refused (CheckpointError)."""
    return load_shipped(path, CLIP_SHA256 if sha256 is None else sha256, _InstrumentCLIP(CLIP_CONFIG, image_channels=3),
                        "the OpenMoji scoring CLIP", TRAIN_COMMAND)


def candidates(pool: int, own: int, k: int = RETRIEVAL_CANDIDATES, seed: int = 0) -> torch.Tensor:
    """The caption indices (into a pool of ``pool`` captions) an image drawn for caption ``own`` is ranked among:
    ``own`` first, then ``min(k, pool) - 1`` others, the same for every image of that caption."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + own)
    others = torch.randperm(pool - 1, generator=g)[: min(k, pool) - 1]
    return torch.cat([torch.tensor([own]), others + (others >= own).long()])


@torch.no_grad()
def caption_ranks(clip: CLIP, images: torch.Tensor, caption_ids: torch.Tensor, pool: list[str],
                  k: int = RETRIEVAL_CANDIDATES, seed: int = 0, batch: int = 250) -> torch.Tensor:
    """For each image (in [-1, 1]) drawn for ``pool[caption_ids[i]]``, how many of its ``k`` candidate captions the
    CLIP places above its own (0: its own caption is first), (N,) long."""
    device = next(clip.parameters()).device
    text = torch.cat([clip.encode_text(pool[s: s + batch]) for s in range(0, len(pool), batch)]).cpu()
    image = torch.cat([clip.encode_image(images[s: s + batch].to(device)) for s in range(0, len(images), batch)]).cpu()
    ranks = torch.empty(len(images), dtype=torch.long)
    for i, own in enumerate(caption_ids.tolist()):
        cand = candidates(len(pool), own, k, seed)
        sims = text[cand] @ image[i]
        ranks[i] = (sims[1:] > sims[0]).sum()
    return ranks


def retrieval_scores(ranks: torch.Tensor, prefix: str = "retrieval") -> dict[str, float]:
    """top-1 and top-5 shares of a rank vector."""
    return {f"{prefix}_top1": (ranks == 0).double().mean().item(), f"{prefix}_top5": (ranks < 5).double().mean().item()}


def caption_scores(clip: CLIP, images: torch.Tensor, caption_ids: torch.Tensor, pool: list[str],
                   subsets: Optional[dict[str, torch.Tensor]] = None, suffix: str = "") -> dict[str, float]:
    """CLIP score and caption retrieval (top-1, top-5 among ``min(100, len(pool))``) of images drawn for the pool's
    captions ``caption_ids``; ``subsets`` (name -> bool mask over the images) are reported apart, as
    ``retrieval_NAME_top5``; ``suffix`` ends every key (``_real`` for the real images' values)."""
    ranks = caption_ranks(clip, images, caption_ids, pool)
    captions = [pool[i] for i in caption_ids.tolist()]
    out = {"clip_score": clip_score(clip, images, captions), **retrieval_scores(ranks),
           "retrieval_candidates": min(RETRIEVAL_CANDIDATES, len(pool))}
    for name, mask in (subsets or {}).items():
        if mask.any():
            out.update(retrieval_scores(ranks[mask], f"retrieval_{name}"))
            out[f"clip_score_{name}"] = clip_score(clip, images[mask], [c for c, m in zip(captions, mask.tolist()) if m])
    return {(k + suffix if k != "retrieval_candidates" else k): v for k, v in out.items()}


def shipped_metadata(path: Path) -> dict:
    """What the training script wrote into a shipped file's metadata (held-out scores, machine, recipe)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("recipe", "scores"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


__all__ = ["CLASSIFIER_PATH", "CLIP_CONFIG", "CLIP_PATH", "OpenMojiClassifier", "candidates", "caption_ranks",
           "caption_scores", "openmoji_classifier", "retrieval_scores", "scoring_clip", "to_instrument_input",
           "train_classifier", "train_clip"]
