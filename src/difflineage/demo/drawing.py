"""Drawing a request: every model of a run sampled with the same seed and settings and timed (``draw``), its
arithmetic counted afterwards (``count``), the lines under each gallery (``summary``), a DyDiT sample's pictures
(``inspect_sample``) and a 2-D VAE's latent plane (``decode_latent``)."""

import math
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from difflineage.demo.runs import EVERY_CLASS, DemoError, DemoRun, Model, Request
from difflineage.eval.adm import as_rgb
from difflineage.eval.dydit_pictures import TokenTrace, sample_token_picture, sample_width_picture, trace_tokens
from difflineage.eval.flops import count_flops, flops_per_call
from difflineage.eval.sampling import bf16_autocast
from difflineage.images import save_grid, save_png, to_uint8
from difflineage.systems.base import Denoises

MAX_IMAGES = 64
GALLERY_SIDE = 128  # gallery images are enlarged (nearest neighbour) to at least this many pixels a side


@dataclass
class Drawn:
    """One model's answer to a request: its images, how long they took, and (after ``count``) their arithmetic."""

    title: str
    source: str
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    seconds: float
    said: str
    bf16: bool
    options: dict[str, Any]
    image_files: list[Path]
    grid_file: Path
    npz_file: Path
    trace: Optional[TokenTrace] = None
    macs: Optional[float] = None  # multiply-accumulates per image, the whole sampling call (every step, decoder)
    denoiser_macs: Optional[float] = None  # per image and denoiser call, on average
    denoiser_calls: Optional[int] = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.images)


@dataclass
class Result:
    run: str
    seed: int
    randomized: bool
    condition: Any
    captions: list[str]
    drawn: list[Drawn]
    out_dir: Path
    counted: bool = False
    note: str = ""  # said beside the images (words of the caption that no training caption holds)

    @property
    def files(self) -> list[Path]:
        return [f for d in self.drawn for f in (d.grid_file, d.npz_file)]


def pick_seed(request: Request) -> int:
    if request.randomize:
        return random.SystemRandom().randrange(2 ** 31)
    try:
        seed = int(request.seed)
    except (TypeError, ValueError):
        raise DemoError(f"seed {request.seed!r} must be a whole number") from None
    if not 0 <= seed < 2 ** 63:
        raise DemoError(f"seed {seed} must lie in 0..2^63-1")
    return seed


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower().split(" (")[0]).strip("-")


def draw(run: DemoRun, request: Request, out_dir: Path,
         progress: Optional[Callable[[float, str], None]] = None) -> Result:
    """Sample ``request`` from every model of ``run`` (a DyDiT, then its base DiT, each with the same seed and
    settings), timing each and writing its images into ``out_dir``. ``progress(fraction of the request, what)``
    hears of each model as it starts and, for a diffusion system, of each step of its sampler (a hook on the
    denoiser counts the calls).
    Arithmetic is counted afterwards, by ``count``, so that the time is the sampling's alone."""
    n = int(request.n)
    if not 1 <= n <= MAX_IMAGES:
        raise DemoError(f"number of images {request.n} must lie in 1..{MAX_IMAGES}")
    seed = pick_seed(request)
    condition, captions = run.condition_of(request.condition, n)
    labels = None
    if run.condition_kind == "class":
        labels = condition.numpy() if isinstance(condition, torch.Tensor) else np.full(n, condition)
    options = run.options_of(request)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i, model in enumerate(run.models):
        if progress:
            preparing = " (preparing the fast path)" if request.fast else ""
            progress(i / len(run.models), f"sampling {model.title}{preparing}")
        opts, bf16, said = model.options_for(options, request.fast and run.diffusion, seed)
        if model.compiles_at(n):
            said += f" (this first call at {n} images includes compiling them)"
        with ExitStack() as stack:
            if progress and isinstance(model.system, Denoises):
                stack.enter_context(step_progress(model.system.net, opts.get("steps"), progress, i, len(run.models),
                                                  f"sampling {model.title}"))
            trace = stack.enter_context(trace_tokens(model.system.net)) if model.dynamic else None
            stack.enter_context(bf16_autocast(model.system.device, bf16))
            start = time.perf_counter()
            images = model.system.sample(n, condition=condition, generator=torch.Generator().manual_seed(seed),
                                         **opts).float()
            seconds = time.perf_counter() - start
        drawn.append(write_images(model, images, seconds, said, bf16, opts, trace, seed, labels, out_dir))
    if progress:
        progress(1.0, "done")
    note = run.caption_note(request.condition) if run.condition_kind == "caption" else ""
    return Result(run=str(run.path), seed=seed, randomized=bool(request.randomize), condition=condition,
                  captions=captions, drawn=drawn, out_dir=out_dir, note=note)


@contextmanager
def step_progress(net: torch.nn.Module, steps: Optional[int], progress: Callable[[float, str], None], i: int,
                  models: int, what: str):
    """Tell ``progress`` of every call of ``net`` (one per sampler step) while the context is open: model ``i`` of
    ``models`` is that far through its ``steps``."""
    calls = [0]

    def after(mod, args, out):
        calls[0] += 1
        if steps:
            progress((i + min(calls[0], steps) / steps) / models, f"{what}: step {calls[0]} of {steps}")

    handle = net.register_forward_hook(after)
    try:
        yield
    finally:
        handle.remove()


def write_images(model: Model, images: torch.Tensor, seconds: float, said: str, bf16: bool, options: dict,
                 trace: Optional[TokenTrace], seed: int, labels: Optional[np.ndarray], out_dir: Path) -> Drawn:
    """The gallery's PNGs (enlarged), a grid PNG and an npz (``arr_0`` uint8 N x H x W x 3, and ``arr_1`` the class
    labels of a class-conditional request, as ADM's sampling script writes them) of one model's images."""
    slug = _slug(model.title)
    side = images.shape[-1]
    scale = max(1, math.ceil(GALLERY_SIDE / side))
    arrays = to_uint8(images)
    files = [save_png(a, out_dir / f"{slug}_{i:02d}.png", scale=scale) for i, a in enumerate(arrays)]
    every_class = labels is not None and len(set(labels.tolist())) > 1
    grid = save_grid(images, out_dir / f"{slug}_seed{seed}.png", nrow=min(len(images), 10 if every_class else 8),
                     scale=2)
    npz = out_dir / f"{slug}_seed{seed}.npz"
    np.savez(npz, arr_0=as_rgb(arrays), **({"arr_1": labels.astype(np.int64)} if labels is not None else {}))
    return Drawn(title=model.title, source=model.source, images=images.cpu(), seconds=seconds, said=said, bf16=bf16,
                 options=options, image_files=files, grid_file=grid, npz_file=npz, trace=trace)


def count(run: DemoRun, result: Result) -> Result:
    """Count the arithmetic each model spent per image on ``result`` (torch's FlopCounterMode, in a second run with
    the same seed and settings): the whole sampling call, and for a diffusion system its denoiser per call. A
    network whose arithmetic does not depend on the sample is counted on one image of the request; a DyDiT, whose
    token routers decide per image, on all of them."""
    for model, d in zip(run.models, result.drawn):
        n = len(d.images) if model.dynamic else 1
        condition = result.condition
        if isinstance(condition, torch.Tensor):
            condition = condition[:n]
        elif isinstance(condition, list):
            condition = condition[:n]
        net = model.system.net if isinstance(model.system, Denoises) else None
        # compiled blocks run eagerly here: the counter sees the same operations, and a new batch size recompiles
        with (flops_per_call(net) if net is not None else nullcontext([])) as calls, \
                bf16_autocast(model.system.device, d.bf16), torch.compiler.set_stance("force_eager"):
            total = count_flops(lambda: model.system.sample(n, condition=condition,
                                                            generator=torch.Generator().manual_seed(result.seed),
                                                            **d.options))
        d.macs = total.macs / n
        if calls:
            d.denoiser_calls = len(calls)
            d.denoiser_macs = sum(c["macs"] for c in calls) / n / len(calls)
    result.counted = True
    return result


def flops_text(flops: float) -> str:
    """FLOPs in the unit that reads best: 1.23 GFLOPs, 45.6 MFLOPs."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}" if flops / scale < 100 else f"{flops / scale:.0f} {unit}"
    return f"{flops:.0f} FLOPs"


def summary(run: DemoRun, result: Result, i: int) -> str:
    """The lines under model ``i``'s gallery: its time per image, its counted arithmetic, its sampling path."""
    d = result.drawn[i]
    lines = [f"**{d.title}** `{d.source}`",
             f"time: **{d.seconds_per_image:.3f} s per image** ({d.seconds:.2f} s for {len(d.images)}, wall clock)"]
    if d.macs is None:
        lines.append("FLOPs: counting...")
    else:
        line = f"FLOPs: **{flops_text(2 * d.macs)} per image** counted, all of its sampling"
        if d.denoiser_macs is not None:
            halves = ", both halves of guidance" if d.options.get("guidance", 1.0) != 1.0 else ""
            line += f" (the denoiser: {flops_text(2 * d.denoiser_macs)} per call{halves}, {d.denoiser_calls} calls)"
        lines.append(line)
        base = result.drawn[-1] if i == 0 and len(result.drawn) > 1 else None
        if base is not None and base.macs:
            both = d.denoiser_macs and base.denoiser_macs
            ratio = d.denoiser_macs / base.denoiser_macs if both else d.macs / base.macs
            lines.append(f"against its base: **{ratio:.3f} of the DiT's FLOPs** (denoiser), "
                         f"**{base.seconds / d.seconds:.2f}x** its speed")
    lines.append(f"sampling: {d.said}" + (", bf16 autocast" if d.bf16 and "bf16" not in d.said else ""))
    return "  \n".join(lines)


def seed_line(result: Result) -> str:
    how = "drawn at random" if result.randomized else "as given"
    return (f"seed **{result.seed}** ({how}): with randomize off and this seed, the same settings draw the same "
            "images again")


def inspect_sample(run: DemoRun, result: Result, index: int, out_dir: Path) -> tuple[Path, Path]:
    """DyDiT's pictures for sample ``index`` of ``result``: heads and MLP groups on per layer at each of its
    timesteps, and its token maps (eval/dydit_pictures.py), from the trace of the run that drew it."""
    d = result.drawn[0]
    if d.trace is None:
        raise DemoError("the active heads, groups and tokens are shown for a DyDiT run; this run is "
                        f"{run.system.config.system}")
    if not 0 <= int(index) < len(d.images):
        raise DemoError(f"sample {index}: choose one of 0..{len(d.images) - 1}")
    index = int(index)
    out_dir = Path(out_dir)
    width = sample_width_picture(run.system, d.trace, out_dir / f"width_{index}.png")
    tokens = sample_token_picture(run.system, d.trace, d.images[index], index, out_dir / f"tokens_{index}.png")
    return width, tokens


@torch.no_grad()
def decode_latent(run: DemoRun, z1: float, z2: float, condition: str = "") -> np.ndarray:
    """A 2-D VAE's decoding of the latent point (z1, z2), as a uint8 (H, W, C) image enlarged for the page."""
    if not run.latent_2d:
        raise DemoError("the latent plane is for a VAE with a 2-D latent (model.latent_dim=2)")
    label = None
    if run.condition_kind == "class":
        cond, _ = run.condition_of(condition if condition != EVERY_CLASS else "", 1)
        label = cond if isinstance(cond, torch.Tensor) else torch.tensor([cond])
        label = label.to(run.system.device)
    z = torch.tensor([[float(z1), float(z2)]], device=run.system.device)
    image = run.system.decode_latent(z, label)
    array = to_uint8(image)[0]
    scale = max(1, math.ceil(GALLERY_SIDE * 2 / array.shape[0]))
    return np.kron(array, np.ones((scale, scale, 1), dtype=np.uint8))
