"""The systems of the lineage by name, and what needs the name: configs, checkpoints, built systems.

``config.py`` knows no systems; a system declares its model dataclass (``System.ModelConfig``) and this module,
which owns the registry, resolves a system's name to it. Everything that reads a run's config from a file
(a recipe, a checkpoint's config.yaml) comes through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from difflineage.checkpoint import Checkpoint, read_checkpoint, resolve_checkpoint
from difflineage.config import Config, from_dict, read_config, unknown
from difflineage.errors import ConfigError
from difflineage.systems.autoencoder import AutoencoderKLSystem
from difflineage.systems.base import System, upgraded
from difflineage.systems.dalle import DalleSystem
from difflineage.systems.ddpm import DDPMSystem
from difflineage.systems.dit import DiTSystem
from difflineage.systems.dydit import DyDiTSystem
from difflineage.systems.ldm import LDMSystem
from difflineage.systems.stable_diffusion import StableDiffusionSystem
from difflineage.systems.vae import VAESystem
from difflineage.systems.vqvae import VQVAE2System, VQVAESystem
from difflineage.weights import load_state_dict_strict

SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (VAESystem, DDPMSystem, AutoencoderKLSystem, LDMSystem,
                                                              DiTSystem, DyDiTSystem, VQVAESystem, VQVAE2System,
                                                              DalleSystem, StableDiffusionSystem)}


def system_class(name: str) -> type[System]:
    """The class of the system named ``name``; an unknown name is refused with the valid ones."""
    if name not in SYSTEMS:
        raise ConfigError(unknown("system", name, sorted(SYSTEMS)))
    return SYSTEMS[name]


def model_config_class(name: str, model: Optional[dict] = None) -> type:
    """The model dataclass of a system (``vae`` -> ``VAEConfig``), given its model section as written (a system
    trained in stages has one per ``model.stage``)."""
    return system_class(name).model_config_for(model or {})


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> Config:
    """A checked :class:`Config` from a plain dict (a parsed YAML file) and dotted overrides."""
    return from_dict(raw, model_config_class, overrides)


def load_config(path_or_name: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Read a config from a YAML file, or by recipe name from ``configs/`` (``vae-mnist``)."""
    return read_config(path_or_name, model_config_class, overrides)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu", training_state: bool = True,
                    verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (or a run directory's latest checkpoint), its config parsed by the registry."""
    ckpt = read_checkpoint(path, config_from_dict, map_location=map_location, training_state=training_state,
                           verify=verify)
    return upgraded(ckpt, system_class(ckpt.config.system))


def system_for(config: Config) -> type[System]:
    """The class that builds ``config``: its system's, or that of its stage (``System.for_config``)."""
    return system_class(config.system).for_config(config)


def build_system(config: Config) -> System:
    """The system a config describes, with fresh weights."""
    return system_for(config).from_config(config)


def load(path: Union[str, Path], use_ema: bool = True, device: str = "cpu") -> System:
    """Rebuild a trained system from a checkpoint (or a run directory's latest one), ready to sample.

    ``use_ema`` picks the EMA weights (what the papers sample from); False gives the raw weights.
    Nothing pickled is read: weights come from safetensors, the config from YAML. (Which checkpoint a run
    directory resolves to: :func:`difflineage.checkpoint.resolve_checkpoint`.)
    """
    ckpt = load_checkpoint(path, map_location="cpu", training_state=False)
    system = build_system(ckpt.config)
    weights, name = (ckpt.ema, "ema.safetensors") if use_ema and ckpt.ema is not None else (ckpt.model, "model.safetensors")
    load_state_dict_strict(system, weights, f"{ckpt.path}/{name}")
    return system.to(device).eval()


__all__ = ["SYSTEMS", "build_system", "system_for", "config_from_dict", "load", "load_checkpoint", "load_config",
           "model_config_class", "resolve_checkpoint", "system_class"]
