"""Sample quality the way the field measures it, and likelihood where a system has one: ``difflineage evaluate``.

``evaluate_system`` draws n samples (in batches, spread over processes under torchrun), scores them against the data's
held-out split with FID, KID, Inception Score and precision/recall on a feature network (the MNIST classifier for
digits, InceptionV3 for natural images), reports each beside its real-vs-real value at the same count, adds the class
accuracy of conditional samples, the CLIP score of caption-conditioned ones (on OpenMoji, with the shipped scoring CLIP,
and their caption retrieval) and the system's own held-out scores (the VAE's ELBO and importance-weighted NLL), and
writes metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from difflineage.data import ImageDataset, load_dataset
from difflineage.eval.adm import as_rgb
from difflineage.eval.clip_score import clip_scores, find_clip, instrument_caption_scores
from difflineage.eval.openmoji_instrument import scoring_clip
from difflineage.eval.features import FeatureNetwork, data_instrument, feature_network
from difflineage.eval.metrics import (
    check_enough,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from difflineage.eval.sampling import generate, recorded_options, to_unit
from difflineage.machine import machine_description


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
    f_ref, l_ref = net.extract(to_unit(reference.images), progress=progress, desc="features: held-out")
    f_fake, l_fake = net.extract(to_unit(images), progress=progress, desc="features: samples")
    f_real, l_real = net.extract(to_unit(real.images[real_pick]), progress=progress, desc="features: real baseline")
    out: dict[str, Any] = {"feature_network": net.name, "samples": n, "reference_images": len(reference),
                           "real_baseline_images": n_real}
    out["fid"] = frechet_distance(f_ref, f_fake)
    out["fid_real"] = frechet_distance(f_ref, f_real)
    out["kid"], out["kid_std"] = kernel_inception_distance(f_ref, f_fake, seed=seed)
    out["kid_real"], out["kid_real_std"] = kernel_inception_distance(f_ref, f_real, seed=seed)
    # this evaluation's conventions: IS over ten splits of a seeded shuffle, precision/recall distances in float64
    out["inception_score"], out["inception_score_std"] = inception_score(l_fake, splits=min(10, n), seed=seed)
    out["inception_score_real"], _ = inception_score(l_real, splits=min(10, n_real), seed=seed)
    out["precision"], out["recall"] = precision_recall(f_ref, f_fake, dtype=torch.float64)
    out["precision_real"], out["recall_real"] = precision_recall(f_ref, f_real, dtype=torch.float64)
    if labels is not None and net.kind in ("mnist", "openmoji") and class_accuracy:
        predicted = l_fake.argmax(1)
        out["class_accuracy"] = (predicted == labels).double().mean().item()
        out["class_accuracy_per_class"] = [(predicted[labels == c] == c).double().mean().item()
                                           for c in range(int(labels.max()) + 1)]
        ref_pred = l_ref.argmax(1)
        out["class_accuracy_real"] = (ref_pred == reference.labels).double().mean().item()
    return out


REFERENCE_LIMIT = 10000  # held-out images of a streamed source held in memory as the reference


def in_memory(dataset, limit: int):
    """``dataset`` itself when it is in memory; for one streamed from disk, ``limit`` images spread evenly over it
    (sorted by class, so every class shows), decoded into memory."""
    if dataset.in_memory:
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
    if n > 0:
        check_enough(n, f"--n {n}: the sample set")  # before any time is spent sampling
    start = time.perf_counter()
    result: dict[str, Any] = {"system": cfg.system, "checkpoint": str(checkpoint or ""),
                              "data": cfg.data.source, "split": split, "seed": seed}
    rank = dist.get_rank() if dist.is_initialized() else 0
    net = None
    # a wrong path, or the missing shipped instrument, stops the run before any sampling
    own = data_instrument(cfg.data.source, digits=cfg.data.holds_digits())
    instrument = n > 0 and clip is None and system.caption_conditioned and own == "openmoji"
    clip_net = (scoring_clip().to(system.device) if instrument else find_clip(system, clip)) if n > 0 else None
    if n > 0:
        # Build the feature network (and read the shipped MNIST classifier or the Inception file) before sampling,
        # so a missing weights file stops the run before any time is spent.
        if rank == 0:
            net = feature_network(features, channels=cfg.data.channels or 1, inception_weights=inception_weights,
                                  inception_resize=inception_resize, source=cfg.data.source,
                                  progress=progress, device=system.device)
        sampling_start = time.perf_counter()
        captions = None
        if system.captions_from_file:  # drawn for the captions of held-out images, the only kind it has learned
            held = load_dataset(cfg.data, split)
            captions = (list(held.captions), torch.as_tensor(held.labels) if held.labels is not None else None)
        images, labels = generate(system, n, batch_size=batch_size, seed=seed, progress=progress, bf16=bf16,
                                  captions=captions, **(sample_options or {}))
        result["sampling_seconds"] = round(time.perf_counter() - sampling_start, 2)
        if bf16:
            result["sampled_in"] = "bf16 autocast"
        if rank != 0:
            return {}
        if npz is not None:
            Path(npz).parent.mkdir(parents=True, exist_ok=True)
            extra = {} if labels is None else {"arr_1": np.asarray(labels, dtype=np.int64)}
            np.savez(npz, arr_0=as_rgb(images.permute(0, 2, 3, 1).numpy()), **extra)  # ADM's layout, as `score` reads
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
                                    class_accuracy=own == net.kind))
        if instrument:
            result.update(instrument_caption_scores(clip_net, images, load_dataset(cfg.data, "train"), reference))
        else:
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


__all__ = ["REFERENCE_LIMIT", "evaluate_system", "finish", "in_memory", "score_samples"]
