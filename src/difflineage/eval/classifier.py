"""The MNIST feature network: a small CNN classifier trained on mnist5k's training split.

Inception features are a poor fit for 28x28 digits; the usual alternative, used here, is the features of
a classifier trained on the digits themselves. Its 128-d penultimate activations give "FID (MNIST
features)", KID and precision/recall; its logits give the Inception Score analogue and the class accuracy
of conditional samples.

The classifier is an instrument, so it is the same on every machine: it was trained once, with the fixed
recipe below, by ``python benchmarks/train_mnist_classifier.py``, and its weights ship in the package
(``mnist-classifier.safetensors`` beside this module). :func:`mnist_classifier` loads that file and nothing
else, after checking its sha256 against ``SHIPPED_SHA256``; it never trains. docs/evaluation.md ("The MNIST
feature classifier") gives the file's hash, held-out accuracy, the machine that trained it, and the
real-vs-real FIDs it reads.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABCMeta, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflineage.data import ImageDataset
from difflineage.errors import CheckpointError
from difflineage.storage import sha256_of

ARCH_VERSION = "mnist-cnn-v2"
RECIPE = {"epochs": 20, "batch_size": 128, "lr": 5e-3, "weight_decay": 1e-4, "max_shift": 2, "seed": 0}
INPUT_SIZE = 32

SHIPPED_PATH = Path(__file__).resolve().with_name("mnist-classifier.safetensors")
SHIPPED_SHA256 = "f369a924cb5f2fe2c9c91e6e4e1262d84980adc2e5bb22208816e146ccec2e4a"
TRAIN_COMMAND = "python benchmarks/train_mnist_classifier.py"


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) image batch in [-1, 1] -> (N, 1, 32, 32): gray, 28x28 padded as mnist5k is,
    other sizes resized."""
    x = images.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"the MNIST classifier reads 1- or 3-channel images, got {x.shape[1]} channels")
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        return F.pad(x, (2, 2, 2, 2), value=-1.0)
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=h > INPUT_SIZE)
    return x


class FeatureClassifier(nn.Module, metaclass=ABCMeta):
    """A shipped classifier instrument: ``body`` (images brought to its input by ``prepare``) -> penultimate features,
    ``head`` -> class logits, ``dropout`` between them in training. Subclasses build the three."""

    num_features: int
    body: nn.Module
    dropout: nn.Module
    head: nn.Module

    @staticmethod
    @abstractmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> what ``body`` reads (each instrument says how)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, num_features) penultimate activations."""
        return self.body(self.prepare(images))

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


class MnistClassifier(FeatureClassifier):
    """Conv(16)x2 - pool - Conv(32)x2 - pool - Conv(64) - pool - Linear(128) - Linear(10), ReLU throughout."""

    num_features = 128
    prepare = staticmethod(to_classifier_input)

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, 16), *conv(16, 16), nn.MaxPool2d(2),  # (N, 16, 16, 16)
            *conv(16, 32), *conv(32, 32), nn.MaxPool2d(2),  # (N, 32, 8, 8)
            *conv(32, 64), nn.MaxPool2d(2),  # (N, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, self.num_features), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.num_features, num_classes)


def content_hash(train: ImageDataset) -> str:
    """A hash of everything that defines the classifier: architecture, recipe, training images and labels."""
    h = hashlib.sha256()
    h.update(ARCH_VERSION.encode())
    h.update(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(train.images.numpy().tobytes())
    h.update(train.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def accuracy(model: MnistClassifier, dataset: ImageDataset, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            b = dataset.batch(range(s, min(s + batch_size, len(dataset))))
            correct += (model(b["image"]).argmax(1) == b["label"]).sum().item()
    return correct / len(dataset)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, fill: float = -1.0) -> torch.Tensor:
    """Translate each image by its own whole-pixel offset in [-max_shift, max_shift], filling with ``fill`` (black
    for digits, white (1.0) for images drawn on white)."""
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=fill)
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * s)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_classifier(train: ImageDataset, progress: bool = True) -> MnistClassifier:
    """Train the classifier with the fixed recipe: AdamW, cosine schedule, random shifts of up to 2 px."""
    r = RECIPE
    with torch.random.fork_rng():
        torch.manual_seed(r["seed"])
        g = torch.Generator().manual_seed(r["seed"])
        model = MnistClassifier(train.num_classes or 10)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        steps_per_epoch = len(train) // r["batch_size"]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch)
        bar = tqdm(range(r["epochs"]), desc="training the MNIST feature classifier (once)", disable=not progress, leave=False)
        model.train()
        for _ in bar:
            order = torch.randperm(len(train), generator=g)
            for i in range(steps_per_epoch):
                b = train.batch(order[i * r["batch_size"] : (i + 1) * r["batch_size"]])
                x = random_shift(to_classifier_input(b["image"]), r["max_shift"], g)
                loss = F.cross_entropy(model.head(model.dropout(model.body(x))), b["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def load_shipped(path: Path, sha256: str, model: nn.Module, what: str, command: str) -> nn.Module:
    """``model`` with the weights of the shipped file ``path``, in eval mode, after checking the file's sha256
    against ``sha256`` (the instrument's digest in the code); a missing or altered file is refused
    (CheckpointError), naming ``what`` it is and the ``command`` that trains a new one."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        shown = path.relative_to(Path(__file__).resolve().parents[2])
    except ValueError:
        shown = path
    regenerate = (f"reinstall difflineage, or restore src/{shown} from the repository; to train a new instrument, "
                  f"`{command}` rewrites that file, and the digest in the code and the docs' scores read with it "
                  "must then change with it")
    if not path.is_file():
        raise CheckpointError(f"{what}'s weights {path} are missing; {regenerate}")
    found = sha256_of(path)
    if found != sha256:
        raise CheckpointError(f"{what}'s weights {path} have sha256 {found}, not the shipped {sha256}: the file was "
                              f"altered, and scores read with it would not be comparable to the docs'; {regenerate}")
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def mnist_classifier(path: Path = SHIPPED_PATH, sha256: str = SHIPPED_SHA256) -> MnistClassifier:
    """The shipped classifier, in eval mode; a missing or altered weights file is refused (CheckpointError)."""
    return load_shipped(path, sha256, MnistClassifier(), "the MNIST feature classifier", TRAIN_COMMAND)
