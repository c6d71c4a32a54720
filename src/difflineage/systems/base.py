"""The interface every system of the lineage implements, so one trainer, one sampler command and
one evaluator serve all of them."""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn as nn

from difflineage.checkpoint import Checkpoint, read_checkpoint
from difflineage.config import Config, from_dict, unknown
from difflineage.data import DIGIT_NAMES, Batch, Dataset, ImageDataset
from difflineage.errors import ConfigError
from difflineage.images import save_grid
from difflineage.nn.quantize import code_usage
from difflineage.systems.frozen import FrozenPart, read_once
from difflineage.systems.options import SampleOptions

Condition = Union[None, int, str, torch.Tensor, list[str]]


# Optional abilities: what some systems can do beyond the contract, declared and checked with isinstance.


@runtime_checkable
class CarriesClip(Protocol):
    """A system that carries a CLIP (DALL-E's, for reranking): ``evaluate`` scores its samples with it."""

    def clip_model(self) -> Optional[nn.Module]:
        """The CLIP, or None where this run has none (a stage without one)."""


@runtime_checkable
class Reranks(Protocol):
    """A system that keeps the best of several candidates per caption by a CLIP score (``sample(rerank=N)``)."""

    def rerank(self, candidates: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(n, R, C, H, W) candidates for n captions -> (n, C, H, W), the best of each."""


@runtime_checkable
class Denoises(Protocol):
    """A system built around one denoising network ``net`` (the diffusion systems): what ``train.compile``
    compiles and what FLOPs are counted on per sampler step."""

    net: nn.Module


@runtime_checkable
class Respaces(Protocol):
    """A system that samples along a chain of timesteps it can respace (the diffusion systems): ``steps``,
    ``sampler`` and the fast path's few-step solvers apply to it."""

    def chain(self, steps: Optional[int], sampler: str = "ddim") -> Any:
        """The chain of ``steps`` timesteps the ``sampler`` visits."""


@runtime_checkable
class CachesSteps(Protocol):
    """A transformer denoiser whose blocks' residuals can be reused between sampler steps (DiT, DyDiT):
    ``calibrate_step_cache`` gives the ``step_cache`` sampling option."""

    def calibrate_step_cache(self, fraction: float, steps: Optional[int] = None, sampler: Optional[str] = None,
                             n: Optional[int] = None, seed: int = 0, check: int = 8, fit: bool = False,
                             **options: Any) -> Any:
        """A step cache reusing ``fraction`` of the block evaluations, calibrated on ``n`` samples, its error
        measured on ``check`` held-back ones (with ``fit``: reusing less until that error is within tolerance)."""


@runtime_checkable
class CompilesBlocks(Protocol):
    """A denoiser whose blocks can be compiled in place for sampling (DiT): True where it did."""

    def compile_blocks(self) -> bool:
        """Compile the blocks for sampling; False where nothing changed (no compiler, or blocks not static)."""


@runtime_checkable
class FineTunes(Protocol):
    """A system fine-tuned from a base run (DyDiT from a DiT): ``base`` is where that run is (``model.base``)."""

    @property
    def base(self) -> str:
        """The base run's directory or file, as the config names it."""


@runtime_checkable
class LatentPlane(Protocol):
    """A system whose latent space can be walked point by point (the VAE; the demo's plane for ``latent_dim`` 2)."""

    latent_dim: int

    def decode_latent(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images in [-1, 1] of the latent points ``z`` (N, latent_dim)."""


@runtime_checkable
class DynamicCompute(Protocol):
    """A system whose denoiser ``net`` spends different arithmetic at different sampler steps (DyDiT): ``info``
    and the benchmarks count its FLOPs per step, sampling once in each of ``compute_modes`` (the dynamic mode,
    then the full network's) through ``sample(..., mode=MODE)``."""

    net: nn.Module
    compute_modes: tuple[str, str]


class System(nn.Module, abc.ABC):
    """Networks + objective + sampling of one system.

    ``forward(batch, step)`` is ``loss(batch, step)``, so DistributedDataParallel can wrap a system as it is.
    Subclasses set ``name`` (the key in ``SYSTEMS``) and ``ModelConfig`` (their model dataclass).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # the family's name in the papers' words (what the demo shows)
    ModelConfig: ClassVar[type]
    SampleOptions: ClassVar[type[SampleOptions]] = SampleOptions  # what ``sample`` takes
    fid_sampling: ClassVar[dict[str, Any]] = {}  # the papers' FID-50K sampling options (empty: the recipe's)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """Fill in what a config leaves to be read from elsewhere (e.g. a first stage's architecture from
        its checkpoint), before the system is built for training. The result is what the checkpoint stores."""
        return config

    @classmethod
    def model_config_for(cls, model: dict) -> type:
        """The model dataclass of a model section as written (``ModelConfig``; a system trained in stages has one
        per stage, picked by ``model.stage``)."""
        return cls.ModelConfig

    @classmethod
    def for_config(cls, config: Config) -> type["System"]:
        """The class that builds this config: a system trained in stages (``model.stage``) has one per stage,
        registered under the system's one name; others are their own class."""
        return cls

    @classmethod
    def upgrade_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole-system state dict written by an earlier version, under today's key names (default: as it is).
        Every reader of a whole system's checkpoint applies it (``registry.load_checkpoint``, ``read_stage``)."""
        return state

    @classmethod
    def from_config(cls, config: Config) -> "System":
        """Build the networks (random weights) from a typed config; data fields must be resolved."""
        return cls(config)

    def forward(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(batch, step)

    @abc.abstractmethod
    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective on one batch: a scalar loss and detached scalar metrics. ``step``: optimizer
        steps done before this batch (for schedules inside a loss); None outside a training run."""

    @abc.abstractmethod
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[SampleOptions] = None, **given: Any) -> torch.Tensor:
        """Draw ``n`` images in [-1, 1], (n, C, H, W). ``condition``: class labels (an int or a
        (n,) tensor), captions, or None (conditional systems then spread over the classes). ``options``: this
        system's ``SampleOptions`` (``given`` keyword options build or override them; see ``sample_options``)."""

    @classmethod
    def sample_options(cls, options: Optional[SampleOptions] = None, **given: Any) -> SampleOptions:
        """This system's declared sampling options from ``options`` and ``given``; others are refused by name."""
        return cls.SampleOptions.of(options, **given)

    # Optional hooks -------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups; a group's ``lr_scale`` multiplies the learning rate
        (e.g. routers that must move faster than the weights they route)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """Called once before training with the training data. A fresh run (``restored`` False) loads what earlier
        stages give (a first stage's weights, a base model) and measures what the data decides (a latent scale, a
        tokenizer); a resumed run has its weights from the checkpoint already (``restored``) and only builds what
        is not saved (caches, preview images), replacing nothing."""

    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None,
                 **options: Any) -> dict[str, float]:
        """System-specific scores on a held-out split (likelihoods, reconstruction error)."""
        return {}

    def pictures(self, dataset: ImageDataset, out_dir: Path, generator: Optional[torch.Generator] = None) -> dict[str, Path]:
        """System-specific pictures (reconstructions, interpolations); returns name -> PNG path."""
        return {}

    def forward_passes(self) -> dict[str, Callable[[], Any]]:
        """Named one-image forward passes whose arithmetic ``difflineage info`` reports (eval.flops).
        The default is the training objective on one blank image; systems name their own networks."""
        d = self.config.data
        image = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        label = torch.zeros(1, dtype=torch.long, device=self.device) if self.num_classes else None
        return {"training objective (one image)": lambda: self.loss({"image": image, "label": label, "caption": None})}

    def frozen_parts(self) -> list[FrozenPart]:
        """The parts this system uses but does not train (a first stage, a CLIP): they stay in eval mode."""
        return []

    def train(self, mode: bool = True) -> "System":
        super().train(mode)
        for part in self.frozen_parts():
            part.module.eval()  # frozen, normalisation and quantiser statistics too
        return self

    # Helpers ---------------------------------------------------------------------------------

    @classmethod
    def stage_checkpoint(cls, path: str, key: str, stage: str) -> Checkpoint:
        """The checkpoint of an earlier stage of this system (``model.KEY=PATH``), refused by name unless it is
        this system's ``stage``."""
        ckpt = read_stage(path, key, (cls,), f"it must be a {cls.name} {stage} checkpoint")
        if getattr(ckpt.config.model, "stage", None) != stage:
            raise ConfigError(f"model.{key}={path} is not a {cls.name} {stage} checkpoint (system "
                              f"{ckpt.config.system}, stage {getattr(ckpt.config.model, 'stage', '?')})")
        return ckpt

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def conditioning(self) -> str:
        """What the networks are conditioned on: "none", "class" (a label) or "caption" (text; a class can still be
        asked for, its caption made from the data's template). Each system declares its own."""
        return "class"

    @property
    def uses_labels(self) -> bool:
        """Whether samples can be asked for by class label: a conditioned system on data with classes."""
        return self.conditioning != "none" and bool(self.config.data.num_classes)

    @property
    def num_classes(self) -> int:
        """Classes a sample can be asked for: 0 for an unconditional system."""
        return (self.config.data.num_classes or 0) if self.uses_labels else 0

    def grid_labels(self, n: int) -> tuple[Optional[torch.Tensor], int]:
        """Labels for a grid of about ``n`` samples with one row per class, and the row length: a whole number
        per class (at least one). With more classes than ``n`` (ImageNet's 1,000), ``n`` classes spread evenly over
        them in a square grid (row length 0), not one image of every class. Unconditional systems: (None, 0) and
        the caller keeps ``n``."""
        if not self.num_classes:
            return None, 0
        if self.num_classes > n:
            return torch.linspace(0, self.num_classes - 1, max(1, n)).round().long(), 0
        per_class = max(1, round(n / self.num_classes))
        return torch.arange(self.num_classes).repeat_interleave(per_class), per_class

    def captions_for(self, labels: torch.Tensor) -> list[str]:
        """The data's caption of each class label (``data.caption_template`` with the class name)."""
        d = self.config.data
        names = d.class_names or DIGIT_NAMES
        return [d.caption(names[i]) for i in labels.tolist()]

    @property
    def captions_from_file(self) -> bool:
        """Whether this run learned its captions from a captions file (``data.captions: file``): it is then sampled
        from captions, not from class names that it never saw as captions."""
        return self.caption_conditioned and self.config.data.captions == "file"

    def refuse_classes(self) -> None:
        """The refusal for a class (or no condition) asked of a run trained on a captions file's captions."""
        raise ValueError(f"this {self.title} run was trained on the captions of its data's captions file, not on class "
                         "names: give a caption (sample --caption TEXT; in Python condition='a caption' or a list "
                         "of captions)")

    @property
    def caption_conditioned(self) -> bool:
        """Whether samples are drawn for captions (their CLIP score is then a metric of ``evaluate``)."""
        return self.conditioning == "caption"

    @property
    def class_names(self) -> list[str]:
        """The name of each class a sample can be asked for (the data's, as captions use them: the digits' names
        where the data names none; the numbers where there are more classes than names)."""
        k = self.num_classes
        names = list(self.config.data.class_names or DIGIT_NAMES)
        return names[:k] if len(names) >= k else [str(i) for i in range(k)]

    def class_index(self, name: str) -> int:
        """The label of a class given by name (any case) or by its number as text; an unknown one is refused with
        the names there are."""
        if not self.num_classes:
            raise ValueError(f"the {self.name} run is not conditioned on classes: {name!r} names none")
        names = self.class_names
        lowered = {n.lower(): i for i, n in enumerate(names)}
        key = name.strip().lower()
        if key in lowered:
            return lowered[key]
        if key.isdigit() and int(key) < len(names):
            return int(key)
        if not self.caption_conditioned and (" " in key or not names):
            raise ValueError(f"this {self.title} run is conditioned on classes, not captions: {name!r} is not one of its "
                             f"classes ({', '.join(names)}); give a class name or number")
        raise ValueError(unknown("class", name, names))

    def labels_for(self, n: int, condition: Condition) -> Optional[torch.Tensor]:
        """Class labels for ``n`` samples: as given (numbers, or a class's name), or cycling through the classes
        (0, 1, ..., K-1, 0, ...), so that a grid K images wide shows one class per column)."""
        if isinstance(condition, str):
            condition = self.class_index(condition)
        if condition is None:
            if not self.num_classes:
                return None
            return (torch.arange(n) % self.num_classes).to(self.device)
        if isinstance(condition, int):
            condition = torch.full((n,), condition, dtype=torch.long)
        if isinstance(condition, list):
            raise ValueError(f"the {self.name} system is conditioned on class labels, not captions")
        labels = torch.as_tensor(condition, dtype=torch.long).to(self.device)
        if labels.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(labels.shape)}")
        if self.num_classes and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
        return labels


def batches(dataset: ImageDataset, device: torch.device, size: int = 250) -> Iterator[Batch]:
    """``dataset`` in consecutive batches of ``size``, on ``device`` (for held-out scores)."""
    for s in range(0, len(dataset), size):
        yield dataset.batch(range(s, min(s + size, len(dataset))), device)


def spread_images(dataset: Dataset, device: torch.device, n: int = 32) -> torch.Tensor:
    """``n`` images spread evenly over ``dataset`` (its files are sorted by class, so every class shows); none
    from a latent store, which holds no images."""
    if not dataset.holds_images:
        return torch.empty(0, device=device)
    return dataset.batch(torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long(), device)["image"]


@torch.no_grad()
def reconstruction_scores(dataset: ImageDataset, device: torch.device, encode: Callable[[torch.Tensor], Any],
                          decode: Callable[[Any], torch.Tensor], codebook: int = 0,
                          levels: tuple[str, ...] = ()) -> dict[str, float]:
    """Held-out reconstruction error of ``decode(encode(x))`` (images in [-1, 1], decoded ones clamped there): L1,
    MSE and PSNR on [0, 1] pixels (PSNR = 10 log10(1 / MSE)). With a ``codebook`` of that many codes, ``encode``
    gives code maps (a tuple of maps, one per name in ``levels``) and each level's usage over the set is added:
    perplexity and codes used (``codebook_perplexity``, ``codes_used``; suffixed ``_LEVEL`` for several)."""
    l1 = mse = 0.0
    counts = [torch.zeros(codebook) for _ in (levels or ("",))] if codebook else []
    for batch in batches(dataset, device):
        x = batch["image"]
        codes = encode(x)
        error = decode(codes).float().clamp(-1, 1) - x
        l1 += error.abs().mean((1, 2, 3)).sum().item() / 2  # [-1, 1] -> [0, 1] units
        mse += (error / 2).pow(2).mean((1, 2, 3)).sum().item()
        for count, c in zip(counts, codes if isinstance(codes, tuple) else (codes,)):
            count += torch.bincount(c.flatten().cpu(), minlength=codebook).float()
    n = len(dataset)
    out: dict[str, float] = {"recon_l1": l1 / n, "recon_mse": mse / n, "recon_psnr_db": 10 * math.log10(1.0 / (mse / n))}
    for count, level in zip(counts, levels or ("",)):
        suffix = f"_{level}" if level else ""
        out[f"codebook_perplexity{suffix}"], out[f"codes_used{suffix}"] = code_usage(count)
    return out


def save_reconstructions(x: torch.Tensor, recon: torch.Tensor, out_dir: Path) -> Path:
    """Images beside their reconstructions, pairs in rows of 16, as ``out_dir/reconstructions.png``."""
    pairs = torch.stack([x.cpu(), recon.cpu()], 1).flatten(0, 1)
    return save_grid(pairs, Path(out_dir) / "reconstructions.png", nrow=16, scale=2)


class _OtherSystem(Exception):
    def __init__(self, name: object):
        self.name = name


def read_stage(path: Union[str, Path], key: str, systems: tuple[type[System], ...], expected: str) -> Checkpoint:
    """The checkpoint at ``path`` (given as ``model.KEY``), which must be one of ``systems``' (its config parsed and
    its weights upgraded by that system); another system's checkpoint is refused with ``model.KEY=PATH is a NAME
    checkpoint; EXPECTED``. For a first stage, a DyDiT's base, an earlier stage of the same system."""
    classes = {cls.name: cls for cls in systems}

    def parse(raw):
        name = raw.get("system") if isinstance(raw, dict) else None
        if name not in classes:
            raise _OtherSystem(name)
        return from_dict(raw, lambda n, model: classes[n].model_config_for(model))

    def read() -> Checkpoint:
        try:
            ckpt = read_checkpoint(path, parse, training_state=False)
        except _OtherSystem as exc:
            raise ConfigError(f"model.{key}={path} is a {exc.name} checkpoint; {expected}") from None
        return upgraded(ckpt, classes[ckpt.config.system])
    return read_once(("stage", str(Path(path).resolve()), tuple(classes)), read)


def upgraded(ckpt: Checkpoint, cls: type[System]) -> Checkpoint:
    """``ckpt`` with its weights under the key names of today's ``cls``."""
    ckpt.model = cls.upgrade_state_dict(ckpt.model)
    if ckpt.ema is not None:
        ckpt.ema = cls.upgrade_state_dict(ckpt.ema)
    return ckpt


class Reconstructs:
    """Mixed into a stage with no prior of its own (an autoencoder, a dVAE): ``prepare`` keeps ``preview`` training
    images, whose reconstructions are its samples (so training grids show the stage improving), and its pictures are
    held-out images beside their reconstructions. The stage gives ``reconstruct(x)`` and ``no_prior``, the message
    for a sample asked of it before any training images were seen."""

    no_prior: ClassVar[str]

    def preview_reconstructions(self, n: int) -> torch.Tensor:
        if len(self.preview) == 0:
            raise ValueError(self.no_prior)
        return self.reconstruct(self.preview[torch.arange(n) % len(self.preview)])

    def pictures(self, dataset: ImageDataset, out_dir: Path, generator: Optional[torch.Generator] = None) -> dict[str, Path]:
        x = spread_images(dataset, self.device)
        return {"reconstructions": save_reconstructions(x, self.reconstruct(x), out_dir)}
