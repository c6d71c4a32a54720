"""Frozen parts: everything a system uses but does not train, as one kind of part.

A frozen part is a network made from a spec (an earlier run, a Stable Diffusion VAE file), loaded once and strictly,
known by its kind and by the digest of its weights (what a latent store records), kept in eval mode with no
gradients. The system registers the network under its own name, so checkpoint keys do not depend on the part; the
part is the one handle through which the system loads, encodes and decodes with it:

- a **first stage** (``FirstStage``): images to a latent space and back. ``GaussianStage`` (an ``autoencoder_kl``
  run, a Stable Diffusion VAE file) encodes to posterior moments (mean, std); ``CodeStage`` (a VQ-VAE / VQ-VAE-2
  autoencoder, a DALL-E dVAE) to code maps. ``encode(batch)`` decides, in one place, where a batch's encoding comes
  from: a latent store's batch carries it; the in-memory training set attached before training is encoded once and
  looked up by index; anything else is encoded on the fly.
- any other frozen network a system carries (DALL-E's CLIP for reranking; next, text encoders): a ``FrozenPart``
  of its own kind.

The stage systems say what they offer as a first stage (``ProvidesFirstStage``); ``difflineage extract`` and the
two-stage systems take it from there, never by a system's name.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn as nn

from difflineage.data import AnyBatch, Dataset
from difflineage.data.store import StoreDataset, check_store_first_stage
from difflineage.errors import CheckpointError
from difflineage.interop.sd_vae import load_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKL
from difflineage.weights import load_state_dict_strict, state_digest

Encoded = Union[torch.Tensor, tuple[torch.Tensor, ...]]


_STAGE_READS: Optional[dict] = None  # what reading_stages_once has read, by what was read


@contextlib.contextmanager
def reading_stages_once() -> Iterator[None]:
    """Within this block each earlier stage's checkpoint or file is read once, however often it is asked for (a
    config resolved from a first stage's checkpoint, then its weights loaded from the same checkpoint)."""
    global _STAGE_READS
    outer = _STAGE_READS
    _STAGE_READS = {} if outer is None else outer
    try:
        yield
    finally:
        _STAGE_READS = outer


def read_once(key: tuple, read: Callable[[], Any]) -> Any:
    """``read()``, or within :func:`reading_stages_once` what it gave for ``key`` the first time."""
    if _STAGE_READS is None:
        return read()
    if key not in _STAGE_READS:
        _STAGE_READS[key] = read()
    return _STAGE_READS[key]


class FrozenPart:
    """A network a system uses but does not train (see the module docstring): ``module`` (registered by the system
    under its own name), the ``spec`` it comes from and its ``kind``."""

    kind: ClassVar[str] = "frozen"

    def __init__(self, module: nn.Module, spec: str):
        self.module, self.spec = module, spec
        module.requires_grad_(False).eval()

    @property
    def digest(self) -> str:
        """sha256 of the weights (a latent store made by this part records it)."""
        return state_digest(self.module.state_dict())

    def load(self, weights: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
        """Load ``weights`` strictly (every bad key named, with ``source``), once, before training."""
        load_state_dict_strict(self.module, weights, source or self.spec)
        self.module.eval()


class FirstStage(FrozenPart, abc.ABC):
    """A frozen first stage: images -> encodings (``encode_images``) -> images (``decode``), and where a training
    batch's encoding comes from (``attach`` once, then ``encode``)."""

    kind: ClassVar[str]
    cache_batch: ClassVar[int] = 500  # images per encoder call while encoding the training set

    def __init__(self, module: nn.Module, spec: str, channels: int):
        super().__init__(module, spec)
        self.channels = channels  # of the images it reads
        self.cache: Optional[EncodedTrainingSet] = None

    @abc.abstractmethod
    def encode_images(self, x: torch.Tensor) -> Encoded:
        """Images in [-1, 1] -> this stage's encoding (no gradients)."""

    @abc.abstractmethod
    def decode(self, z: Encoded) -> torch.Tensor:
        """An encoding -> images in [-1, 1]."""

    @abc.abstractmethod
    def from_store(self, batch: AnyBatch) -> Optional[Encoded]:
        """The encoding a latent store's batch carries (None for a batch of images)."""

    @abc.abstractmethod
    def store_arrays(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoding of images ``x`` as a latent store keeps it, by array name (``difflineage extract``)."""

    def attach(self, dataset: Dataset, device: torch.device, cache: bool = True) -> None:
        """Before training (after the weights are in place): a latent store is checked to be this stage's (its kind
        and weights digest), else refused by name; an in-memory training set is encoded once, now, in full
        precision (``cache``; a training step then looks its batch up); a set streamed from disk is encoded batch
        by batch as it comes (``difflineage extract`` is the way to encode such a set once)."""
        self.cache = None
        if isinstance(dataset, StoreDataset):
            check_store_first_stage(dataset, self.kind, self.digest, self.spec)
        elif cache and dataset.in_memory:
            self.cache = EncodedTrainingSet(self.encode_images, dataset, device, self.cache_batch)
            self.cache.compute()

    def encode(self, batch: AnyBatch, training: bool) -> Encoded:
        """The batch's encoding: from a latent store, from the training set's cache (``training`` on the attached
        set: the batch's ``index`` and ``flip`` pick it), else encoded now."""
        stored = self.from_store(batch)
        if stored is not None:
            return stored
        if self.cache is not None and training and batch.get("index") is not None:
            return self.cache.lookup(batch["index"], batch.get("flip"))
        return self.encode_images(batch["image"])


class GaussianStage(FirstStage):
    """A KL autoencoder (``AutoencoderKL``): encodings are the posterior's (mean, std) in float32."""

    kind = "gaussian"
    cache_batch = 250

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.module.encode(x)
        return mean.float(), torch.exp(0.5 * logvar.float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).float().clamp(-1, 1)

    def from_store(self, batch: AnyBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return (batch["latent_mean"], batch["latent_std"]) if "latent_mean" in batch else None

    def store_arrays(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, std = self.encode_images(x)
        return {"mean": mean, "std": std}

    @classmethod
    def from_sd_vae(cls, path: Union[str, Path], norm_groups: int = 32) -> "GaussianStage":
        """A Stable Diffusion VAE file (LDM or diffusers layout) as a first stage of its own."""
        vae = sd_vae(f"sd-vae:{path}", norm_groups)
        return cls(vae, f"sd-vae:{path}", vae.image_channels)


class CodeStage(FirstStage):
    """A discrete first stage (VQ-VAE, VQ-VAE-2, DALL-E's dVAE): encodings are code maps, one tensor per level."""

    kind = "codes"

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> Encoded:
        return self.module.encode(x)

    def decode(self, codes: Encoded) -> torch.Tensor:
        return self.module.decode(*(codes if isinstance(codes, tuple) else (codes,))).float().clamp(-1, 1)

    def from_store(self, batch: AnyBatch) -> Optional[Encoded]:
        return batch.get("codes")

    def store_arrays(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        codes = self.encode_images(x)
        return {f"codes{i}": c for i, c in enumerate(codes if isinstance(codes, tuple) else (codes,))}

    @property
    def fits_int16(self) -> bool:
        """Whether every code index fits in int16 (the store then keeps code maps at half the size)."""
        sizes = [m.num_embeddings for m in self.module.modules() if isinstance(m, nn.Embedding)]
        return bool(sizes) and max(sizes) <= 32767


@runtime_checkable
class ProvidesFirstStage(Protocol):
    """A stage system whose network can serve as a first stage (an ``autoencoder_kl`` run, a VQ-VAE or VQ-VAE-2
    autoencoder, a DALL-E dVAE): ``as_first_stage`` gives it as a part. The later stages (priors) are not."""

    def as_first_stage(self, spec: str) -> FirstStage:
        """This run's network as a frozen first stage made from ``spec``."""


def sd_vae(spec: str, norm_groups: int) -> AutoencoderKL:
    """The Stable Diffusion VAE file of ``sd-vae:PATH`` (read once within ``reading_stages_once``)."""
    path = Path(spec.split(":", 1)[1])
    if not path.is_file():
        raise CheckpointError(f"no Stable Diffusion VAE file at '{path}' (model.first_stage=sd-vae:PATH)")
    return read_once(("sd-vae", str(path.resolve()), norm_groups), lambda: load_sd_vae(path, norm_groups=norm_groups))


class EncodedTrainingSet:
    """Every training image as a frozen stage encodes it (latent moments, code maps, image tokens), computed once
    and looked up by the batch's ``index``. When the data mirrors images (``data.flip``), the mirror images are
    encoded too and a batch's ``flip`` picks between them (an encoder is not mirror-symmetric: the latents of a
    mirrored image are not the mirrored latents)."""

    def __init__(self, encode: Callable[[torch.Tensor], Encoded], dataset: Dataset, device: torch.device,
                 batch: int = 500):
        self.encode, self.dataset, self.device, self.batch = encode, dataset, device, batch
        self.flips = dataset.flip
        self._encoded: Optional[Encoded] = None
        self._mirrored: Optional[Encoded] = None

    @torch.no_grad()
    def _encode_all(self, mirror: bool) -> Encoded:
        d = self.dataset
        parts = []
        for s in range(0, len(d), self.batch):
            x = d.batch(range(s, min(s + self.batch, len(d))), self.device)["image"]
            parts.append(self.encode(x.flip(-1) if mirror else x))
        return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)

    def __deepcopy__(self, memo: dict) -> "EncodedTrainingSet":
        """Shared, not copied: the encodings of a frozen stage are the same in a copy of the system holding it (the
        EMA's), which never trains on them; a copy would double them and the training set they were made from."""
        return self

    def compute(self) -> Encoded:
        """Encode the whole dataset in batches (a tuple of tensors per batch gives a tuple of concatenations)."""
        if self._encoded is None:
            self._encoded = self._encode_all(mirror=False)
            if self.flips:
                self._mirrored = self._encode_all(mirror=True)
        return self._encoded

    def lookup(self, index: torch.Tensor, flip: Optional[torch.Tensor] = None) -> Encoded:
        """The encodings of the images at ``index`` (positions in the dataset), of their mirror images where
        ``flip`` is set."""
        encoded = self.compute()
        pick = lambda e: e[index.to(e.device)]  # noqa: E731
        if flip is None or not self.flips:  # (no test of flip.any(): on a GPU that would wait for the device)
            return tuple(pick(e) for e in encoded) if isinstance(encoded, tuple) else pick(encoded)

        def choose(plain: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
            f = flip.to(plain.device).view(-1, *([1] * (plain.dim() - 1)))
            return torch.where(f, pick(mirrored), pick(plain))
        if isinstance(encoded, tuple):
            return tuple(choose(a, b) for a, b in zip(encoded, self._mirrored))
        return choose(encoded, self._mirrored)
