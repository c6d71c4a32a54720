"""The datasets the sources produce, and the batch every system consumes.

``ImageDataset`` holds every image in memory as uint8 (the embedded digits, small folders): a batch is one
indexing operation. ``ImageFiles`` reads each image from disk when it is asked for (ImageNet, large folders),
ADM's centre crop included, so that memory is O(batch x workers), not O(dataset); ``data.loader.BatchStream`` reads
it in DataLoader worker processes. Both answer ``len``, ``batch(indices, device)`` (decoded in this process),
``subset``, ``shape``, ``num_classes``, ``class_names``; with ``flip`` on, ``batch(..., epoch=E)`` mirrors the
images ``augment.flips`` picks for that epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, TypedDict, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from difflineage.data.augment import adm_center_crop, flips
from difflineage.data.decode import decoded
from difflineage.errors import DataError


class BatchOf(TypedDict, total=False):
    """What every batch carries beside its images or their encodings: label: long (N,) or None; caption: N strings
    or None; index: the images' positions in their dataset (lets a system look up per-image caches, e.g.
    latents); flip: bool (N,), which images are mirrored (``data.flip``), so that a cache gives the mirror image's
    latents. (The training step is ``System.loss``'s second argument, not part of the batch.)"""

    label: Optional[torch.Tensor]
    caption: Optional[list[str]]
    index: torch.Tensor
    flip: torch.Tensor


class Batch(BatchOf, total=False):
    """What ``System.loss`` receives from a set of images: image: float in [-1, 1], (N, C, H, W)."""

    image: torch.Tensor


class LatentBatch(BatchOf, total=False):
    """What a latent store of a Gaussian first stage gives (``StoreDataset``): each image's posterior moments
    instead of the image, latent_mean and latent_std: float (N, c, h, w)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor


class CodesBatch(BatchOf, total=False):
    """What a latent store of a discrete first stage gives: each image's code map (long (N, h, w); a tuple of maps,
    coarse first, for several levels) instead of the image."""

    codes: Union[torch.Tensor, tuple[torch.Tensor, ...]]


AnyBatch = Union[Batch, LatentBatch, CodesBatch]


@runtime_checkable
class Dataset(Protocol):
    """What the trainer, the systems and evaluation ask of a training or held-out set (``ImageDataset``,
    ``ImageFiles``, ``store.StoreDataset``).

    :param in_memory: batches are gathered in the training process (held in memory or memory-mapped); False: each
        image is decoded from disk, in DataLoader workers (``data.loader``).
    :param holds_images: ``batch`` gives images (a ``Batch``); False: stored encodings (``LatentBatch`` or
        ``CodesBatch``).
    :param flip: images are mirrored where ``augment.flips`` says so for the batch's epoch."""

    in_memory: bool
    holds_images: bool
    flip: bool
    name: str

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> Optional[int]: ...

    def batch(self, indices, device: torch.device | str = "cpu", epoch: Optional[int] = None) -> AnyBatch: ...


def count_classes(class_names: Optional[Sequence[str]], labels) -> Optional[int]:
    """A dataset's number of classes: one per class name, else the largest label + 1 (None when unlabelled)."""
    if class_names is not None:
        return len(class_names)
    return None if labels is None else int(labels.max()) + 1


@dataclass
class ImageDataset:
    """Images held in memory as uint8 (N, C, H, W), with optional labels and captions.

    Small datasets (the lineage's default digits) fit in memory many times over; holding them as
    uint8 keeps even the full 70,000-image MNIST at 70 MB and makes a batch one indexing operation.
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: Optional[torch.Tensor] = None  # long (N,)
    captions: Optional[list[str]] = None
    class_names: Optional[tuple[str, ...]] = None
    name: str = ""
    flip: bool = False  # mirror half of each batch's images (augment.flips), given the epoch
    seed: int = 0
    in_memory = True
    holds_images = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"{self.name}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> Optional[int]:
        return count_classes(self.class_names, self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: Optional[int] = None) -> Batch:
        """Gather ``indices`` into a batch on ``device``, images scaled to [-1, 1] (mirrored where ``flip`` and the
        epoch's flips say so)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx]
        mirror = None
        if self.flip and epoch is not None:
            mirror = torch.from_numpy(flips(self.seed, epoch, idx.numpy()))
            images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
        image = to_device(images, device).float().div_(127.5).sub_(1.0)
        label = to_device(self.labels[idx], device) if self.labels is not None else None
        caption = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        out = {"image": image, "label": label, "caption": caption, "index": idx}
        if mirror is not None:
            out["flip"] = mirror
        return out

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            images=self.images[idx],
            labels=self.labels[idx] if self.labels is not None else None,
            captions=[self.captions[i] for i in idx.tolist()] if self.captions is not None else None,
            class_names=self.class_names,
            name=self.name,
            flip=self.flip,
            seed=self.seed,
        )


@dataclass
class ImageFiles:
    """Images read from disk on demand: ``files[i]`` decoded, converted to ``channels`` and centre-cropped to
    ``image_size`` the ADM/DiT way, when image ``i`` is asked for. Labels are kept as one small array; captions as one
    string per class (``class_captions``) or per file (``captions``)."""

    files: list[str]
    labels: Optional[np.ndarray]  # int64 (N,)
    image_size: int
    channels: int  # 1 or 3
    class_names: Optional[tuple[str, ...]] = None
    class_captions: Optional[list[str]] = None
    captions: Optional[list[str]] = None
    name: str = ""
    flip: bool = False
    seed: int = 0
    in_memory = False
    holds_images = True
    _errors: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        n = len(self.files)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"{self.name}: {len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> Optional[int]:
        return count_classes(self.class_names, self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (C, H, W); a file that cannot be decoded raises DataError naming it."""
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as im:
                arr = adm_center_crop(decoded(im, self.channels), self.image_size)
        except Exception as exc:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
            raise DataError(f"{path} could not be decoded as an image ({type(exc).__name__}: {exc}); repair or remove "
                            "it (difflineage does not drop files silently)") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.array(arr))  # a writable copy (the crop of a PIL image is a read-only view)

    def caption_of(self, index: int) -> Optional[str]:
        if self.captions is not None:
            return self.captions[index]
        if self.class_captions is not None and self.labels is not None:
            return self.class_captions[int(self.labels[index])]
        return None

    def item(self, index: int, epoch: Optional[int] = None) -> dict:
        """One image (uint8, mirrored where this epoch's flips say so), its label and caption."""
        image = self.read(index)
        mirror = bool(self.flip and epoch is not None and flips(self.seed, epoch, index))
        if mirror:
            image = image.flip(-1)
        return {"image": image, "label": None if self.labels is None else int(self.labels[index]),
                "caption": self.caption_of(index), "index": index, "flip": mirror}

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: Optional[int] = None) -> Batch:
        """Decode ``indices`` here (the trainer reads through DataLoader workers instead: data.loader)."""
        return collate([self.item(int(i), epoch) for i in torch.as_tensor(indices).tolist()], device)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageFiles":
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        return ImageFiles(files=[self.files[i] for i in idx],
                          labels=None if self.labels is None else self.labels[idx],
                          image_size=self.image_size, channels=self.channels, class_names=self.class_names,
                          class_captions=self.class_captions,
                          captions=None if self.captions is None else [self.captions[i] for i in idx],
                          name=self.name, flip=self.flip, seed=self.seed)

    def load(self) -> ImageDataset:
        """Every image decoded into memory (for small sets and subsets: held-out pictures, scores)."""
        b = collate([self.item(i) for i in range(len(self))], "cpu", scale=False)
        return ImageDataset(images=b["image"], labels=b["label"], captions=b["caption"], class_names=self.class_names,
                            name=self.name)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait for the GPU: a copy from pageable memory is
    synchronous, so on CUDA the tensor is pinned first and copied asynchronously."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def collate(items: list[dict], device: torch.device | str = "cpu", scale: bool = True) -> Batch:
    """Stack items of ``ImageFiles.item`` into a batch: images to ``device`` in [-1, 1] (``scale``) or kept uint8."""
    images = torch.stack([it["image"] for it in items])
    labels = [it["label"] for it in items]
    captions = [it["caption"] for it in items]
    image = to_device(images, device)
    if scale:
        image = image.float().div_(127.5).sub_(1.0)
    return {"image": image,
            "label": None if labels[0] is None else torch.tensor(labels, dtype=torch.long, device=device),
            "caption": None if captions[0] is None else captions,
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "flip": torch.tensor([it.get("flip", False) for it in items], dtype=torch.bool)}


def fit_size(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring uint8 (N, C, h, w) images to (N, C, size, size).

    Smaller square images are centred on a zero border (``pad``) or resized bilinearly (``resize``);
    larger or non-square ones are resized on the shorter side and centre-cropped.
    """
    n, c, h, w = images.shape
    if h == size and w == size:
        return images
    if mode == "pad" and h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top))
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(images.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = out[:, :, top : top + size, left : left + size]
    return out.round().clamp(0, 255).to(torch.uint8)
