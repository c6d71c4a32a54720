"""Recipes run as their users run them: a system's stages in order (the quickstart: a first stage trained before the
model that reads it), and a recipe fitted to the user's own data.

A recipe describes its own data (mnist5k: 28 or 32 px, one channel, ten classes). Trained on another folder it must
be *fitted*: the size, channels and classes read from the data; the condition chosen from what the data holds
(captions from a captions file, else classes from class folders, else none); every setting that depends on the image
side scaled with it (the UNet's attention levels, which are feature-map sides) and the size moved, if need be, to
the nearest one the networks can take (a UNet's levels and a DiT's patches divide it); the batch no larger than the
data. Each change is said in one line (``Fitted.notes``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from difflineage.checkpoint import latest_checkpoint
from difflineage.config import Config
from difflineage.data import load_dataset
from difflineage.data.sources import own_captions
from difflineage.errors import ConfigError
from difflineage.systems import build_system, load_config, reading_stages_once, system_for
from difflineage.train.rundir import holds_run
from difflineage.train.trainer import Trainer, TrainResult, resolve_data

# Each system's quickstart: its stages in order, as (recipe, run sub-directory or "" for the run itself,
# overrides of that stage). An override may name an earlier stage's checkpoint as {SUB-DIRECTORY}.
# The first entry is the default system (the flagship).
QUICKSTART_RECIPES = {
    "dit": [("autoencoder-mnist", "autoencoder", ["train.steps=800"]),
            ("dit-mnist", "", ["model.first_stage={autoencoder}"])],
    "vae": [("vae-mnist", "", [])],
    "ddpm": [("ddpm-mnist", "", [])],
    "ldm": [("autoencoder-mnist", "autoencoder", []), ("ldm-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae": [("vqvae-mnist", "autoencoder", []), ("vqvae-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae2": [("vqvae2-mnist", "autoencoder", []), ("vqvae2-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "dalle": [("dalle-dvae-mnist", "dvae", []), ("dalle-clip-mnist", "clip", []),
              ("dalle-mnist", "", ["model.first_stage={dvae}", "model.clip_stage={clip}"])],
    # text-to-image on OpenMoji as Stable Diffusion is made: a CLIP (its text tower then frozen), an autoencoder, a
    # caption-conditioned latent DiT over its latents
    "text-to-image": [("dalle-clip-openmoji", "clip", []), ("autoencoder-openmoji", "autoencoder", []),
                      ("dit-openmoji", "", ["model.first_stage={autoencoder}", "model.text_encoder={clip}"])],
}
DEFAULT_SYSTEM = next(iter(QUICKSTART_RECIPES))


@dataclass
class Fitted:
    """A recipe fitted to a data set: the config, and one line per change the fitting made."""

    config: Config
    notes: list[str]


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _candidate_sizes(side: int) -> list[int]:
    """The data's side, then the nearest sides that more downsampling divides (larger first at equal distance)."""
    sizes = {side}
    for m in (2, 4, 8, 16, 32):
        sizes |= {-(-side // m) * m, max(m, side // m * m)}
    return sorted(sizes, key=lambda s: (abs(s - side), -s))[:8]


def _scaled_attention(model, side: int, recipe_side: int):
    """The model section with its UNet's attention levels (feature-map sides) scaled from ``recipe_side`` to ``side``."""
    unet = getattr(model, "unet", None)
    if unet is None or not unet.attention_resolutions or side == recipe_side:
        return model
    scaled = tuple(sorted({max(1, round(r * side / recipe_side)) for r in unet.attention_resolutions}, reverse=True))
    return replace(model, unet=replace(unet, attention_resolutions=scaled))


def fit_recipe(recipe: str | Path, source: str, overrides: Sequence[str] = (),
               image_size: Optional[int] = None) -> Fitted:
    """``recipe`` (a name from configs/ or a YAML file) with ``overrides``, fitted to the data of ``source`` (see the
    module's docstring). What the overrides set is kept as given. ``image_size``: a size already chosen (an earlier
    stage's), tried first. The first stage named by the overrides must exist (it is read to check the fit)."""
    overrides = list(overrides)
    as_written = load_config(recipe, overrides)
    config = load_config(recipe, [*overrides, f"data.source={source}"])
    notes = []
    dataset = load_dataset(config.data, "train", seed=config.train.seed)
    channels, side = dataset.shape[0], dataset.shape[-1]
    classes = dataset.num_classes
    described = f"{len(dataset)} training images, {channels}-channel, {side} px"
    described += f", {classes} classes" if classes else ", no classes"
    model = config.model
    if dataclasses.is_dataclass(model) and hasattr(model, "condition") and not _given(overrides, "model.condition"):
        condition = "caption" if own_captions(source) else "class" if classes else "none"
        if condition != model.condition:
            model = replace(model, condition=condition)  # __post_init__: a text encoder for captions, none otherwise
            why = {"caption": "the folder has a captions file", "class": "the folder has class subfolders",
                   "none": "the folder has neither class subfolders nor captions"}[condition]
            notes.append(f"model.condition={condition} ({why})")
    config = replace(config, model=model)
    notes.insert(0, f"data: {source}: {described}")

    recipe_side = as_written.data.image_size or side
    sizes = ([config.data.image_size] if _given(overrides, "data.image_size") else
             ([image_size] if image_size else []) + _candidate_sizes(side))
    failures = []
    for size in dict.fromkeys(sizes):
        trial = replace(config, data=replace(config.data, image_size=size),
                        model=config.model if _given(overrides, "model.unet.attention_resolutions")
                        else _scaled_attention(config.model, size, recipe_side))
        trial = resolve_data(trial, _Shaped(dataset, size))  # the data's channels and classes, written down
        try:
            with reading_stages_once():
                build_system(system_for(trial).resolve_config(trial))
        except ConfigError as exc:
            failures.append(f"{size} px: {exc}")
            continue
        if size != side:
            notes.append(f"data.image_size={size} (the images' {side} px do not fit the networks; each image is "
                         f"{'padded' if size > side and trial.data.resize == 'pad' else 'resized'} to it)")
        else:
            notes.append(f"data.image_size={size}")
        before = getattr(getattr(as_written.model, "unet", None), "attention_resolutions", None)
        after = getattr(getattr(trial.model, "unet", None), "attention_resolutions", None)
        if before is not None and tuple(before) != tuple(after):
            notes.append(f"model.unet.attention_resolutions={list(after)} (the recipe's {list(before)} at "
                         f"{recipe_side} px, scaled to {size} px)")
        config = trial
        break
    else:
        raise ConfigError(f"{recipe} cannot be fitted to {source} ({described}): " + "; ".join(failures[:3]))
    batch = config.train.batch_size
    if len(dataset) < batch and not _given(overrides, "train.batch_size"):
        fitted = 1 << (len(dataset).bit_length() - 1)
        config = replace(config, train=replace(config.train, batch_size=fitted))
        notes.append(f"train.batch_size={fitted} (the recipe's {batch} is more than the {len(dataset)} training images)")
    return Fitted(config, notes)


class _Shaped:
    """A data set seen at another image side (what ``resolve_data`` reads of it: shape, classes, names)."""

    def __init__(self, dataset, side: int):
        self.dataset, self.side = dataset, side

    @property
    def shape(self):
        return (self.dataset.shape[0], self.side, self.side)

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def train_stages(system: str, out: Path, data: Optional[str] = None, overrides: Sequence[str] = (),
                 progress: bool = True, resume_command: Optional[str] = None,
                 say: Callable[[str], None] = print) -> TrainResult:
    """Train ``system``'s quickstart stages in order into ``out`` (earlier stages in its sub-directories), each
    resumed where a checkpoint of it exists; with ``data`` (a source such as ``folder:PATH``), each stage's recipe
    fitted to it (``fit_recipe``) and every change said. ``overrides``: ``KEY=VALUE`` for the final stage,
    ``RECIPE:KEY=VALUE`` for that stage, ``*:KEY=VALUE`` for every stage. Returns the final stage's result."""
    if system not in QUICKSTART_RECIPES:
        raise ConfigError(f"unknown system {system!r}; choose one of {', '.join(QUICKSTART_RECIPES)}")
    stages = QUICKSTART_RECIPES[system]
    known = {recipe for recipe, _, _ in stages} | {"*"}
    for o in overrides:
        if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] not in known:
            raise ConfigError(f"--set {o}: {o.split(':', 1)[0]!r} is not a stage of the {system} quickstart "
                              f"({', '.join(sorted(known - {'*'}))}, or * for every stage)")
    earlier: dict[str, str] = {}  # sub-directory -> checkpoint of the stages trained so far
    size = None
    result = None
    for recipe, sub, stage_overrides in stages:
        mine = [o.split(":", 1)[1] for o in overrides if o.startswith((recipe + ":", "*:"))]
        plain = [o for o in overrides if ":" not in o.split("=", 1)[0]]
        given = [o.format(**earlier) for o in stage_overrides] + (plain if not sub else []) + mine
        stage_dir = out / sub if sub else out
        resume = latest_checkpoint(stage_dir) is not None
        if data is not None and not resume:
            fitted = fit_recipe(recipe, data, given, image_size=size)
            for line in fitted.notes:
                say(f"  fitted {recipe}: {line}")
            config = fitted.config
        elif data is not None:  # a resumed stage goes on with the config its run was fitted to
            config = None
        else:
            config = load_config(recipe, given)
        if resume:
            say(f"resuming the {system} run in {stage_dir}")
        say(f"training {recipe} into {stage_dir}")
        # a stage that stopped before its first checkpoint has nothing to resume: it starts again
        result = Trainer(config, stage_dir, resume=resume or None, progress=progress,
                         overwrite=not resume and holds_run(stage_dir), resume_command=resume_command).fit()
        if result.status != "finished":
            return result
        earlier[sub] = str(result.checkpoint)
        size = _trained_size(result.checkpoint)
    return result


def _trained_size(checkpoint: Path) -> Optional[int]:
    from difflineage.systems import load_checkpoint

    return load_checkpoint(checkpoint, training_state=False, verify=False).config.data.image_size


__all__ = ["DEFAULT_SYSTEM", "Fitted", "QUICKSTART_RECIPES", "fit_recipe", "train_stages"]
