"""Turning model outputs in [-1, 1] into pictures: uint8 arrays, grids, PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, the layout of image files and of ADM's npz."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 picture, ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, C) uint8 array as PNG (gray for C = 1), optionally enlarged by ``scale``."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Tile images in [-1, 1] into a grid and write it as PNG; returns the path."""
    return save_png(make_grid(images, nrow=nrow), path, scale=scale)


def save_captioned_panels(panels: dict[str, torch.Tensor], row_labels: list[str], path: str | Path,
                          per_row: int) -> Path:
    """Grids side by side, one titled panel per entry of ``panels`` ((rows * per_row, C, H, W) images each), with
    each row labelled on the left (e.g. the caption it was drawn for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {title: make_grid(images, nrow=per_row) for title, images in panels.items()}
    h, w = next(iter(grids.values())).shape[:2]
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * w / 50 + 2.2, h / 50 + 0.6), squeeze=False)
    rows = len(row_labels)
    for i, (ax, (title, grid)) in enumerate(zip(axes[0], grids.items())):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([(r + 0.5) * h / rows for r in range(rows)])
        ax.set_yticklabels(row_labels if i == 0 else [""] * rows, fontsize=8)
        ax.tick_params(length=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
