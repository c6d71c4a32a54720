"""Parquet shards in the schema of the Hugging Face ``imagenet-1k`` dataset, read through the ``datasets`` library.

``data.source=parquet:PATH``: PATH (or PATH/data) holds ``train-*.parquet`` and ``validation-*.parquet`` (the
held-out split), each row an ``image`` struct with the encoded bytes and a ``label``. The ``datasets`` library
(``pip install -e ".[hf]"``) maps them as Arrow tables (it prepares an Arrow copy in its cache once, as for any of
its users: ``HF_DATASETS_CACHE`` says where); images are decoded when a batch needs them, in the DataLoader's
workers, with ADM's centre crop, as the ImageNet folder layout is. Nothing is fetched: the library runs offline.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from difflineage.data.augment import adm_center_crop
from difflineage.data.dataset import ImageFiles
from difflineage.data.decode import decoded
from difflineage.errors import DataError

SPLIT_PREFIX = {"train": "train", "heldout": "validation"}


def parquet_files(root: Path, split: str) -> list[Path]:
    prefix = SPLIT_PREFIX[split]
    for folder in (root, root / "data"):
        found = sorted(folder.glob(f"{prefix}-*.parquet")) if folder.is_dir() else []
        if found:
            return found
    if not root.exists():
        raise DataError(f"parquet folder '{root}' does not exist; point data.source=parquet:PATH at the folder holding "
                        "train-*.parquet and validation-*.parquet (the Hugging Face imagenet-1k layout)")
    raise DataError(f"parquet folder '{root}' has no {prefix}-*.parquet files (nor has {root / 'data'}); the "
                    f"{split} split is read from them")


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: nothing is fetched
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError("parquet sources are read with the datasets library, an optional extra: "
                        "pip install -e \".[hf]\" (or pip install datasets)") from None
    return datasets


def load_parquet(root: Path, split: str, image_size: int, channels: Optional[int], caption) -> "ParquetImages":
    datasets = _datasets()
    files = parquet_files(root, split)
    try:
        table = datasets.Dataset.from_parquet([str(f) for f in files], split="train")
    except Exception as exc:  # ArrowInvalid, a schema mismatch, a damaged file
        raise DataError(f"parquet files in '{root}' ({files[0].name}, ...) could not be read: {exc}") from None
    if "image" not in table.column_names:
        raise DataError(f"parquet files in '{root}' have no 'image' column (columns: {', '.join(table.column_names)}); "
                        "the Hugging Face imagenet-1k schema has an image struct and a label")
    table = table.cast_column("image", datasets.Image(decode=False))  # the encoded bytes; we decode and crop
    labels = names = None
    if "label" in table.column_names:
        labels = np.asarray(table["label"], dtype=np.int64)
        feature = table.features["label"]
        if isinstance(feature, datasets.ClassLabel):
            names = tuple(n.split(",")[0].strip() for n in feature.names)
    if channels is None:
        channels = 3
    return ParquetImages(files=[], labels=labels, image_size=image_size, channels=channels, class_names=names,
                         class_captions=[caption(n) for n in names] if names else None,
                         name=f"parquet:{root}/{split}", table=table, shard_names=[f.name for f in files])


@dataclass
class ParquetImages(ImageFiles):
    """ImageFiles whose images are rows of Arrow tables instead of files."""

    table: Any = None
    shard_names: list = field(default_factory=list)
    rows: Optional[np.ndarray] = None  # the table rows of a subset (None: all, in order)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.table)

    def _row(self, index: int) -> int:
        return int(self.rows[index]) if self.rows is not None else index

    def read(self, index: int) -> torch.Tensor:
        from PIL import Image

        row = self._row(index)
        try:
            cell = self.table[row]["image"]
            with Image.open(io.BytesIO(cell["bytes"])) as im:
                im = decoded(im, self.channels)
                arr = adm_center_crop(im, self.image_size)
        except Exception as exc:
            raise DataError(f"{self.name}: row {row} (of {', '.join(self.shard_names[:2])}{' ...' if len(self.shard_names) > 2 else ''}) "
                            f"could not be decoded as an image ({type(exc).__name__}: {exc})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.array(arr))  # a writable copy (the crop of a PIL image is a read-only view)

    def subset(self, indices) -> "ParquetImages":
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.long).tolist(), dtype=np.int64)
        rows = self.rows[idx] if self.rows is not None else idx
        return ParquetImages(files=[], labels=None if self.labels is None else self.labels[idx],
                             image_size=self.image_size, channels=self.channels, class_names=self.class_names,
                             class_captions=self.class_captions, name=self.name, flip=self.flip, seed=self.seed,
                             table=self.table, shard_names=self.shard_names, rows=rows)

    def __post_init__(self) -> None:  # files are rows here: the base class's checks do not apply
        pass


__all__ = ["ParquetImages", "load_parquet", "parquet_files"]
