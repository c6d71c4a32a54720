"""Frozen first stages, shared by every two-stage system: the autoencoder of a latent diffusion model (an
``autoencoder_kl`` run or a Stable Diffusion VAE file), and the training set as a frozen stage encodes it, computed
once and looked up by batch index. (An earlier stage's checkpoint of the same system: ``System.stage_checkpoint``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from difflineage.checkpoint import Checkpoint
from difflineage.data import ImageDataset
from difflineage.data.store import StoreDataset, check_store_first_stage
from difflineage.errors import CheckpointError
from difflineage.interop.sd_vae import load_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKLConfig
from difflineage.systems.autoencoder import AutoencoderKLSystem
from difflineage.systems.base import read_stage
from difflineage.weights import state_digest

Encoded = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def _sd_vae_file(spec: str) -> Path:
    path = Path(spec.split(":", 1)[1])
    if not path.is_file():
        raise CheckpointError(f"no Stable Diffusion VAE file at '{path}' (model.first_stage=sd-vae:PATH)")
    return path


def _autoencoder_run(spec: str) -> Checkpoint:
    return read_stage(spec, "first_stage", (AutoencoderKLSystem,),
                      "it must be an autoencoder_kl one (or sd-vae:PATH)")


def autoencoder_architecture(spec: str, norm_groups: int) -> tuple[AutoencoderKLConfig, int]:
    """(architecture, image channels) of a latent model's first stage: ``sd-vae:PATH`` (a Stable Diffusion VAE
    file, LDM or diffusers layout) or an ``autoencoder_kl`` checkpoint or run directory."""
    if spec.startswith("sd-vae:"):
        vae = load_sd_vae(_sd_vae_file(spec), norm_groups=norm_groups)
        return vae.cfg, vae.image_channels
    ckpt = _autoencoder_run(spec)
    return ckpt.config.model, ckpt.config.data.channels or 1


def autoencoder_weights(spec: str, norm_groups: int) -> dict[str, torch.Tensor]:
    """The weights of the first stage named by ``spec`` (see :func:`autoencoder_architecture`)."""
    if spec.startswith("sd-vae:"):
        return load_sd_vae(_sd_vae_file(spec), norm_groups=norm_groups).state_dict()
    return _autoencoder_run(spec).part("ae.")


def trains_from_store(dataset, module: torch.nn.Module, kind: str, spec: str) -> bool:
    """Whether ``dataset`` is a latent store (``data.latents``); if so, check that ``module`` (the frozen first
    stage, weights loaded) made it, else refuse by name."""
    if not isinstance(dataset, StoreDataset):
        return False
    check_store_first_stage(dataset, kind, state_digest(module.state_dict()), spec)
    return True


class EncodedTrainingSet:
    """Every training image as a frozen stage encodes it (latent moments, code maps, image tokens), computed once
    on first use (after a resumed run's own weights are loaded) and looked up by the batch's ``index``. When the
    data mirrors images (``data.flip``), the mirror images are encoded too and a batch's ``flip`` picks between them
    (an encoder is not mirror-symmetric: the latents of a mirrored image are not the mirrored latents)."""

    def __init__(self, encode: Callable[[torch.Tensor], Encoded], dataset: ImageDataset, device: torch.device,
                 batch: int = 500):
        self.encode, self.dataset, self.device, self.batch = encode, dataset, device, batch
        self.flips = bool(getattr(dataset, "flip", False))
        self._encoded: Optional[Encoded] = None
        self._mirrored: Optional[Encoded] = None

    @classmethod
    def for_dataset(cls, encode: Callable[[torch.Tensor], Encoded], dataset, device: torch.device,
                    batch: int = 500) -> Optional["EncodedTrainingSet"]:
        """The cache for an in-memory dataset; None for one streamed from disk (each batch is then encoded as it
        comes; a latent store made by ``difflineage extract`` is the way to encode such a set once)."""
        return cls(encode, dataset, device, batch) if getattr(dataset, "in_memory", True) else None

    @torch.no_grad()
    def _encode_all(self, mirror: bool) -> Encoded:
        d = self.dataset
        parts = []
        for s in range(0, len(d), self.batch):
            x = d.batch(range(s, min(s + self.batch, len(d))), self.device)["image"]
            parts.append(self.encode(x.flip(-1) if mirror else x))
        return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)

    def forget(self) -> None:
        """Drop the encodings made so far: the encoder's weights are being replaced (a resumed run loads the first
        stage its checkpoint carries), and the next lookup encodes with the new ones."""
        self._encoded = self._mirrored = None

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
