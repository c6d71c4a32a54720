"""The browser demo, ``difflineage demo [RUN ...]``: a page on localhost that samples any trained run.

The page asks for what the run's family takes: a class by name (or a caption, for caption-conditioned runs), the
number of images, a seed (or a random one, always shown so that a picture can be drawn again), and the family's
options: guidance, steps, sampler and the fast path (as ``sample --fast``) for the diffusion systems, the
temperature of the autoregressive priors (and the VAE), the rerank count of a DALL-E prior that carries a CLIP, and
for a VAE with a 2-D latent a point of the latent plane, decoded as it moves. It shows a gallery, the wall-clock
time per image and the arithmetic counted per image (torch's FlopCounterMode, eval/flops.py), and offers the images
as a PNG grid and an npz (ADM's layout, as ``sample --npz``). A DyDiT is drawn beside the DiT it was fine-tuned
from, with the same seed and settings, and for a sample picked in its gallery the page draws which heads and MLP
groups each layer computed at each timestep and where its token routers sent tokens through the MLP
(eval/dydit_pictures.py, drawn from that very run).

The page's functions live here without Gradio (``DemoRun``, ``draw``, ``count``, ``inspect_sample``,
``decode_latent``): the tests call them directly. ``build_app`` wires them into Gradio, imported only there: it is
an optional dependency (``pip install -e ".[demo]"``). Every bad request (an unknown class, a caption for a
class-conditional run, a directory that is not a run, an option out of range) comes back as a ``DemoError`` whose
message the page shows; the server keeps serving.
"""

import atexit
import inspect
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from difflineage.checkpoint import checkpoints_of, resolve_checkpoint
from difflineage.config import unknown
from difflineage.data import DIGIT_NAMES
from difflineage.errors import CheckpointError, ConfigError, DataError, RunDirError, StorageError
from difflineage.eval.dydit_pictures import TokenTrace, sample_token_picture, sample_width_picture, trace_tokens
from difflineage.eval.flops import count_flops, flops_per_call
from difflineage.eval.sampling import FAST_STEPS, bf16_autocast, fast_sampling
from difflineage.images import save_grid, save_png, to_uint8
from difflineage.systems import System, load
from difflineage.systems.base import Denoises, DynamicCompute, Reranks

EVERY_CLASS = "every class in turn"
MAX_IMAGES = 64
MAX_RERANK = 16
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
GALLERY_SIDE = 128  # gallery images are enlarged (nearest neighbour) to at least this many pixels a side
KEPT_RESULTS = 8  # requests whose images and traces are kept for downloads and inspection
USER_ERRORS = (CheckpointError, ConfigError, DataError, RunDirError, StorageError, ValueError, TypeError)


class DemoError(Exception):
    """A request the page cannot serve; the message says what was wrong and what to do instead."""


# -- runs ----------------------------------------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """The run directories directly under ``root`` that hold a complete checkpoint, in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and checkpoints_of(p))


def check_run(path: Path) -> Path:
    """The checkpoint a run (or checkpoint) directory resolves to; anything else is a ``DemoError``."""
    try:
        return resolve_checkpoint(path)
    except CheckpointError as exc:
        raise DemoError(str(exc)) from None


@dataclass
class Model:
    """One system the page samples: the run's own, or beside a DyDiT the DiT it was fine-tuned from. Keeps what the
    fast path prepared for it (a step cache per sampler, steps and guidance; whether its blocks are compiled)."""

    system: System
    title: str
    source: str
    step_caches: dict = field(default_factory=dict)
    compiled: bool = False
    compiled_sizes: set = field(default_factory=set)  # batch sizes its compiled blocks have run at

    @property
    def dynamic(self) -> bool:
        """Whether its arithmetic changes with the sample (DyDiT): then FLOPs are counted on every image."""
        return isinstance(self.system, DynamicCompute)

    def options_for(self, options: dict[str, Any], fast: bool, seed: int) -> tuple[dict[str, Any], bool, str]:
        """(sampling options, bf16, a line saying what was chosen): as asked, or on the fast path."""
        if not fast:  # blocks compiled by an earlier fast-path request stay compiled (in place)
            return dict(options), False, describe_options(options) + (", compiled blocks" if self.compiled else "")
        key = tuple(sorted((k, v) for k, v in options.items()))
        if key not in self.step_caches:  # calibrated once per sampler, steps and guidance
            self.step_caches[key] = fast_sampling(self.system, options, seed=0, compile=False)
        fast_options, bf16, said = self.step_caches[key]
        if not self.compiled and hasattr(self.system, "compile_blocks"):
            self.compiled = self.system.compile_blocks()
        return dict(fast_options), bf16, said + (", compiled blocks" if self.compiled else "")

    def compiles_at(self, n: int) -> bool:
        """Whether sampling ``n`` images now first compiles its blocks for that batch size (and note that it has)."""
        first = self.compiled and n not in self.compiled_sizes
        if self.compiled:
            self.compiled_sizes.add(n)
        return first


class DemoRun:
    """A loaded run: its system, the base DiT beside a DyDiT, and the controls its family takes."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = Path(path)
        self.checkpoint = check_run(self.path)
        try:
            system = load(self.checkpoint, device=device)
        except (CheckpointError, ConfigError, DataError) as exc:
            raise DemoError(f"{self.path} could not be loaded: {exc}") from None
        self.system = system
        self.models = [Model(system, self.family_title(system), str(self.path))]
        self.base_note = ""
        if system.config.system == "dydit":
            self._load_base(device)
        self.sample_parameters = set(inspect.signature(type(system).sample).parameters)
        if self.diffusion:
            self.warm_up()

    def warm_up(self) -> None:
        """One tiny sample from each model before any is timed, so that neither the first model of a request nor
        the first request pays for what only a first call does (allocations, weight slices)."""
        for model in self.models:
            label = 0 if self.condition_kind == "class" else None
            caption = self.defaults()["condition"] if self.condition_kind == "caption" else None
            model.system.sample(1, condition=[caption] if caption else label, generator=torch.Generator().manual_seed(0),
                                steps=2, sampler="ddim")

    @staticmethod
    def family_title(system: System) -> str:
        names = {"dit": "DiT", "dydit": "DyDiT", "ddpm": "DDPM", "ldm": "Latent diffusion", "vae": "VAE",
                 "vqvae": "VQ-VAE", "vqvae2": "VQ-VAE-2", "dalle": "DALL-E", "autoencoder_kl": "Autoencoder (KL)"}
        return names.get(system.config.system, system.config.system)

    def _load_base(self, device: str) -> None:
        base = self.system.config.model.base
        candidates = [Path(base), self.path.parent.parent / base]  # as trained (from the repository), or beside
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            self.base_note = (f"its base DiT ({base}) is not a run directory here"
                              + (" (an official DiT file)" if Path(base).is_file() else "")
                              + ": the DyDiT is shown alone")
            return
        try:
            self.models.append(Model(load(check_run(found), device=device), "DiT (its base)", str(found)))
        except (DemoError, CheckpointError, ConfigError, DataError) as exc:
            self.base_note = f"its base DiT ({base}) could not be loaded ({exc}): the DyDiT is shown alone"

    # -- what the family takes ------------------------------------------------------------------------------

    @property
    def diffusion(self) -> bool:
        return hasattr(self.system, "chain")

    @property
    def condition_kind(self) -> str:
        """"caption", "class" or "none": what the condition field asks for."""
        if self.system.caption_conditioned:
            return "caption"
        return "class" if self.system.num_classes else "none"

    @property
    def class_names(self) -> list[str]:
        """The names a class is asked for by (the data's, as captions use them; numbers where it has none)."""
        k = self.system.num_classes
        names = list(self.system.config.data.class_names or DIGIT_NAMES)
        return names[:k] if len(names) >= k else [str(i) for i in range(k)]

    @property
    def takes_temperature(self) -> bool:
        return "temperature" in self.sample_parameters

    @property
    def takes_guidance(self) -> bool:
        if self.diffusion:
            return self.condition_kind != "none"
        return "guidance" in self.sample_parameters

    @property
    def can_rerank(self) -> bool:
        return isinstance(self.system, Reranks) and "rerank" in self.sample_parameters and \
            getattr(self.system, "clip_model", lambda: None)() is not None

    @property
    def latent_2d(self) -> bool:
        return self.system.config.system == "vae" and self.system.config.model.latent_dim == 2

    def defaults(self) -> dict[str, Any]:
        """The controls' starting values: the run's own sampling settings."""
        m = self.system.config.model
        out: dict[str, Any] = {"condition": EVERY_CLASS if self.condition_kind == "class" else ""}
        if self.condition_kind == "caption" and self.system.num_classes:  # the caption of a class, as an example
            out["condition"] = self.system.captions_for(torch.tensor([self.system.num_classes - 1]))[0]
        if self.diffusion:
            dc = m.diffusion
            out.update(guidance=dc.guidance, steps=dc.sample_steps, sampler=dc.sampler, max_steps=dc.timesteps)
        else:
            out["guidance"] = getattr(m, "guidance", 1.0)
        out["temperature"] = getattr(m, "temperature", 1.0)
        out["rerank"] = getattr(m, "rerank", 1)
        return out

    def describe(self) -> str:
        """A few lines about the run for the top of the page."""
        s = self.system
        params = sum(p.numel() for p in s.parameters())
        step = self.checkpoint.name.removeprefix("step_").lstrip("0") or "0"
        lines = [f"**{self.path}**: {self.family_title(s)} ({s.config.system}), {params / 1e6:.2f}M parameters, "
                 f"checkpoint {self.checkpoint.name} ({step} steps), {s.config.data.source} "
                 f"{s.config.data.image_size}px; condition: {self.condition_kind}."]
        if len(self.models) > 1:
            lines.append(f"Drawn beside its base DiT, `{self.models[1].source}`, with the same seed and settings.")
        if self.base_note:
            lines.append(f"Note: {self.base_note}.")
        return "  \n".join(lines)

    # -- a request in the user's words -> sampling arguments ----------------------------------------------

    def condition_of(self, text: str, n: int) -> tuple[Any, list[str]]:
        """(the ``condition`` for System.sample, a caption per image) from what the user typed or chose."""
        text = (text or "").strip()
        kind = self.condition_kind
        if kind == "caption":
            if not text:
                raise DemoError("give a caption: this run is caption-conditioned (e.g. "
                                f"{self.defaults()['condition']!r})")
            return [text] * n, [text] * n
        names = self.class_names
        if kind == "none":
            if text and text != EVERY_CLASS:
                raise DemoError(f"this run ({self.system.config.system}) is unconditional: it takes no class or "
                                f"caption, and {text!r} was given; leave the condition empty")
            return None, [""] * n
        if not text or text == EVERY_CLASS:
            labels = torch.arange(n) % len(names)
            return labels, [names[i] for i in labels.tolist()]
        lowered = {name.lower(): i for i, name in enumerate(names)}
        if text.lower() in lowered:
            label = lowered[text.lower()]
        elif text.isdigit() and int(text) < len(names):
            label = int(text)
        elif len(text.split()) > 1:
            raise DemoError(f"{text!r} reads as a caption, but this run ({self.system.config.system}) is "
                            f"class-conditional: choose a class by name ({', '.join(names)}) or {EVERY_CLASS!r}")
        else:
            raise DemoError(unknown("class", text, names) + f" (or {EVERY_CLASS!r})")
        return label, [names[label]] * n

    def options_of(self, request: "Request") -> dict[str, Any]:
        """The sampling options of ``request`` that this family takes, checked. Options left out take the run's own values, and all are passed explicitly, so that a DyDiT and its base DiT
        (whose recipes may differ) sample with the same settings; on the fast path a sampler and step count left out
        are DPM-Solver++'s 20 steps, as ``sample --fast`` has them."""
        d = self.defaults()
        options: dict[str, Any] = {}
        if self.takes_guidance:
            guidance = d["guidance"] if request.guidance is None else request.guidance
            if not 0 <= guidance <= 50:
                raise DemoError(f"guidance {guidance} must lie in 0..50 (1: no guidance)")
            options["guidance"] = float(guidance)
        if self.diffusion:
            T = d["max_steps"]
            steps = request.steps if request.steps is not None else FAST_STEPS if request.fast else d["steps"]
            if not 1 <= int(steps) <= T:
                raise DemoError(f"steps {steps} must lie in 1..{T} (this run's chain has {T} timesteps)")
            sampler = request.sampler or ("dpmpp_2m" if request.fast else d["sampler"])
            if sampler not in SAMPLERS:
                raise DemoError(unknown("sampler", sampler, list(SAMPLERS)))
            options.update(sampler=sampler, steps=int(steps))
        if self.takes_temperature and request.temperature is not None:
            if not request.temperature > 0:
                raise DemoError(f"temperature {request.temperature} must be positive")
            options["temperature"] = float(request.temperature)
        if request.rerank is not None and int(request.rerank) > 1:
            if not self.can_rerank:
                raise DemoError("this run cannot rerank: that needs a DALL-E prior that carries a CLIP "
                                "(model.clip_stage); set rerank to 1")
            if int(request.rerank) > MAX_RERANK:
                raise DemoError(f"rerank {request.rerank}: at most {MAX_RERANK} candidates per image")
            options["rerank"] = int(request.rerank)
        return options


def describe_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items() if k != "step_cache") or "the run's own settings"


# -- drawing -------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """What the page asks for. ``condition``: a class name (or its number, or EVERY_CLASS) or a caption."""

    condition: str = ""
    n: int = 16
    seed: int = 0
    randomize: bool = False
    guidance: Optional[float] = None
    steps: Optional[int] = None
    sampler: Optional[str] = None
    temperature: Optional[float] = None
    rerank: Optional[int] = None
    fast: bool = False


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
            progress(i / len(run.models), f"sampling {model.title}" + (" (preparing the fast path)" if request.fast else ""))
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
    return Result(run=str(run.path), seed=seed, randomized=bool(request.randomize), condition=condition,
                  captions=captions, drawn=drawn, out_dir=out_dir)


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
    """The gallery's PNGs (enlarged), a grid PNG and an npz (``arr_0`` uint8 N x H x W x C, and ``arr_1`` the class
    labels of a class-conditional request, as ADM's sampling script writes them) of one model's images."""
    slug = _slug(model.title)
    side = images.shape[-1]
    scale = max(1, math.ceil(GALLERY_SIDE / side))
    arrays = to_uint8(images)
    files = [save_png(a, out_dir / f"{slug}_{i:02d}.png", scale=scale) for i, a in enumerate(arrays)]
    every_class = labels is not None and len(set(labels.tolist())) > 1
    grid = save_grid(images, out_dir / f"{slug}_seed{seed}.png", nrow=min(len(images), 10 if every_class else 8), scale=2)
    npz = out_dir / f"{slug}_seed{seed}.npz"
    np.savez(npz, arr_0=arrays, **({"arr_1": labels.astype(np.int64)} if labels is not None else {}))
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
            ratio = d.denoiser_macs / base.denoiser_macs if d.denoiser_macs and base.denoiser_macs else d.macs / base.macs
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
    vae = run.system.vae
    z = torch.tensor([[float(z1), float(z2)]], device=run.system.device)
    image = vae.mean_image(vae.decode(z, label))
    array = to_uint8(image)[0]
    scale = max(1, math.ceil(GALLERY_SIDE * 2 / array.shape[0]))
    return np.kron(array, np.ones((scale, scale, 1), dtype=np.uint8))


# -- the page --------------------------------------------------------------------------------------------------


class Demo:
    """The page's state across requests: the loaded runs, the recent results (for downloads and inspection), one
    lock so that only one request uses the models at a time, and the folder the images are written into."""

    def __init__(self, runs: list[Path], device: str = "cpu", out_root: Optional[Path] = None):
        self.runs = [Path(r) for r in runs]
        self.device = device
        self.owns_out_root = out_root is None  # a temp folder of its own is removed at exit; a given one is kept
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="difflineage-demo-"))
        if self.owns_out_root:
            atexit.register(self.close)
        self.loaded: dict[str, DemoRun] = {}
        self.results: OrderedDict[str, Result] = OrderedDict()
        self.lock = threading.Lock()
        self.counter = 0

    def run(self, path: str) -> DemoRun:
        if not path:
            raise DemoError("choose a run (a directory under runs/, or type the path of one)")
        key = str(Path(path))
        if key not in self.loaded:
            self.loaded[key] = DemoRun(Path(path), self.device)
        return self.loaded[key]

    def new_dir(self) -> tuple[str, Path]:
        self.counter += 1
        key = f"request-{self.counter:05d}"
        return key, self.out_root / key

    def close(self) -> None:
        """Remove the images of the recent requests when the folder is the demo's own temp folder."""
        if self.owns_out_root:
            shutil.rmtree(self.out_root, ignore_errors=True)

    def keep(self, key: str, result: Result) -> None:
        self.results[key] = result
        while len(self.results) > KEPT_RESULTS:
            _, old = self.results.popitem(last=False)
            shutil.rmtree(old.out_dir, ignore_errors=True)


def message(exc: BaseException) -> str:
    """What the page says about a failed request: the error's own message, never a traceback."""
    if isinstance(exc, (DemoError,) + USER_ERRORS):
        return f"**Error:** {exc}"
    traceback.print_exc(file=sys.stderr)
    return f"**Error:** {type(exc).__name__}: {exc} (the server's log has the details; the page keeps serving)"


def theme():
    """Gradio's base theme with the system's own fonts: the page loads nothing from outside localhost."""
    import gradio as gr

    return gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def build_app(demo: Demo):
    """The Gradio Blocks of the page (gradio imported here: it is an optional dependency)."""
    import gradio as gr

    choices = [str(r) for r in demo.runs]
    hidden = gr.update(visible=False)

    with gr.Blocks(title="difflineage demo", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# difflineage demo\nSample a trained run. Every control is explained in docs/demo.md.")
        run_box = gr.Dropdown(choices=choices, value=choices[0] if choices else None, allow_custom_value=True,
                              label="run (a run directory: choose one found, or type a path)", elem_id="run")
        about = gr.Markdown(elem_id="about")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                class_box = gr.Dropdown(choices=[EVERY_CLASS], value=EVERY_CLASS, allow_custom_value=True,
                                        label="class (by name)", elem_id="class")
                caption_box = gr.Textbox(label="caption", visible=False, elem_id="caption")
                n_box = gr.Slider(1, MAX_IMAGES, value=16, step=1, label="number of images", elem_id="n")
                with gr.Row():
                    seed_box = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                    randomize = gr.Checkbox(value=False, label="randomize", elem_id="randomize")
                guidance = gr.Slider(0, 10, value=3, step=0.25, label="guidance (1: none)", elem_id="guidance")
                steps = gr.Slider(1, 1000, value=50, step=1, label="steps", elem_id="steps")
                sampler = gr.Radio(list(SAMPLERS), value="ddim", label="sampler", elem_id="sampler")
                fast = gr.Checkbox(value=False, elem_id="fast",
                                   label="fast path (as sample --fast: step cache, compiled DiT blocks, bf16 where "
                                         "native; picks DPM-Solver++ 20 steps)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature", elem_id="temperature")
                rerank = gr.Slider(1, MAX_RERANK, value=1, step=1, label="rerank: candidates per image (CLIP keeps "
                                   "the best)", elem_id="rerank")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Group(visible=False) as latent_group:
                    gr.Markdown("2-D latent: move the point, see its decoding")
                    z1 = gr.Slider(-3, 3, value=0, step=0.05, label="z1", elem_id="z1")
                    z2 = gr.Slider(-3, 3, value=0, step=0.05, label="z2", elem_id="z2")
                    latent_image = gr.Image(label="decoded", type="numpy", elem_id="latent-image", interactive=False)
            with gr.Column(scale=3):
                seed_used = gr.Markdown(elem_id="seed-used")
                with gr.Row():
                    with gr.Column():
                        gallery0 = gr.Gallery(label="samples", columns=6, object_fit="contain", height="auto",
                                              elem_id="gallery-0")
                        stats0 = gr.Markdown(elem_id="stats-0")
                    with gr.Column(visible=False) as column1:
                        gallery1 = gr.Gallery(label="DiT (its base)", columns=6, object_fit="contain", height="auto",
                                              elem_id="gallery-1")
                        stats1 = gr.Markdown(elem_id="stats-1")
                files = gr.File(label="download: PNG grid and npz (arr_0: uint8 N x H x W x C)", file_count="multiple",
                                elem_id="files", interactive=False)
                with gr.Group(visible=False) as inspect_group:
                    gr.Markdown("DyDiT, for one sample (click an image of the DyDiT gallery): the heads and MLP groups "
                                "each layer computed at each of its timesteps, and where its tokens went through the MLP")
                    sample_index = gr.Number(value=0, precision=0, minimum=0, label="sample", elem_id="sample-index")
                    width_image = gr.Image(label="active heads and MLP groups per layer", type="filepath",
                                           elem_id="width-picture", interactive=False, show_label=False)
                    token_image = gr.Image(label="token maps", type="filepath", elem_id="token-picture",
                                           interactive=False, show_label=False)
        result_key = gr.State("")

        run_outputs = [about, status, class_box, caption_box, guidance, steps, sampler, fast, temperature, rerank,
                       latent_group, column1, inspect_group, gallery0, gallery1, stats0, stats1, seed_used, files,
                       width_image, token_image, latent_image, generate]

        def on_run(path):
            """Show the controls the chosen run's family takes, with its own settings; clear the last results."""
            cleared = {gallery0: gr.update(value=[]), gallery1: gr.update(value=[]), stats0: "", stats1: "",
                       seed_used: "", files: None, width_image: None, token_image: None, latent_image: None}
            try:
                with demo.lock:
                    run = demo.run(path)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
                return {**cleared, about: "", status: message(exc), generate: gr.update(interactive=False),
                        **{c: hidden for c in (class_box, caption_box, guidance, steps, sampler, fast, temperature,
                                               rerank, latent_group, column1, inspect_group)}}
            d = run.defaults()
            kind = run.condition_kind
            return {**cleared, about: run.describe(), status: "", generate: gr.update(interactive=True),
                    class_box: gr.update(visible=kind == "class", choices=[EVERY_CLASS] + run.class_names,
                                         value=d["condition"] if kind == "class" else EVERY_CLASS),
                    caption_box: gr.update(visible=kind == "caption", value=d["condition"] if kind == "caption" else ""),
                    guidance: gr.update(visible=run.takes_guidance, value=d["guidance"]),
                    steps: gr.update(visible=run.diffusion, value=d.get("steps", 50), maximum=d.get("max_steps", 1000)),
                    sampler: gr.update(visible=run.diffusion, value=d.get("sampler", "ddim")),
                    fast: gr.update(visible=run.diffusion, value=False),
                    temperature: gr.update(visible=run.takes_temperature and not run.latent_2d, value=d["temperature"]),
                    rerank: gr.update(visible=run.can_rerank, value=d["rerank"]),
                    latent_group: gr.update(visible=run.latent_2d),
                    column1: gr.update(visible=len(run.models) > 1),
                    inspect_group: gr.update(visible=run.models[0].dynamic),
                    gallery0: gr.update(label=run.models[0].title, value=[], visible=True),
                    latent_image: decode_latent(run, 0.0, 0.0, d["condition"]) if run.latent_2d else None}

        run_box.change(on_run, [run_box], run_outputs)
        app.load(on_run, [run_box], run_outputs)

        def on_fast(on):
            return (gr.update(value="dpmpp_2m"), gr.update(value=20)) if on else (gr.update(), gr.update())

        fast.change(on_fast, [fast], [sampler, steps])

        def on_generate(path, cls, caption, n, seed, rand, g, k, smp, fst, temp, rr,
                        progress=gr.Progress()):
            blank = ["", [], "", [], "", None, "", None, None, 0]
            try:
                with demo.lock:
                    run = demo.run(path)
                    request = Request(condition=caption if run.condition_kind == "caption" else cls, n=int(n),
                                      seed=seed, randomize=rand, guidance=g, steps=k, sampler=smp, fast=fst,
                                      temperature=temp, rerank=rr)
                    key, out_dir = demo.new_dir()
                    result = draw(run, request, out_dir, progress=lambda f, what: progress(f, desc=what))
                    demo.keep(key, result)
            except Exception as exc:  # noqa: BLE001
                yield [message(exc)] + blank
                return
            yield page_outputs(run, result, key, status="counting FLOPs...")
            try:
                with demo.lock:
                    count(run, result)
                    pictures = inspect_sample(run, result, 0, result.out_dir) if run.models[0].dynamic else (None, None)
            except Exception as exc:  # noqa: BLE001
                yield page_outputs(run, result, key, status=message(exc))
                return
            yield page_outputs(run, result, key, status="", pictures=pictures)

        def page_outputs(run, result, key, status, pictures=(None, None)):
            galleries = [[(str(f), c) for f, c in zip(d.image_files, result.captions)] for d in result.drawn]
            return [status, seed_line(result), galleries[0], summary(run, result, 0),
                    galleries[1] if len(galleries) > 1 else [], summary(run, result, 1) if len(galleries) > 1 else "",
                    [str(f) for f in result.files], key, str(pictures[0]) if pictures[0] else None,
                    str(pictures[1]) if pictures[1] else None, 0]

        generate.click(on_generate, [run_box, class_box, caption_box, n_box, seed_box, randomize, guidance, steps,
                                     sampler, fast, temperature, rerank],
                       [status, seed_used, gallery0, stats0, gallery1, stats1, files, result_key, width_image,
                        token_image, sample_index])

        def on_inspect(path, key, index):
            try:
                with demo.lock:
                    run = demo.run(path)
                    if key not in demo.results:
                        raise DemoError("generate first: there is no sample to inspect yet")
                    width, tokens = inspect_sample(run, demo.results[key], index, demo.results[key].out_dir)
            except Exception as exc:  # noqa: BLE001
                return message(exc), None, None
            return "", str(width), str(tokens)

        def on_select(path, key, evt: gr.SelectData):
            return [evt.index, *on_inspect(path, key, evt.index)]

        gallery0.select(on_select, [run_box, result_key], [sample_index, status, width_image, token_image])
        sample_index.submit(on_inspect, [run_box, result_key, sample_index], [status, width_image, token_image])

        def on_latent(path, cls, a, b):
            try:
                with demo.lock:
                    return "", decode_latent(demo.run(path), a, b, cls)
            except Exception as exc:  # noqa: BLE001
                return message(exc), None

        for slider in (z1, z2):
            slider.change(on_latent, [run_box, class_box, z1, z2], [status, latent_image])
    return app


def serve(runs: list[Path], host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
          block: bool = True):
    """Start the page on http://HOST:PORT for ``runs`` (the first is shown first). Offline: no analytics, no share
    link, no fonts or scripts from elsewhere. Returns the Gradio app (with ``block=False``, for tests and the
    benchmark, which then call ``app.close()``)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DemoError('the demo needs Gradio: pip install -e ".[demo]" (or make demo)') from None
    demo = Demo(runs, device=device)
    app = build_app(demo)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
               ssr_mode=False, theme=theme(), footer_links=[], allowed_paths=[str(demo.out_root)], quiet=True,
               show_error=False)
    return app
