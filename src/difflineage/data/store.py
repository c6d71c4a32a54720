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
Shards are written under a temporary name and renamed when complete, so an interrupted extraction resumes at the
first shard it lacks. Readers verify each shard's size when opening and its sha256 with ``verify``.
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
from difflineage.data.dataset import count_classes, to_device
from difflineage.errors import DataError
from difflineage.storage import fsync_dir, sha256_of, writing

FORMAT = 1
META = "store.json"
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


def write_shard(root: Path, k: int, arrays: dict[str, np.ndarray], labels: Optional[np.ndarray],
                captions: Optional[list[str]]) -> None:
    """Write shard ``k``: each array under a temporary name, renamed when complete, then the sidecar that marks
    the shard complete. On any failure the temporary files are removed."""
    root = Path(root)
    name = shard_name(k)
    count = len(next(iter(arrays.values())))
    digests, tmps = {}, []
    try:
        with writing(root / name, "write the store shard"):
            for key, arr in arrays.items():
                tmp = root / f".tmp-{name}.{key}.bin"
                tmps.append(tmp)
                with open(tmp, "wb") as fh:
                    fh.write(np.ascontiguousarray(arr).tobytes())
                    fh.flush()
                    os.fsync(fh.fileno())
                digests[key] = sha256_of(tmp)
            for key in arrays:
                os.replace(root / f".tmp-{name}.{key}.bin", root / f"{name}.{key}.bin")
            side = {"count": count, "sha256": digests,
                    "labels": None if labels is None else [int(x) for x in labels], "captions": captions}
            tmp = root / f".tmp-{name}.json"
            tmps.append(tmp)
            tmp.write_text(json.dumps(side))
            os.replace(tmp, root / f"{name}.json")
            fsync_dir(root)
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise


def finish_store(root: Path, meta: dict[str, Any], shards: int) -> dict:
    """Check that every shard is there with the sizes ``meta`` implies, and publish store.json (atomically)."""
    root = Path(root)
    missing = sorted(set(range(shards)) - complete_shards(root))
    if missing:
        raise DataError(f"latent store {root} lacks shard(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                        "run the same difflineage extract command again to finish it")
    listing = []
    for k in range(shards):
        side = json.loads((root / f"{shard_name(k)}.json").read_text())
        listing.append({"name": shard_name(k), "count": side["count"], "sha256": side["sha256"]})
    if sum(s["count"] for s in listing) != meta["count"]:
        raise DataError(f"latent store {root}: its shards hold {sum(s['count'] for s in listing)} items, not "
                        f"{meta['count']}; extract it again into a new folder")
    full = {**meta, "shards": listing}
    with writing(root / META, "write"):
        tmp = root / f".tmp-{META}"
        tmp.write_text(json.dumps(full, indent=1))
        os.replace(tmp, root / META)
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
            raise DataError(f"{root / META} is unreadable or corrupt ({exc}); extract the store again") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{root} is a latent store of format {meta.get('format')}, this difflineage reads format "
                            f"{FORMAT}; extract it again")
        store = cls(root=root, meta=meta)
        store._check_files(verify, progress)
        store._maps: dict = {}
        store._labels = None
        store._captions = None
        return store

    def _item_bytes(self, key: str) -> int:
        spec = self.meta["arrays"][key]
        return int(np.prod(spec["shape"])) * np.dtype(DTYPES[spec["dtype"]][0]).itemsize

    def _check_files(self, verify: bool, progress: bool) -> None:
        from tqdm.auto import tqdm

        for shard in tqdm(self.meta["shards"], desc="verifying the latent store", disable=not (verify and progress),
                          dynamic_ncols=True):
            for key, digest in shard["sha256"].items():
                f = self.root / f"{shard['name']}.{key}.bin"
                if not f.is_file():
                    raise DataError(f"latent store shard {f} is missing; extract the store again (or restore the file)")
                want = shard["count"] * self._item_bytes(key)
                if f.stat().st_size != want:
                    raise DataError(f"latent store shard {f} is truncated or padded: {f.stat().st_size} bytes, "
                                    f"{want} expected; extract the store again")
                if verify and sha256_of(f) != digest:
                    raise DataError(f"latent store shard {f} is corrupt: its sha256 differs from the one in "
                                    f"{self.root / META}; extract the store again")

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
        labels, captions = [], []
        for shard in self.meta["shards"]:
            side = json.loads((self.root / f"{shard['name']}.json").read_text())
            labels += side["labels"] or []
            captions += side["captions"] or []
        self._labels = np.asarray(labels, dtype=np.int64) if labels else None
        self._captions = captions or None

    @property
    def labels(self) -> Optional[np.ndarray]:
        if self._labels is None and self._captions is None:
            self._sidecars()
        return self._labels

    @property
    def captions(self) -> Optional[list[str]]:
        if self._labels is None and self._captions is None:
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

    def batch(self, indices, device: torch.device | str = "cpu", epoch: Optional[int] = None) -> dict:
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
    if problems:
        raise DataError(f"latent store {store.root} does not fit this run: " + "; ".join(problems)
                        + ". Extract a store for this run's data (difflineage extract), or point data.latents at one")
    return StoreDataset(store, flip=cfg.flip, seed=seed)


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


__all__ = ["DTYPES", "FORMAT", "LatentStore", "StoreDataset", "check_store_first_stage", "complete_shards",
           "finish_store", "from_numpy", "normalise_source", "open_store_dataset", "remove_partial", "shard_name",
           "to_numpy", "write_shard"]
