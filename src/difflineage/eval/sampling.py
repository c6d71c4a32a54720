"""Drawing samples to score: in memory (``generate``, digit scale) or, for FID-50K, into files on disk.

FID-50K sampling as the DiT papers do it is spread over torchrun processes and resumable.

``sample_shards`` draws ``n`` samples in batches of ``batch_size``; batch b always uses the generator seeded with
(seed, b), for its labels (drawn uniformly over the classes, as the official sample_ddp.py draws them) and its noise,
so the samples do not depend on how many processes draw them. Under torchrun the batches are dealt round-robin; each
process writes each batch it draws as its own file in the parts folder (uint8 N x H x W x 3 and the labels, under a
temporary name, then renamed), so at most one batch per process is in memory, and a run that is interrupted and
started again draws only the batches that are missing. ``plan.json`` records what the parts were drawn with (the
checkpoint's digest, that of the weights drawing, so the EMA's and the raw ones differ, the count, the batch size,
the seed and the sampling options); a restart that asks for something else is refused by name rather than mixing two sets of samples.

``merge_shards`` streams the parts, in order, into one npz in ADM's layout (``arr_0``: the images, ``arr_1``: the
labels, as guided-diffusion's sampling script writes them) without holding them all; ``difflineage score`` (eval.adm)
then scores it against a reference batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from difflineage.diffusion import Sampler
from difflineage.errors import DataError
from difflineage.eval.adm import as_rgb, batches_of, check_npz, write_npz
from difflineage.models.step_cache import StepCache
from difflineage.nn.precision import native_bf16
from difflineage.systems.base import CachesSteps, CompilesBlocks, Respaces
from difflineage.systems.dit import DIT_FID_SAMPLING  # noqa: F401 - the papers' FID-50K sampling, named here too
from difflineage.weights import state_digest

PLAN = "plan.json"


def fid_sampling_defaults(system) -> dict[str, Any]:
    """The papers' FID-50K sampling settings a system declares (``System.fid_sampling``: DiT's and DyDiT's are
    ``DIT_FID_SAMPLING``; empty for the others, whose settings are the recipe's)."""
    return dict(system.fid_sampling)


def generate(system, n: int, batch_size: int = 250, seed: int = 0, progress: bool = True, bf16: bool = False,
             captions: Optional[tuple[list[str], Optional[torch.Tensor]]] = None,
             **options: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw ``n`` samples as uint8 (n, C, H, W), with the labels asked for (conditional systems: the
    classes in turn). Batch b always uses seed (seed, b), so the samples are the same whatever the number
    of processes; under torchrun the batches are dealt round-robin and gathered on every process.
    ``bf16`` samples under bfloat16 autocast (faster on CPUs with AVX-512 bf16 and on recent GPUs).
    ``captions``: (captions, their labels or None) to draw for in turn instead of classes (a run trained on a
    captions file is sampled from captions of its held-out images)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    k = system.num_classes
    mine = []
    batches = range(rank, math.ceil(n / batch_size), world)
    for b in tqdm(batches, desc=f"sampling {n}", disable=not (progress and rank == 0), leave=False):
        m = min(batch_size, n - b * batch_size)
        labels = torch.arange(b * batch_size, b * batch_size + m) % k if k else None
        condition = labels
        if captions is not None:
            texts, of = captions
            turn = torch.arange(b * batch_size, b * batch_size + m) % len(texts)
            condition, labels = [texts[i] for i in turn.tolist()], (of[turn] if of is not None and k else None)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        mine.append((b, draw_batch(system, m, condition, g, bf16, options), labels))
    if world > 1:
        everything: list = [None] * world
        dist.all_gather_object(everything, mine)
        mine = [item for part in everything for item in part]
    mine.sort(key=lambda item: item[0])
    images = torch.cat([item[1] for item in mine])
    labels = torch.cat([item[2] for item in mine]) if k else None
    return images, labels


def bf16_autocast(device: torch.device | str, enabled: bool = True):
    """bfloat16 autocast on ``device``'s type (a no-op context when not enabled)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (N, C, H, W): what an image file (and ADM's npz) holds, and what is scored."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


# The fast path's defaults: DPM-Solver++ at 20 steps (the range where the paper matches DDIM-50+ with guidance) and
# a fifth of the block evaluations reused by the step cache. Issue 19's benchmark measures them against DDIM-50.
FAST_STEPS = 20
FAST_REUSE = 0.2


def fast_sampling(system, options: dict[str, Any], n_calibrate: Optional[int] = None, seed: int = 0,
                  compile: bool = True) -> tuple[dict[str, Any], bool, str]:
    """The fastest sampling this machine has for ``system``: (options, bf16, a line saying what was chosen).
    Diffusion systems: DPM-Solver++ at ``FAST_STEPS`` steps unless told otherwise; DiT and DyDiT: a step cache
    calibrated on ``n_calibrate`` samples (the system's default) reusing ``FAST_REUSE`` of the block evaluations, or
    less where its held-back error would pass the tolerance (``fit``); DiT with ``compile``: its
    blocks compiled in place (``DiTSystem.compile_blocks``; the first call pays the compilation); bf16 autocast where
    it is native (``native_bf16``). Other systems keep their options (and get bf16 where native)."""
    fast = dict(options)
    said = []
    if isinstance(system, Respaces):  # a diffusion system
        fast.setdefault("sampler", "dpmpp_2m")
        fast.setdefault("steps", FAST_STEPS)
        said.append(f"{fast['sampler']} {fast['steps']} steps")
    if isinstance(system, CachesSteps) and "step_cache" not in fast:
        calibration = {k: v for k, v in fast.items() if k in ("guidance", "mode", "eta")}
        fast["step_cache"] = system.calibrate_step_cache(FAST_REUSE, steps=fast["steps"], sampler=fast["sampler"],
                                                         n=n_calibrate, seed=seed, fit=True, **calibration)
        if dist.is_initialized():  # every process samples with rank 0's decisions (a GPU's calibration may differ in ulps)
            box = [fast["step_cache"]]
            dist.broadcast_object_list(box, src=0)
            fast["step_cache"] = box[0]
        cache = fast["step_cache"]
        said.append(f"step cache reusing {cache.reuse_fraction:.0%} of block evaluations"
                    + (f" (it changes held-back samples by {cache.error:.4f} on average, pixels in [-1, 1]"
                       + (f"; {cache.asked:.0%} would have changed them by more than the tolerance"
                          if cache.asked is not None and cache.reuse_fraction < cache.asked - 1e-9 else "") + ")"
                       if cache.error is not None else ""))
    if compile and isinstance(system, CompilesBlocks) and system.compile_blocks():
        said.append("compiled blocks")
    bf16 = native_bf16(system.device)
    said.append("bf16 autocast" if bf16 else "fp32 (no native bf16 here)")
    return fast, bf16, ", ".join(said)


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """Sampling options as a result file records them (JSON): a step cache by its description, a sampler by its
    name, everything else as it is."""
    return {k: v.describe() if isinstance(v, StepCache) else v.value if isinstance(v, Sampler) else v
            for k, v in options.items()}


def checkpoint_digest(path: Optional[str | Path]) -> str:
    """A short digest of a checkpoint directory's recorded checksums (of its path when it has none)."""
    listing = Path(path) / "checksums.sha256" if path else None
    data = listing.read_bytes() if listing is not None and listing.is_file() else str(path).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def draw_batch(system, m: int, labels: Optional[torch.Tensor | list[str]], generator: torch.Generator, bf16: bool,
               options: dict[str, Any]) -> torch.Tensor:
    """``m`` samples for ``labels`` as uint8 (m, C, H, W), under bf16 autocast when asked."""
    try:
        with bf16_autocast(system.device, bf16):
            images = system.sample(m, condition=labels, generator=generator, **options).float()
    except TypeError as exc:
        raise ValueError(f"the {system.config.system} system does not take these sampling options: {exc}") from None
    return quantise(images)


def part_name(b: int) -> str:
    return f"batch-{b:06d}.npz"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(plan: dict, folder: Path, rank: int) -> None:
    """Rank 0 writes ``plan.json`` (or checks the one there); every rank learns the outcome, so all stop together."""
    problem = None
    if rank == 0:
        path = folder / PLAN
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            if changed:
                differences = ", ".join(f"{k}: {old.get(k)!r} there, {plan.get(k)!r} now" for k in changed)
                problem = (f"{folder} holds samples drawn with other settings ({differences}); give another --npz "
                           f"(its parts folder is NPZ.parts) or delete {folder} to draw them again")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(plan, indent=2) + "\n")
        for stale in folder.glob("*.tmp.npz"):  # a batch being written when the run was stopped
            stale.unlink()
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise DataError(problem)


def sample_shards(system, folder: Path, n: int, batch_size: int = 250, seed: int = 0,
                  options: Optional[dict[str, Any]] = None, bf16: bool = False, checkpoint: Optional[str | Path] = None,
                  progress: bool = True) -> int:
    """Draw the missing batches of ``n`` samples into ``folder`` (this process's share under torchrun); returns how
    many batches this process drew. Every process returns after all the batches exist."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"--num-samples ({n}) and --batch-size ({batch_size}) must be positive")
    folder = Path(folder)
    rank, world = _rank_world()
    options = dict(options or {})
    k = system.num_classes
    plan = {"checkpoint": checkpoint_digest(checkpoint), "weights": state_digest(system.state_dict())[:16],
            "n": n, "batch_size": batch_size, "seed": seed,
            "labels": "uniform" if k else "none", "options": recorded_options(options), "bf16": bool(bf16)}
    _agree(plan, folder, rank)
    total = math.ceil(n / batch_size)
    mine = [b for b in range(rank, total, world) if not (folder / part_name(b)).is_file()]
    done_before = len(range(rank, total, world)) - len(mine)
    bar = tqdm(total=len(range(rank, total, world)), initial=done_before, desc=f"sampling {n} (process {rank})",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    for b in mine:
        m = min(batch_size, n - b * batch_size)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        labels = torch.randint(0, k, (m,), generator=g) if k else None
        pixels = as_rgb(draw_batch(system, m, labels, g, bf16, options).permute(0, 2, 3, 1).numpy())  # (m, H, W, 3)
        tmp = folder / f"batch-{b:06d}.tmp.npz"
        np.savez(tmp, arr_0=pixels, arr_1=(labels if k else torch.full((m,), -1)).numpy().astype(np.int64))
        os.replace(tmp, folder / part_name(b))
        bar.update(1)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    return len(mine)


REDRAW = "delete it and run the same command again to draw that batch again"


def _read_part(part: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """A part's image shape (from its header) and labels (``arr_1``); a damaged part refused by name, with what to
    do."""
    try:
        shape = check_npz(part)
        with np.load(part) as obj:
            return shape, np.asarray(obj["arr_1"])
    except DataError as exc:
        raise DataError(f"{exc}: {REDRAW}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError) as exc:
        raise DataError(f"{part} is damaged ({type(exc).__name__}: {exc}): {REDRAW}") from None


def merge_shards(folder: Path, npz: Path, n: int, batch_size: int) -> Path:
    """Stream the parts in ``folder`` into ``npz`` (ADM's layout, labels in ``arr_1``); refuses a missing or
    mis-sized part by name."""
    folder = Path(folder)
    total = math.ceil(n / batch_size)
    parts = [folder / part_name(b) for b in range(total)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise DataError(f"{folder} lacks {len(missing)} of its {total} batches ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}): run the same command again to draw them")
    shapes, labels = zip(*[_read_part(p) for p in parts])
    sizes = [s[0] for s in shapes]
    if sum(sizes) != n or len({s[1:] for s in shapes}) != 1:
        raise DataError(f"the batches in {folder} hold {sum(sizes)} images of sizes {sorted({s[1:] for s in shapes})}, "
                        f"not {n} of one size; delete {folder} and draw them again")
    labels = np.concatenate(labels)

    def chunks():
        for p in parts:
            try:
                yield from batches_of(p, batch_size)
            except DataError as exc:  # a damaged part: drawn again by the same command once it is gone
                raise DataError(f"{exc}: {REDRAW}") from None

    write_npz(npz, (n, *shapes[0][1:]), chunks(), extra={"arr_1": labels} if (labels >= 0).all() else None)
    return Path(npz)


__all__ = ["DIT_FID_SAMPLING", "FAST_REUSE", "FAST_STEPS", "bf16_autocast", "fast_sampling", "native_bf16", "checkpoint_digest", "recorded_options", "draw_batch", "fid_sampling_defaults", "generate",
           "merge_shards", "quantise", "sample_shards", "to_unit"]
