"""``difflineage extract``: a training set encoded once by a frozen first stage, into a latent store (data/store.py).

The same command runs alone or under ``torchrun --nproc_per_node N``: shard k is encoded by process k mod N, each
shard in the same batches whatever N is, so N processes write the store one process would. Every image is encoded
as it is and mirrored; a Gaussian first stage (an ``autoencoder_kl`` run, a Stable Diffusion VAE file) stores its
posterior mean and standard deviation, a discrete one (a VQ-VAE or VQ-VAE-2 autoencoder run, a DALL-E dVAE run)
its code maps. An interrupted extraction, run again, encodes only the shards it lacks.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from difflineage.config import DataConfig
from difflineage.data import load_dataset, ordered_batches, stream_workers
from difflineage.data.store import (
    FORMAT,
    META,
    ShardWriter,
    complete_shards,
    finish_store,
    normalise_source,
    remove_partial,
    remove_shard,
    shard_name,
    shard_problem,
)
from difflineage.errors import CheckpointError, DataError, RunDirError
from difflineage.storage import DirectoryLock, sha256_of, write_text_durably, writing
from difflineage.systems import FirstStage, GaussianStage, ProvidesFirstStage, load
from difflineage.train.distributed import all_gather_objects, barrier, cleanup, init_distributed

PLAN = "extract.json"
PLAN_LATER = ("crop", "caption_template")  # data keys that plans written by earlier versions lack


def first_stage_for(spec: str, device: torch.device, vae_norm_groups: int = 32) -> FirstStage:
    """The frozen first stage named by ``spec``: an ``autoencoder_kl`` run or checkpoint, ``sd-vae:PATH`` (or the
    path of a Stable Diffusion VAE file itself, with ``vae_norm_groups`` GroupNorm groups: 32 in Stable Diffusion),
    a VQ-VAE / VQ-VAE-2 autoencoder-stage run, or a DALL-E dVAE-stage run: any run whose system offers its network
    as a first stage (``ProvidesFirstStage``)."""
    path = Path(spec.split(":", 1)[1] if spec.startswith("sd-vae:") else spec)
    if spec.startswith("sd-vae:") or path.is_file():
        stage = GaussianStage.from_sd_vae(path, norm_groups=vae_norm_groups)
    else:
        system = load(spec).to(device).eval()
        stage = system.as_first_stage(str(spec)) if isinstance(system, ProvidesFirstStage) else None
        if stage is None:
            cfg = system.config
            what = f"{cfg.system} run" + (f" (stage {cfg.model.stage})" if getattr(cfg.model, "stage", None) else "")
            raise CheckpointError(f"{spec} is a {what}, not a first stage: give an autoencoder_kl run, an SD VAE file "
                                  "(sd-vae:PATH), a VQ-VAE / VQ-VAE-2 autoencoder run or a DALL-E dVAE run")
    stage.module.to(device).eval()
    return stage


def extract(first_stage: str, data: DataConfig, out: str | Path, shard_size: int = 16384, batch_size: int = 64,
            dtype: str = "fp16", device: str = "auto", workers: Optional[int] = None, progress: bool = True,
            vae_norm_groups: int = 32) -> dict:
    """Encode the training split of ``data`` into the store ``out``; returns the store's metadata.
    ``vae_norm_groups``: the GroupNorm groups of a Stable Diffusion VAE file given as the first stage."""
    if shard_size < 1 or batch_size < 1:
        raise DataError("--shard-size and --batch-size must be at least 1")
    info = init_distributed(device)
    try:
        return _extract(info, first_stage, data, Path(out), shard_size, batch_size, dtype, workers, progress,
                        vae_norm_groups)
    finally:
        cleanup(info)


@torch.no_grad()
def _extract(info, spec, data, out, shard_size, batch_size, dtype, workers, progress, vae_norm_groups) -> dict:
    stage = first_stage_for(spec, info.device, vae_norm_groups)
    if data.channels is None:
        data = replace(data, channels=stage.channels)
    if data.channels != stage.channels:
        raise DataError(f"the first stage {spec} reads {stage.channels}-channel images, --channels is {data.channels}")
    dataset = load_dataset(data, "train")
    n = len(dataset)
    shards = math.ceil(n / shard_size)
    probe = stage.store_arrays(dataset.batch([0], info.device)["image"])
    code_dtype = "int16" if stage.kind == "codes" and stage.fits_int16 else "int32"
    arrays = {k: {"dtype": dtype if stage.kind == "gaussian" else code_dtype, "shape": [2, *v.shape[1:]]}
              for k, v in probe.items()}
    plan = {"format": FORMAT, "kind": stage.kind,
            "first_stage": {"spec": stage.spec, "digest": stage.digest},
            "data": {"source": normalise_source(data.source), "image_size": data.image_size, "channels": data.channels,
                     "split": "train", "count": n, "class_names": list(dataset.class_names or []) or None,
                     "crop": data.crop(), "caption_template": data.caption("{name}")},
            "arrays": arrays, "shard_size": shard_size, "count": n}

    lock, outcome = None, ("ok", None)
    if info.is_main:
        try:
            lock, outcome = _open_store(out, plan, shards, progress)
        except Exception as exc:  # any failure reaches every process, which would otherwise wait for rank 0
            outcome = ("error", exc)
    outcome = all_gather_objects(outcome, info)[0]
    try:
        if outcome[0] == "error":
            raise outcome[1]
        if outcome[0] == "complete":
            if info.is_main:
                print(f"{out} is already a complete store of these images from this first stage ({n} images)")
            return json.loads((out / META).read_text())
        mine = [k for k in range(shards) if k % info.world_size == info.rank and k not in complete_shards(out)]
        todo = sum(min(shard_size, n - k * shard_size) for k in mine)
        bar = tqdm(total=todo, desc=f"extract rank {info.rank}" if info.enabled else "extract", unit="img",
                   disable=not (progress and info.is_main), dynamic_ncols=True)
        for k in mine:
            idx = list(range(k * shard_size, min(n, (k + 1) * shard_size)))
            with ShardWriter(out, k, arrays) as shard:  # written batch by batch: a shard is never held in memory
                for b in ordered_batches(dataset, idx, batch_size, info.device, stream_workers(workers)):
                    x = b["image"]
                    plain, mirror = stage.store_arrays(x), stage.store_arrays(x.flip(-1))
                    shard.add({key: torch.stack([plain[key], mirror[key]], 1).cpu() for key in arrays},
                              None if b["label"] is None else b["label"].tolist(), b["caption"])
                    bar.update(len(x))
                shard.commit()
        bar.close()
        barrier(info)
        meta = None
        if info.is_main:
            meta = finish_store(out, plan, shards)
            held = ", ".join(f"{k} {tuple(v['shape'][1:])} {v['dtype']}" for k, v in arrays.items())
            print(f"wrote the latent store {out}: {n} images x 2 orientations, {shards} shard(s), {held}")
        return all_gather_objects(meta, info)[0]
    finally:
        if lock is not None:
            lock.release()


def _open_store(out: Path, plan: dict, shards: int, progress: bool):
    """Lock the store folder, clean up after an interrupted run, check that it is this extraction's, and check the
    shards already written: a damaged one (unreadable sidecar, wrong size; in a finished store, a wrong sha256 too)
    is deleted, to be encoded again. Returns the lock and ("complete" | "ok", None)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; choose another --out")
    with writing(out, "create the latent store"):
        out.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(out, what="latent store", hint="wait for that extraction to finish or stop it")
    lock.acquire()
    try:
        if lock.note:
            print(lock.note, file=sys.stderr)
        for f in remove_partial(out):
            print(f"note: removed {f}, left by an interrupted extraction", file=sys.stderr)
        existing = out / PLAN
        if existing.exists():
            try:
                old = json.loads(existing.read_text())
            except (OSError, ValueError) as exc:
                raise RunDirError(f"{existing} is unreadable or corrupt ({exc}), so the shards in {out} cannot be "
                                  "told apart from another extraction's; delete the folder and extract again") from None
            for key in PLAN_LATER:  # a plan written before these keys existed: the settings of its day
                old.get("data", {}).setdefault(key, plan["data"][key])
            if old != plan:
                diff = [k for k in ("kind", "first_stage", "data", "arrays", "shard_size") if old.get(k) != plan.get(k)]
                raise RunDirError(f"{out} holds (part of) a latent store made with other settings ({', '.join(diff)} "
                                  f"differ: it has {', '.join(f'{k}={old.get(k)}' for k in diff)}); choose another --out, "
                                  "or delete that store to replace it")
            if _check_written(out, plan, shards, progress):
                return lock, ("complete", None)
            done = len(complete_shards(out))
            if done:
                print(f"resuming the extraction into {out}: {done} shard(s) already written", file=sys.stderr)
        elif [p for p in out.iterdir() if p.name != ".lock"]:
            raise RunDirError(f"{out} is not empty and holds no extraction of these images; choose an empty --out")
        else:
            write_text_durably(existing, json.dumps(plan, indent=1))
    except BaseException:
        lock.release()
        raise
    return lock, ("ok", None)


def _check_written(out: Path, plan: dict, shards: int, progress: bool) -> bool:
    """Check the shards written so far and delete the damaged ones, to be encoded again. A finished store is checked
    to the sha256 of every file against its store.json, which it loses if any shard is damaged; an unfinished one
    by its sidecars and sizes. Returns whether the store is finished and intact."""
    listing = None
    if (out / META).exists():
        try:
            listing = {s["name"]: s for s in json.loads((out / META).read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"note: {out / META} is unreadable ({exc}); checking the shards and finishing the store again",
                  file=sys.stderr)
    finished = listing is not None
    damaged = 0
    for k in tqdm(sorted(complete_shards(out)), desc="checking the latent store", unit="shard",
                  disable=not (progress and finished), dynamic_ncols=True):
        entry = (listing or {}).get(shard_name(k))
        if k >= shards:
            problem = "it lies past the store's last shard"
        elif finished and entry is None:
            problem = f"{META} does not list it"
        else:
            problem = shard_problem(out, k, plan, verify=finished, digests=entry["sha256"] if entry else None)
            if problem is None and entry and entry.get("sidecar") \
                    and sha256_of(out / f"{shard_name(k)}.json") != entry["sidecar"]:
                problem = "its sidecar differs from its sha256"
        if problem is not None:
            print(f"note: {shard_name(k)} is damaged ({problem}); deleting it to encode it again", file=sys.stderr)
            remove_shard(out, k)
            damaged += 1
    intact = finished and not damaged and len(complete_shards(out)) == shards
    if (out / META).exists() and not intact:
        (out / META).unlink()
        print(f"repairing the latent store {out}: {shards - len(complete_shards(out))} shard(s) to encode again",
              file=sys.stderr)
    return intact


__all__ = ["extract", "first_stage_for"]
