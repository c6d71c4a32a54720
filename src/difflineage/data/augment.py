"""The preprocessing of the papers' ImageNet pipelines, and augmentation randomness that needs no random state.

``adm_center_crop``: ADM's and DiT's centre crop (guided-diffusion's ``center_crop_arr``, which the official DiT
training script uses): halve the image with a box filter while its short side is at least twice the target,
resize bicubically so that the short side is the target, and cut the centre square.

``flips``: whether image ``index`` is mirrored on its visit in ``epoch`` of a run seeded ``seed``. It is a hash of
the three numbers, not a draw from a generator, so it is the same in any DataLoader worker, under any number of
processes, and after a resume in the middle of an epoch: the flip never has to be saved, and never repeats the
same way every epoch (fast-DiT's stored latents fixed one flip per image for the whole run).
"""

from __future__ import annotations

import numpy as np

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of each element (uint64 arithmetic wraps around)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, index, salt: int = 0) -> np.ndarray:
    """A number in [0, 1) for each (seed, epoch, index, salt), the same wherever it is computed."""
    idx = np.asarray(index, dtype=np.uint64)
    key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _splitmix64(np.asarray(epoch, dtype=np.uint64)
                                                                          ^ np.uint64(salt << 32)))
    h = _splitmix64(idx ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def flips(seed: int, epoch: int, index) -> np.ndarray:
    """Booleans: mirror image ``index`` in ``epoch`` (half of the images, a different half each epoch)."""
    return hash_uniform(seed, epoch, index, salt=1) < 0.5


def adm_center_crop(image, size: int) -> np.ndarray:
    """ADM/DiT centre crop of a PIL image to ``size`` x ``size``; returns uint8 (H, W) or (H, W, C)."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


__all__ = ["adm_center_crop", "flips", "hash_uniform"]
