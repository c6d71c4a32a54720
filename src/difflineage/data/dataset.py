"""The in-memory image dataset every source produces, and the batch every system consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, TypedDict

import torch
import torch.nn.functional as F

from difflineage.errors import DataError


class Batch(TypedDict, total=False):
    """What ``System.loss`` receives.

    image: float in [-1, 1], (N, C, H, W); label: long (N,) or None; caption: N strings or None;
    index: the images' positions in their dataset (lets a system look up per-image caches, e.g. latents).
    (The training step is ``System.loss``'s second argument, not part of the batch.)
    """

    image: torch.Tensor
    label: Optional[torch.Tensor]
    caption: Optional[list[str]]
    index: torch.Tensor


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
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is None:
            return None
        return int(self.labels.max()) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> Batch:
        """Gather ``indices`` into a batch on ``device``, images scaled to [-1, 1]."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        image = self.images[idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        label = self.labels[idx].to(device) if self.labels is not None else None
        caption = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        return {"image": image, "label": label, "caption": caption, "index": idx}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            images=self.images[idx],
            labels=self.labels[idx] if self.labels is not None else None,
            captions=[self.captions[i] for i in idx.tolist()] if self.captions is not None else None,
            class_names=self.class_names,
            name=self.name,
        )


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
