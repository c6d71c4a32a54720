"""The latent store: a training set encoded once by a frozen first stage, in a few large shards.

    STORE/
      store.json                  what made it (first stage and its weights' digest, data source, image size,
                                  count), the arrays of each item, the shards with their sha256; written last
      shard_000000.mean.bin       raw fixed-size arrays, item after item, memory-mapped for random access
      shard_000000.std.bin        (a Gaussian first stage: posterior mean and standard deviation, fp16 or bf16)
      shard_000000.json           the shard's count, digests, labels and captions: present = the shard is complete
      .lock                       held by the process that writes

Every item holds the encoding of the image and of its mirror image (index 0 and 1 of each array's first axis), so
that training draws a fresh posterior sample and a fresh flip on every visit, as training on the images would; a
discrete first stage (VQ-VAE, VQ-VAE-2, DALL-E's dVAE) stores its code maps (``codes0``, ``codes1``: int16/int32).
Shards are written batch by batch under a temporary name, flushed and renamed when complete, so an interrupted
extraction resumes at the first shard it lacks. Readers verify each shard's size (and its sidecar's labels against
its count) when opening, and the sha256 of its arrays and sidecar with ``verify``; extraction run again on a damaged
store re-encodes only the damaged shards (extract.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from difflineage.data.augment import flips
from difflineage.data.dataset import CodesBatch, LatentBatch, count_classes, to_device
from difflineage.errors import DataError
from difflineage.storage import fsync_dir, sha256_of, write_text_durably, writing

FORMAT = 1
META = "store.json"
REPAIR = ("run the same difflineage extract command again: it checks every shard and re-encodes only those that are "
          "damaged")
DTYPES = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16), "fp32": (np.float32, torch.float32),
          "int16": (np.int16, torch.int16), "int32": (np.int32, torch.int32)}


def shard_name(k: int) -> str:
    return f"shard_{k:06d}"



def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor in the store's dtype, as the numpy array written to disk (bf16 as its raw 16 bits)."""
    if dtype == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).cpu().numpy()
    return t.to(DTYPES[dtype][1]).contiguous().cpu().numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bf16" else t


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def complete_shards(root: Path) -> set[int]:
    """The shards whose sidecar exists (their arrays were renamed into place before it was written)."""
    done = set()
    for f in Path(root).glob("shard_*.json"):
        try:
            done.add(int(f.stem.split("_")[1]))
        except ValueError:
            continue
    return done


def remove_partial(root: Path) -> list[Path]:
    """Delete the temporary files an interrupted extraction left; returns them."""
    left = sorted(Path(root).glob(".tmp-*"))
    for f in left:
        f.unlink(missing_ok=True)
    return left


def item_bytes(spec: dict) -> int:
    """The bytes of one item of an array described by ``spec`` (its ``shape`` and ``dtype``)."""
    return int(np.prod(spec["shape"])) * np.dtype(DTYPES[spec["dtype"]][0]).itemsize


class ShardWriter:
    """Writes shard ``k`` batch by batch, so that no more than a batch is held in memory: each array is appended, in
    the store's dtype, to a temporary file and hashed as it goes. :meth:`commit` flushes the files to disk, renames
    them into place and writes the sidecar that marks the shard complete; leaving the ``with`` block by an error
    removes the temporary files."""

    def __init__(self, root: Path, k: int, arrays: dict[str, dict]):
        import hashlib

        self.root, self.name, self.arrays = Path(root), shard_name(k), arrays
        self.count, self.labels, self.captions = 0, [], []
        self.tmps = {key: self.root / f".tmp-{self.name}.{key}.bin" for key in arrays}
        self.hashes = {key: hashlib.sha256() for key in arrays}
        self.files: dict = {}
        with writing(self.root / self.name, "write the store shard"):
            for key, tmp in self.tmps.items():
                self.files[key] = open(tmp, "wb")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        for fh in self.files.values():
            fh.close()
        if kind is not None:
            for tmp in self.tmps.values():
                tmp.unlink(missing_ok=True)

    def add(self, arrays: dict[str, torch.Tensor], labels=None, captions=None) -> None:
        """Append a batch: each array's rows (item first), and their labels and captions if the data has them."""
        counts = {len(v) for v in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"a batch's arrays have different lengths: {counts}")
        with writing(self.root / self.name, "write the store shard"):
            for key, t in arrays.items():
                data = np.ascontiguousarray(to_numpy(t, self.arrays[key]["dtype"])).tobytes()
                self.files[key].write(data)
                self.hashes[key].update(data)
        self.count += counts.pop()
        if labels is not None:
            self.labels += [int(x) for x in labels]
        if captions is not None:
            self.captions += list(captions)

    def commit(self) -> None:
        for what, got in (("labels", self.labels), ("captions", self.captions)):
            if got and len(got) != self.count:
                raise DataError(f"store shard {self.name}: {len(got)} {what} for {self.count} items")
        with writing(self.root / self.name, "write the store shard"):
            for fh in self.files.values():
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            for key, tmp in self.tmps.items():
                os.replace(tmp, self.root / f"{self.name}.{key}.bin")
        side = {"count": self.count, "sha256": {k: h.hexdigest() for k, h in self.hashes.items()},
                "labels": self.labels or None, "captions": self.captions or None}
        write_text_durably(self.root / f"{self.name}.json", json.dumps(side))


def read_sidecar(path: Path) -> dict:
    """A shard's sidecar, refused by name when it is unreadable or not one (a crash, a damaged disk)."""
    try:
        side = json.loads(Path(path).read_text())
        if not isinstance(side, dict) or not {"count", "sha256"} <= side.keys():
            raise ValueError("it lacks the count or the digests")
    except (OSError, ValueError) as exc:
        raise DataError(f"latent store sidecar {path} is unreadable or corrupt ({exc}); {REPAIR}") from None
    return side


def shard_problem(root: Path, k: int, meta: dict, verify: bool, digests: Optional[dict] = None) -> Optional[str]:
    """Why shard ``k`` of the store that ``meta`` describes (its arrays, shard size and count) is not complete and
    intact, or None: its sidecar readable and agreeing with the count, its labels and captions one per item, its
    arrays of the right size and, with ``verify``, of the sha256 in ``digests`` (the sidecar's if None)."""
    root, name = Path(root), shard_name(k)
    want = min(int(meta["shard_size"]), int(meta["count"]) - k * int(meta["shard_size"]))
    if not (root / f"{name}.json").is_file():
        return "not written"
    try:
        side = read_sidecar(root / f"{name}.json")
    except DataError:
        return "its sidecar is unreadable"
    if side["count"] != want:
        return f"it holds {side['count']} items, {want} expected"
    for what in ("labels", "captions"):
        if side.get(what) is not None and len(side[what]) != want:
            return f"its sidecar has {len(side[what])} {what} for {want} items"
    digests = side["sha256"] if digests is None else digests
    for key, spec in meta["arrays"].items():
        f = root / f"{name}.{key}.bin"
        if not f.is_file():
            return f"{f.name} is missing"
        if f.stat().st_size != want * item_bytes(spec):
            return f"{f.name} has {f.stat().st_size} bytes, {want * item_bytes(spec)} expected"
        if verify and sha256_of(f) != digests.get(key):
            return f"{f.name} differs from its sha256"
    return None


def remove_shard(root: Path, k: int) -> None:
    """Delete shard ``k``'s sidecar first (so that it no longer counts as complete), then its arrays."""
    root = Path(root)
    (root / f"{shard_name(k)}.json").unlink(missing_ok=True)
    for f in root.glob(f"{shard_name(k)}.*.bin"):
        f.unlink()
    fsync_dir(root)


def finish_store(root: Path, meta: dict[str, Any], shards: int) -> dict:
    """Check that every shard is there with the sizes ``meta`` implies, and publish store.json (atomically), with
    each shard's array and sidecar digests."""
    root = Path(root)
    missing = sorted(set(range(shards)) - complete_shards(root))
    if missing:
        raise DataError(f"latent store {root} lacks shard(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                        "run the same difflineage extract command again to finish it")
    listing = []
    for k in range(shards):
        problem = shard_problem(root, k, meta, verify=False)
        if problem:
            raise DataError(f"latent store {root}: shard {shard_name(k)} is not intact ({problem}); {REPAIR}")
        side_file = root / f"{shard_name(k)}.json"
        side = read_sidecar(side_file)
        listing.append({"name": shard_name(k), "count": side["count"], "sha256": side["sha256"],
                        "sidecar": sha256_of(side_file)})
    full = {**meta, "shards": listing}
    write_text_durably(root / META, json.dumps(full, indent=1))
    return full


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class LatentStore:
    """A finished store, memory-mapped: ``len``, ``arrays(indices)``, labels, captions and what made it."""

    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = False, progress: bool = False) -> "LatentStore":
        root = Path(root)
        if not (root / META).is_file():
            hint = ("its extraction has not finished: run the same difflineage extract command again"
                    if complete_shards(root)
                    else "make one with difflineage extract --first-stage ... --data ... --out STORE")
            raise DataError(f"no latent store at '{root}' ({META} missing); {hint}")
        try:
            meta = json.loads((root / META).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{root / META} is unreadable or corrupt ({exc}); {REPAIR}") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{root} is a latent store of format {meta.get('format')}, this difflineage reads format "
                            f"{FORMAT}; extract it again")
        store = cls(root=root, meta=meta)
        store._check_files(verify, progress)
        store._maps: dict = {}
        store._labels = store._captions = None
        store._loaded = False
        return store

    def _check_files(self, verify: bool, progress: bool) -> None:
        from tqdm.auto import tqdm

        for shard in tqdm(self.meta["shards"], desc="verifying the latent store", disable=not (verify and progress),
                          dynamic_ncols=True):
            for key, digest in shard["sha256"].items():
                f = self.root / f"{shard['name']}.{key}.bin"
                if not f.is_file():
                    raise DataError(f"latent store shard {f} is missing; restore the file, or {REPAIR}")
                want = shard["count"] * item_bytes(self.meta["arrays"][key])
                if f.stat().st_size != want:
                    raise DataError(f"latent store shard {f} is truncated or padded: {f.stat().st_size} bytes, "
                                    f"{want} expected; {REPAIR}")
                if verify and sha256_of(f) != digest:
                    raise DataError(f"latent store shard {f} is corrupt: its sha256 differs from the one in "
                                    f"{self.root / META}; {REPAIR}")
            side = self.root / f"{shard['name']}.json"
            if not side.is_file():
                raise DataError(f"latent store sidecar {side} (the shard's labels and captions) is missing; {REPAIR}")
            if verify and shard.get("sidecar") and sha256_of(side) != shard["sidecar"]:  # older stores lack its digest
                raise DataError(f"latent store sidecar {side} (the shard's labels and captions) is corrupt: its sha256 "
                                f"differs from the one in {self.root / META}; {REPAIR}")

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def _map(self, k: int, key: str) -> np.ndarray:
        if (k, key) not in self._maps:
            spec, shard = self.meta["arrays"][key], self.meta["shards"][k]
            self._maps[(k, key)] = np.memmap(self.root / f"{shard['name']}.{key}.bin", mode="r",
                                             dtype=DTYPES[spec["dtype"]][0], shape=(shard["count"], *spec["shape"]))
        return self._maps[(k, key)]

    def arrays(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Each array's rows for ``indices`` (both orientations), as tensors in the store's dtype."""
        idx = np.asarray(indices, dtype=np.int64)
        shard, offset = idx // self.shard_size, idx % self.shard_size
        out = {}
        for key, spec in self.meta["arrays"].items():
            rows = np.empty((len(idx), *spec["shape"]), dtype=DTYPES[spec["dtype"]][0])
            for k in np.unique(shard):
                sel = shard == k
                rows[sel] = self._map(int(k), key)[offset[sel]]
            out[key] = from_numpy(rows, spec["dtype"])
        return out

    def _sidecars(self) -> None:
        """Read every shard's labels and captions once, refusing a sidecar whose lists do not hold one per item (or
        that some shards have and others lack), since they would shift every label after it."""
        lists: dict[str, list] = {"labels": [], "captions": []}
        present: dict[str, bool] = {}
        for i, shard in enumerate(self.meta["shards"]):
            path = self.root / f"{shard['name']}.json"
            side = read_sidecar(path)
            for what, into in lists.items():
                got = side.get(what)
                present.setdefault(what, got is not None)
                if present[what] != (got is not None):
                    raise DataError(f"latent store sidecar {path} {'lacks' if got is None else 'has'} {what} where "
                                    f"the first shard's {'has' if got is None else 'lacks'} them; {REPAIR}")
                if got is not None and len(got) != shard["count"]:
                    raise DataError(f"latent store sidecar {path} holds {len(got)} {what} for the shard's "
                                    f"{shard['count']} items; {REPAIR}")
                into += got or []
        self._labels = np.asarray(lists["labels"], dtype=np.int64) if lists["labels"] else None
        self._captions = lists["captions"] or None
        self._loaded = True

    @property
    def labels(self) -> Optional[np.ndarray]:
        if not self._loaded:
            self._sidecars()
        return self._labels

    @property
    def captions(self) -> Optional[list[str]]:
        if not self._loaded:
            self._sidecars()
        return self._captions


@dataclass
class StoreDataset:
    """A latent store as a training set: ``batch`` gives each image's stored encoding (of the image or, where this
    epoch's flips say so, of its mirror image) instead of the image: ``latent_mean``/``latent_std`` for a Gaussian
    first stage, ``codes`` (a tensor, or a tuple of levels) for a discrete one."""

    store: LatentStore
    flip: bool = False
    seed: int = 0
    in_memory = True  # gathered in the training process: memory-mapped reads, no decoding
    holds_images = False

    def __len__(self) -> int:
        return len(self.store)

    @property
    def meta(self) -> dict:
        return self.store.meta

    @property
    def name(self) -> str:
        return f"latent store {self.store.root}"

    @property
    def class_names(self) -> Optional[tuple[str, ...]]:
        names = self.meta["data"].get("class_names")
        return tuple(names) if names else None

    @property
    def num_classes(self) -> Optional[int]:
        return count_classes(self.class_names, self.store.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        d = self.meta["data"]
        return (d["channels"], d["image_size"], d["image_size"])

    @property
    def captions(self) -> Optional[list[str]]:
        return self.store.captions

    def batch(self, indices, device: torch.device | str = "cpu", epoch: Optional[int] = None) -> LatentBatch | CodesBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        mirror = torch.from_numpy(flips(self.seed, epoch, idx.numpy())) if self.flip and epoch is not None \
            else torch.zeros(len(idx), dtype=torch.bool)
        arrays = self.store.arrays(idx.numpy())
        pick = {k: to_device(torch.where(mirror.view(-1, *([1] * (v.dim() - 2))), v[:, 1], v[:, 0]), device)
                for k, v in arrays.items()}
        labels = self.store.labels
        captions = self.store.captions
        out = {"index": idx, "flip": mirror,
               "label": None if labels is None else to_device(torch.from_numpy(labels[idx.numpy()]), device),
               "caption": None if captions is None else [captions[i] for i in idx.tolist()]}
        if self.meta["kind"] == "gaussian":
            out["latent_mean"], out["latent_std"] = pick["mean"].float(), pick["std"].float()
        else:
            levels = sorted(k for k in pick if k.startswith("codes"))
            codes = tuple(pick[k].long() for k in levels)
            out["codes"] = codes[0] if len(codes) == 1 else codes
        return out

    def subset(self, indices):
        raise DataError("a latent store holds no images to show; read the image source for pictures")


def open_store_dataset(cfg, seed: int = 0, verify: bool = True, progress: bool = False) -> StoreDataset:
    """The store ``cfg.latents`` as a training set, refused by name when it encodes other data or another size."""
    store = LatentStore.open(cfg.latents, verify=verify, progress=progress)
    d, problems = store.meta["data"], []
    if d["image_size"] != cfg.image_size:
        problems.append(f"its images were {d['image_size']} px, this run's data.image_size is {cfg.image_size}")
    if normalise_source(d["source"]) != normalise_source(cfg.source):
        problems.append(f"it encodes {d['source']}, this run's data.source is {cfg.source}")
    if d.get("crop", cfg.crop()) != cfg.crop():  # stores made before it was recorded lack it
        problems.append(f"its images were brought to size by {d['crop']}, this run's by {cfg.crop()} (data.stream, "
                        "data.resize)")
    names = d.get("class_names")
    if cfg.class_names is not None and names and tuple(cfg.class_names) != tuple(names):
        problems.append(f"its class names are {_few(names)}, this run's data.class_names are {_few(cfg.class_names)}")
    template = d.get("caption_template")
    if template and names and template != cfg.caption("{name}") and _captions_from_names(store, template, names):
        problems.append(f"its captions were made as {template!r}, this run's data.caption_template makes "
                        f"{cfg.caption('{name}')!r}")
    if problems:
        raise DataError(f"latent store {store.root} does not fit this run: " + "; ".join(problems)
                        + ". Extract a store for this run's data (difflineage extract), or point data.latents at one")
    return StoreDataset(store, flip=cfg.flip, seed=seed)


def _few(names) -> str:
    names = list(names)
    return ", ".join(map(str, names[:3])) + (" ..." if len(names) > 3 else "")


def _captions_from_names(store: LatentStore, template: str, names) -> bool:
    """Whether the store's captions are its class names in ``template`` (and not captions of each file)."""
    captions, labels = store.captions, store.labels
    if captions is None or labels is None:
        return False
    return all(captions[i] == template.format(name=names[int(labels[i])]) for i in range(min(len(captions), 16)))


def check_store_first_stage(dataset: StoreDataset, kind: str, digest: str, spec: str) -> None:
    """Refuse a store made by another first stage (by its weights' digest) or of another kind."""
    meta, root = dataset.meta, dataset.store.root
    if meta["kind"] != kind:
        raise DataError(f"latent store {root} holds {meta['kind']} encodings; this system needs {kind} ones "
                        "(a Gaussian first stage for latent diffusion, a discrete one for the VQ and DALL-E priors)")
    if meta["first_stage"]["digest"] != digest:
        raise DataError(f"latent store {root} was made with the first stage {meta['first_stage']['spec']} (weights "
                        f"digest {meta['first_stage']['digest'][:12]}), not with this run's {spec} ({digest[:12]}); "
                        "extract a store with this run's first stage, or point data.latents at one")


def normalise_source(source: str) -> str:
    """A data source with its path made absolute, so that two spellings of one folder compare equal."""
    kind, _, path = source.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if path else source


__all__ = ["DTYPES", "FORMAT", "LatentStore", "REPAIR", "ShardWriter", "StoreDataset", "check_store_first_stage",
           "complete_shards", "finish_store", "from_numpy", "item_bytes", "normalise_source", "open_store_dataset",
           "read_sidecar", "remove_partial", "remove_shard", "shard_name", "shard_problem", "to_numpy"]
