"""Image files to the 8-bit grey or RGB pixels every source holds, one rule for all of them (in-memory folders,
streamed folders and ImageNet, parquet shards, latent-store extraction).

- 16-bit (and 32-bit integer) grey images are scaled to 8 bits (v * 255 / 65535, rounded), not clipped at 255
  (Pillow's own conversion clips them, which makes a 16-bit image solid white). 16-bit RGB files are already
  reduced to 8 bits per channel by Pillow when they are opened.
- Transparency (RGBA, LA, PA, a palette with a transparent colour) is composited on white: a transparent pixel is
  white, a half-transparent one halfway to white.
- EXIF orientation is not applied: pixels are used as stored, as ADM's and the official DiT's loaders use them.
- ``channels`` 1 takes the luma (ITU-R 601-2, Pillow's "L"), 3 repeats a grey image over RGB; None keeps an image's
  own count (``natural_channels``: 1 for grey modes, with or without alpha; 3 otherwise).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def natural_channels(mode: str) -> int:
    """The channels an image of PIL ``mode`` has as pixels: 1 for grey (with or without alpha), 3 otherwise."""
    return 1 if mode in GREY_MODES else 3


def decoded(im, channels: Optional[int] = None):
    """The PIL image ``im`` as an 8-bit "L" (``channels`` 1) or "RGB" (3) image, by the rules of this module; with
    ``channels`` None, in its own channel count."""
    from PIL import Image

    channels = channels or natural_channels(im.mode)
    if im.mode in WIDE_GREY_MODES:
        wide = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode != "I" or wide.max() > 255 else 255.0  # mode "I" also holds 8-bit values
        im = Image.fromarray(np.clip(np.rint(wide * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ALPHA_MODES:
        base = "L" if im.mode in ("LA", "La") else "RGB"
        im = im.convert("RGBA" if base == "RGB" else "LA")
        background = Image.new(base, im.size, (255,) * len(base))  # white
        background.paste(im.convert(base), mask=im.getchannel("A"))
        im = background
    return im.convert("L" if channels == 1 else "RGB")


def pixels(im, channels: Optional[int] = None) -> np.ndarray:
    """``decoded(im, channels)`` as a writable uint8 array, (C, H, W)."""
    a = np.array(decoded(im, channels), dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


__all__ = ["decoded", "natural_channels", "pixels"]
