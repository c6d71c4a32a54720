"""FID-50K as the papers compute it: samples drawn into files over the torchrun processes (eval.sampling), merged
into ADM's npz and scored against an ADM reference batch with the evaluator's conventions (eval.adm); and reference
batches for datasets that have no published one.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from difflineage.eval.adm import as_rgb, check_npz, read_reference, reference_from_npz, score, write_npz
from difflineage.eval.evaluate import finish
from difflineage.eval.inception import load_fid_inception
from difflineage.eval.sampling import fid_sampling_defaults, merge_shards, quantise, recorded_options, sample_shards


def parts_folder(npz: Path) -> Path:
    """Where the batches of ``npz`` are drawn before they are merged into it: ``NPZ.parts/`` beside it."""
    return Path(npz).with_name(Path(npz).name + ".parts")


def evaluate_adm(system, reference: str | Path, inception_weights: str | Path, n: int = 50000,
                 npz: Optional[Path] = None, batch_size: int = 250, seed: int = 0,
                 sample_options: Optional[dict] = None, bf16: bool = False, checkpoint: Optional[str | Path] = None,
                 inception_resize: str = "tf", out: Optional[Path] = None, keep_parts: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """FID-50K as the papers report it: ``n`` samples drawn in batches spread over the torchrun processes, each
    batch written to ``NPZ.parts/`` as it is drawn (an interrupted run drawn again continues), labels drawn uniformly,
    and, for DiT and DyDiT, the paper's sampling settings by default (250 DDPM steps, guidance 1.5); the batches are
    merged into ``npz`` (ADM's layout) and rank 0 scores it against the ADM reference batch ``reference`` with the
    evaluator's conventions (eval.adm): FID, sFID, Inception Score, precision and recall. Returns the result on rank
    0 (empty elsewhere) and writes it to ``out``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    start = time.perf_counter()
    # Read the reference's header and the Inception weights before any sampling, so a wrong path costs nothing.
    check_npz(reference)
    read_reference(reference)
    net = load_fid_inception(inception_weights, resize=inception_resize).to(system.device) if rank == 0 else None
    options = {**fid_sampling_defaults(system), **(sample_options or {})}
    npz = Path(npz) if npz is not None else Path(f"samples_{n}.npz")
    parts = parts_folder(npz)
    drawn = sample_shards(system, parts, n, batch_size=batch_size, seed=seed, options=options, bf16=bf16,
                          checkpoint=checkpoint, progress=progress)
    sampled_s = time.perf_counter() - start
    if rank != 0:
        return {}
    merge_shards(parts, npz, n, batch_size)
    if not keep_parts:
        shutil.rmtree(parts)
    result: dict[str, Any] = {"system": system.config.system, "checkpoint": str(checkpoint or ""), "seed": seed,
                              "labels": "uniform over the classes" if system.num_classes else "none",
                              "sample_options": recorded_options(options), "npz": str(npz),
                              "processes": dist.get_world_size() if dist.is_initialized() else 1,
                              "batches_drawn_by_rank_0": drawn, "sampling_seconds": round(sampled_s, 2)}
    if bf16:
        result["sampled_in"] = "bf16 autocast"
    result.update(score(npz, reference, net, device=system.device, progress=progress))
    return finish(result, start, out)


def write_reference_batch(dataset, path: Path, inception_weights: str | Path, n: int = 10000,
                          inception_resize: str = "tf", device: str | torch.device = "cpu", batch_size: int = 64,
                          progress: bool = True) -> dict[str, Any]:
    """An ADM reference batch of ``dataset`` (a held-out split, say): ``n`` of its images spread evenly over it (all
    of them when it holds fewer), as the data pipeline crops them, with their pool and spatial statistics, for
    ``evaluate --reference`` and ``score``. For a dataset of one's own, where no published reference batch exists;
    ImageNet's FID-50K is scored against ADM's own VIRTUAL_imagenet256_labeled.npz."""
    net = load_fid_inception(inception_weights, resize=inception_resize).to(device)
    pick = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long()

    def chunks():
        for s in tqdm(range(0, len(pick), batch_size), desc="reading the reference images", disable=not progress,
                      dynamic_ncols=True):
            yield as_rgb(quantise(dataset.batch(pick[s : s + batch_size])["image"]).permute(0, 2, 3, 1).numpy())

    h, w = dataset.batch(pick[:1])["image"].shape[-2:]
    path = Path(path)
    images = path.with_name(path.name + ".images.npz")
    try:
        write_npz(images, (len(pick), h, w, 3), chunks())
        reference_from_npz(path, images, net, device=device, progress=progress, batch=batch_size)
    finally:
        images.unlink(missing_ok=True)
    return {"reference": str(path), "images": len(pick), "of": len(dataset), "size": [int(h), int(w)],
            "feature_network": f"InceptionV3 ({inception_resize} resize)"}


__all__ = ["evaluate_adm", "parts_folder", "write_reference_batch"]
