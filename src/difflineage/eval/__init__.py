"""Evaluation: sample quality the way the field measures it, and likelihood where a system has one.

``evaluate_system`` draws n samples (in batches, spread over processes under torchrun), scores them
against the data's held-out split with FID, KID, Inception Score and precision/recall on a feature network
(the MNIST classifier for digits, InceptionV3 for natural images), reports each beside its real-vs-real
value at the same count, adds the class accuracy of conditional samples and the system's own held-out
scores (the VAE's ELBO and importance-weighted NLL), and writes metrics.json.

``evaluate_adm`` is FID-50K as the papers compute it: samples drawn into files over the torchrun processes
(eval.sampling), merged into ADM's npz and scored against an ADM reference batch with the evaluator's conventions
(eval.adm).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from difflineage.data import ImageDataset, load_dataset
from difflineage.eval import adm
from difflineage.eval.features import FeatureNetwork, feature_network
from difflineage.eval.inception import load_fid_inception
from difflineage.eval.metrics import frechet_distance, inception_score, kernel_inception_distance, precision_recall
from difflineage.eval.sampling import (
    bf16_autocast,
    fid_sampling_defaults,
    generate,
    merge_shards,
    quantise,
    recorded_options,
    sample_shards,
    to_unit,
)
from difflineage.models.clip import clip_score
from difflineage.systems import load
from difflineage.systems.base import CarriesClip


def score_samples(images: torch.Tensor, labels: Optional[torch.Tensor], reference: ImageDataset, real: ImageDataset,
                  net: FeatureNetwork, seed: int = 0, progress: bool = True,
                  class_accuracy: bool = True) -> dict[str, Any]:
    """Score uint8 samples against ``reference`` (the held-out split), each metric beside the value that
    ``len(images)`` real images of ``real`` (the other split: never the reference's own images) get against the same
    reference. ``class_accuracy``: the data's classes are the ones the feature network's classifier names."""
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    n_real = min(n, len(real))
    real_pick = torch.randperm(len(real), generator=g)[:n_real]
    f_ref, _ = net.extract(to_unit(reference.images), progress=progress, desc="features: held-out")
    f_fake, l_fake = net.extract(to_unit(images), progress=progress, desc="features: samples")
    f_real, l_real = net.extract(to_unit(real.images[real_pick]), progress=progress, desc="features: real baseline")
    out: dict[str, Any] = {"feature_network": net.name, "samples": n, "reference_images": len(reference),
                           "real_baseline_images": n_real}
    out["fid"] = frechet_distance(f_ref, f_fake)
    out["fid_real"] = frechet_distance(f_ref, f_real)
    out["kid"], out["kid_std"] = kernel_inception_distance(f_ref, f_fake, seed=seed)
    out["kid_real"], out["kid_real_std"] = kernel_inception_distance(f_ref, f_real, seed=seed)
    splits = min(10, n)
    out["inception_score"], out["inception_score_std"] = inception_score(l_fake, splits=splits, seed=seed)
    out["inception_score_real"], _ = inception_score(l_real, splits=min(10, n_real), seed=seed)
    out["precision"], out["recall"] = precision_recall(f_ref, f_fake)
    out["precision_real"], out["recall_real"] = precision_recall(f_ref, f_real)
    if labels is not None and net.kind == "mnist" and class_accuracy:
        predicted = l_fake.argmax(1)
        out["class_accuracy"] = (predicted == labels).double().mean().item()
        out["class_accuracy_per_class"] = [(predicted[labels == c] == c).double().mean().item()
                                           for c in range(int(labels.max()) + 1)]
        ref_pred = net.extract(to_unit(reference.images))[1].argmax(1)
        out["class_accuracy_real"] = (ref_pred == reference.labels).double().mean().item()
    return out


REFERENCE_LIMIT = 10000  # held-out images of a streamed source held in memory as the reference


def in_memory(dataset, limit: int):
    """``dataset`` itself when it is in memory; for one streamed from disk, ``limit`` images spread evenly over it
    (sorted by class, so every class shows), decoded into memory."""
    if getattr(dataset, "in_memory", True):
        return dataset
    pick = torch.linspace(0, len(dataset) - 1, min(limit, len(dataset))).long()
    loaded = dataset.subset(pick).load()
    loaded.name = f"{dataset.name} (spread)"
    return loaded


def evaluate_system(system, split: str = "heldout", n: int = 1000, features: str = "auto",
                    inception_weights: Optional[str | Path] = None, seed: int = 0, progress: bool = True,
                    out: Optional[Path] = None, npz: Optional[Path] = None, batch_size: int = 250,
                    sample_options: Optional[dict] = None, bf16: bool = False, clip: Optional[str | Path] = None,
                    checkpoint: Optional[str | Path] = None, inception_resize: str = "tf",
                    **system_options: Any) -> dict[str, Any]:
    """Sample-quality metrics (``n`` > 0) and the system's own held-out scores; rank 0 writes ``out``.
    ``bf16`` draws the samples under bfloat16 autocast (the held-out scores stay in fp32). For a
    caption-conditioned system, the CLIP score of the samples against their captions (beside that of the
    held-out images against theirs), with the CLIP of ``clip`` (a checkpoint holding one: a DALL-E clip or
    prior stage) or the one the system carries.

    ``inception_resize``: how InceptionV3 brings images to 299 px: ``tf`` (the FID graph's TF1 bilinear, behind the
    papers' numbers) or ``pytorch-fid`` (PyTorch's half-pixel bilinear); recorded in ``feature_network``.

    ``sample_options`` go to ``system.sample`` (guidance, steps, temperature, ...); ``system_options`` to
    ``system.evaluate`` (the VAE's ``k``). ``checkpoint``: where the system came from, recorded in the result.
    """
    cfg = system.config
    start = time.perf_counter()
    result: dict[str, Any] = {"system": cfg.system, "checkpoint": str(checkpoint or ""),
                              "data": cfg.data.source, "split": split, "seed": seed}
    rank = dist.get_rank() if dist.is_initialized() else 0
    net = None
    clip_net = find_clip(system, clip) if n > 0 else None  # a wrong path stops the run before any sampling
    if n > 0:
        # Build the feature network (and read the shipped MNIST classifier or the Inception file) before sampling,
        # so a missing weights file stops the run before any time is spent.
        if rank == 0:
            net = feature_network(features, channels=cfg.data.channels or 1, inception_weights=inception_weights,
                                  inception_resize=inception_resize,
                                  progress=progress, device=system.device)
        sampling_start = time.perf_counter()
        images, labels = generate(system, n, batch_size=batch_size, seed=seed, progress=progress, bf16=bf16,
                                  **(sample_options or {}))
        result["sampling_seconds"] = round(time.perf_counter() - sampling_start, 2)
        if bf16:
            result["sampled_in"] = "bf16 autocast"
        if rank != 0:
            return {}
        if npz is not None:
            Path(npz).parent.mkdir(parents=True, exist_ok=True)
            extra = {} if labels is None else {"arr_1": np.asarray(labels, dtype=np.int64)}
            np.savez(npz, arr_0=adm.as_rgb(images.permute(0, 2, 3, 1).numpy()), **extra)  # ADM's layout, as `score` reads
            result["npz"] = str(npz)
        if sample_options:
            result["sample_options"] = recorded_options(sample_options)
        reference = in_memory(load_dataset(cfg.data, split), REFERENCE_LIMIT)
        other = "heldout" if split == "train" else "train"  # the baseline's real images are never the reference's
        real = in_memory(load_dataset(cfg.data, other), n)
        result["real_baseline_split"] = other
        if reference.name.endswith("(spread)"):
            result["reference_note"] = f"a streamed source: {len(reference)} held-out images spread over the split"
        result.update(score_samples(images, labels, reference, real, net, seed=seed, progress=progress,
                                    class_accuracy=cfg.data.holds_digits()))
        result.update(clip_scores(system, images, labels, reference, clip_net))
    elif rank != 0:
        return {}
    dataset = load_dataset(cfg.data, split)
    result.update(system.evaluate(dataset, generator=torch.Generator().manual_seed(seed), progress=progress,
                                  **system_options))
    return finish(result, start, out)


def finish(result: dict[str, Any], start: float, out: Optional[Path]) -> dict[str, Any]:
    """Stamp ``result`` with its duration and the machine, and write it to ``out`` as JSON (when given)."""
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["machine"] = machine_description()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


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
    adm.check_npz(reference)
    adm.read_reference(reference)
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
    result.update(adm.score(npz, reference, net, device=system.device, progress=progress))
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
            yield adm.as_rgb(quantise(dataset.batch(pick[s : s + batch_size])["image"]).permute(0, 2, 3, 1).numpy())

    h, w = dataset.batch(pick[:1])["image"].shape[-2:]
    path = Path(path)
    images = path.with_name(path.name + ".images.npz")
    try:
        adm.write_npz(images, (len(pick), h, w, 3), chunks())
        adm.reference_from_npz(path, images, net, device=device, progress=progress, batch=batch_size)
    finally:
        images.unlink(missing_ok=True)
    return {"reference": str(path), "images": len(pick), "of": len(dataset), "size": [int(h), int(w)],
            "feature_network": f"InceptionV3 ({inception_resize} resize)"}


def find_clip(system, clip: Optional[str | Path] = None):
    """The CLIP for the CLIP score: from ``clip`` (a checkpoint holding one: a DALL-E clip or prior stage), else
    the one the system carries; None when the system is not caption-conditioned or no CLIP is at hand."""
    if not system.caption_conditioned:
        if clip is not None:
            raise ValueError(f"--clip {clip}: the {system.config.system} checkpoint does not draw samples for captions, "
                             "so there is no CLIP score to measure")
        return None
    if clip is None:
        return system.clip_model() if isinstance(system, CarriesClip) else None
    holder = load(clip, device=system.device)
    model = holder.clip_model() if isinstance(holder, CarriesClip) else None
    if model is None:
        raise ValueError(f"{clip} holds no CLIP: give a DALL-E clip-stage checkpoint (model.stage=clip) or a "
                         "prior that carries one")
    return model


def clip_scores(system, images: torch.Tensor, labels: Optional[torch.Tensor], reference: ImageDataset,
                clip=None) -> dict[str, Any]:
    """``clip_score`` of uint8 samples drawn for ``labels`` against the captions they were drawn for, and
    ``clip_score_real`` of the reference images against their own captions, with the CLIP model ``clip``;
    empty without one, or without labels and captions to score against."""
    if clip is None or labels is None or reference.captions is None:
        return {}
    clip.eval()
    return {"clip_score": clip_score(clip, to_unit(images), system.captions_for(labels)),
            "clip_score_real": clip_score(clip, to_unit(reference.images), reference.captions)}


def cpu_description(cpuinfo: str, fallback: str = "CPU") -> str:
    """The CPU of a /proc/cpuinfo text: its model name, x86 family and model, and widest vector unit, since one model
    name covers several generations (an "AMD EPYC" with and without native bf16)."""
    info = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():  # the first processor
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    detail = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    flags = info.get("flags", "").split()
    detail += [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                       ("avx2", "AVX2")) if flag in flags][:1]
    name = info.get("model name", fallback)
    return f"{name} ({', '.join(detail)})" if detail else name


def machine_description() -> str:
    """One line naming the machine a number came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = cpu_description(Path("/proc/cpuinfo").read_text(), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


__all__ = ["bf16_autocast", "cpu_description", "evaluate_adm", "evaluate_system", "feature_network", "generate", "machine_description",
           "parts_folder", "quantise", "score_samples", "write_reference_batch"]
