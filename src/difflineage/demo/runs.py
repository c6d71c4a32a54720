"""The demo's runs: which directories are runs, a loaded run (``DemoRun``: its system, the base DiT beside a DyDiT,
the controls its family takes) and a request in the page's words (``Request``) turned into sampling arguments,
every bad one a ``DemoError`` that says what to give instead."""

import functools
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from difflineage.checkpoint import checkpoints_of, resolve_checkpoint
from difflineage.config import unknown
from difflineage.data import load_dataset
from difflineage.diffusion.gaussian import SAMPLERS
from difflineage.errors import CheckpointError, ConfigError, DataError
from difflineage.eval.sampling import FAST_STEPS, fast_sampling
from difflineage.systems import System, load
from difflineage.systems.base import (
    CarriesClip,
    CompilesBlocks,
    DynamicCompute,
    FineTunes,
    LatentPlane,
    Reranks,
    Respaces,
)

EVERY_CLASS = "every class in turn"
MAX_RERANK = 16


PRESET_OWN = "the run's own settings"


class DemoError(Exception):
    """A request the page cannot serve; the message says what was wrong and what to do instead."""


def find_runs(root: Path) -> list[Path]:
    """The run directories directly under ``root`` that hold a complete checkpoint, in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and checkpoints_of(p))


SD_PREFIX = "sd:"  # a released Stable Diffusion (diffusers folder or single file) rather than a run


def check_run(path: Path) -> Path:
    """The checkpoint a run (or checkpoint) directory resolves to, or the files of ``sd:PATH``; anything else is a
    ``DemoError``."""
    if str(path).startswith(SD_PREFIX):
        target = Path(str(path)[len(SD_PREFIX):])
        if not target.exists():
            raise DemoError(f"{target}: no Stable Diffusion folder or file there (sd:PATH names a diffusers folder or "
                            "a single file)")
        return target
    try:
        return resolve_checkpoint(path)
    except CheckpointError as exc:
        raise DemoError(str(exc)) from None


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
        if not self.compiled and isinstance(self.system, CompilesBlocks):
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
        self.released = str(path).startswith(SD_PREFIX)
        try:
            if self.released:
                from difflineage.systems.stable_diffusion import StableDiffusionSystem

                system = StableDiffusionSystem.released(self.checkpoint).to(device).eval()
            else:
                system = load(self.checkpoint, device=device)
        except (CheckpointError, ConfigError, DataError) as exc:
            # the reason goes to the server's log only: it may quote the run's files (a line of its config.yaml)
            print(f"difflineage demo: {self.path} could not be loaded: {exc}", file=sys.stderr)
            raise DemoError(f"{self.path} could not be loaded ({type(exc).__name__}); the server's log says why") \
                from None
        self.system = system
        self.models = [Model(system, system.title, str(self.path))]
        self.base_note = ""
        if isinstance(system, FineTunes):
            self._load_base(device)
        self.sample_parameters = {f.name for f in fields(system.SampleOptions)}  # the options it declares
        if self.diffusion:
            self.warm_up()

    def warm_up(self) -> None:
        """One tiny sample from each model before any is timed, so that neither the first model of a request nor
        the first request pays for what only a first call does (allocations, weight slices)."""
        for model in self.models:
            label = 0 if self.condition_kind == "class" else None
            caption = self.defaults()["condition"] if self.condition_kind == "caption" else None
            model.system.sample(1, condition=[caption] if caption else label,
                                generator=torch.Generator().manual_seed(0), steps=2, sampler="ddim")

    def _load_base(self, device: str) -> None:
        base = self.system.base
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
            print(f"difflineage demo: the base DiT {found} could not be loaded: {exc}", file=sys.stderr)
            self.base_note = (f"its base DiT ({base}) could not be loaded ({type(exc).__name__}; the server's log says "
                              "why): the DyDiT is shown alone")

    # -- what the family takes ------------------------------------------------------------------------------

    @property
    def diffusion(self) -> bool:
        return isinstance(self.system, Respaces)

    @property
    def condition_kind(self) -> str:
        """"caption", "class" or "none": what the condition field asks for."""
        if self.system.caption_conditioned:
            return "caption"
        return "class" if self.system.num_classes else "none"

    @functools.cached_property
    def training_captions(self) -> list[str]:
        """The distinct captions this run was trained on (its data's training split; the class captions of a run
        trained on class names); empty when its data is not at hand."""
        if self.condition_kind != "caption":
            return []
        s = self.system
        if s.num_classes and not s.captions_from_file:
            return s.captions_for(torch.arange(s.num_classes))
        try:
            return list(dict.fromkeys(load_dataset(s.config.data, "train").captions or []))
        except Exception as exc:  # noqa: BLE001 - suggestions are a help: without the data the box takes free text
            print(f"difflineage demo: no caption suggestions for {self.path}: {exc}", file=sys.stderr)
            return []

    @functools.cached_property
    def caption_suggestions(self) -> list[str]:
        """What the caption box suggests: the held-out captions first (the run never saw them drawn), then the
        training captions."""
        if self.condition_kind != "caption":
            return []
        held: list[str] = []
        if self.system.captions_from_file:
            try:
                held = list(load_dataset(self.system.config.data, "heldout").captions or [])
            except Exception:  # noqa: BLE001 - as above
                held = []
        return list(dict.fromkeys(held + self.training_captions))

    def caption_note(self, caption: str) -> str:
        """A note on the words of ``caption`` that no training caption holds (empty when there are none): the text
        encoder still reads them, byte by byte, but the images were never drawn for them."""
        known = {w for c in self.training_captions for w in words(c)}
        if not known:
            return ""
        new = [w for w in dict.fromkeys(words(caption)) if w not in known]
        if not new:
            return ""
        listed = ", ".join(repr(w) for w in new[:5]) + (" ..." if len(new) > 5 else "")
        return (f"note: {listed} never occur{'s' if len(new) == 1 else ''} in the captions this run was trained on; its "
                "text encoder reads them letter by letter, but no image was drawn for them, so expect them to be "
                "ignored or misread")

    @property
    def class_names(self) -> list[str]:
        """The names a class is asked for by (the data's, as captions use them; numbers where it has none)."""
        return self.system.class_names

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
            isinstance(self.system, CarriesClip) and self.system.clip_model() is not None

    @property
    def latent_2d(self) -> bool:
        return isinstance(self.system, LatentPlane) and self.system.latent_dim == 2

    def defaults(self) -> dict[str, Any]:
        """The controls' starting values: the run's own sampling settings."""
        m = self.system.config.model
        out: dict[str, Any] = {"condition": EVERY_CLASS if self.condition_kind == "class" else ""}
        if self.condition_kind == "caption" and self.system.num_classes and not self.system.captions_from_file:
            # the caption of a class, as an example (a run trained on a captions file never saw such captions)
            out["condition"] = self.system.captions_for(torch.tensor([self.system.num_classes - 1]))[0]
        elif self.condition_kind == "caption" and self.caption_suggestions:
            out["condition"] = self.caption_suggestions[0]  # the data's own captions: the first held-out one
        if self.diffusion:
            dc = m.diffusion
            out.update(guidance=dc.guidance, steps=dc.sample_steps, sampler=dc.sampler, max_steps=dc.timesteps)
        else:
            out["guidance"] = getattr(m, "guidance", 1.0)
        out["temperature"] = getattr(m, "temperature", 1.0)
        out["rerank"] = getattr(m, "rerank", 1)
        return out

    def presets(self) -> dict[str, dict[str, Any]]:
        """Example settings for this run, by name: the values of the controls each sets (the run's own first). Only
        the controls this run's family shows are named."""
        d = self.defaults()
        own = {k: d[k] for k in ("guidance", "steps", "sampler", "temperature", "rerank") if k in d}
        out: dict[str, dict[str, Any]] = {PRESET_OWN: {**own, "fast": False}}
        if self.diffusion:
            out["few steps: DPM-Solver++, 10 steps"] = {"sampler": "dpmpp_2m", "steps": 10, "fast": False}
            out["fastest: the fast path"] = {"sampler": "dpmpp_2m", "steps": 20, "fast": True}
            out["the papers' FID setting: DDPM, 250 steps, guidance 1.5"] = {
                "sampler": "ddpm", "steps": min(250, d["max_steps"]), "guidance": 1.5, "fast": False}
        if self.takes_guidance:
            out["strong guidance (5): more typical, less varied"] = {"guidance": 5.0}
        if self.takes_temperature and not self.latent_2d:
            out["cooler (temperature 0.7): safer, less varied"] = {"temperature": 0.7}
        if self.can_rerank:
            out["best of 8 (CLIP reranks 8 candidates per image)"] = {"rerank": 8}
        return out

    def describe(self) -> str:
        """A few lines about the run for the top of the page."""
        s = self.system
        params = sum(p.numel() for p in s.parameters())
        step = self.checkpoint.name.removeprefix("step_").lstrip("0") or "0"
        lines = [f"**{self.path}**: {s.title} ({s.config.system}), {params / 1e6:.2f}M parameters, "
                 f"checkpoint {self.checkpoint.name} ({step} steps), {s.config.data.source} "
                 f"{s.config.data.image_size}px; condition: {self.condition_kind}."]
        if self.released:
            lines = [f"**{self.path}**: Stable Diffusion {s.sd.version}, released weights ({params / 1e6:.0f}M "
                     f"parameters), {s.sd.default_size}px; condition: caption."]
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

    def options_of(self, request: Request) -> dict[str, Any]:
        """The sampling options of ``request`` that this family takes, checked. Options left out take the run's
        own values, and all are passed explicitly, so that a DyDiT and its base DiT (whose recipes may differ)
        sample with the same settings; on the fast path a sampler and step count left out are DPM-Solver++'s 20
        steps, as ``sample --fast`` has them."""
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


def words(caption: str) -> list[str]:
    """A caption's words, lower-cased, split at spaces and punctuation (":", ",", ...)."""
    return re.findall(r"[\w'-]+", caption.lower())


def describe_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items() if k != "step_cache") or "the run's own settings"
