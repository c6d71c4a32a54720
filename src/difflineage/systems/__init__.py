"""The systems of the lineage, by name. Each is a ``System`` (see ``systems/base.py``); the registry and what
needs it (configs by name, checkpoints, ``load``) live in ``systems/registry.py``."""

from difflineage.systems.autoencoder import AutoencoderKLSystem
from difflineage.systems.base import System
from difflineage.systems.dalle import DalleSystem
from difflineage.systems.ddpm import DDPMSystem
from difflineage.systems.dit import DiTSystem
from difflineage.systems.dydit import DyDiTSystem
from difflineage.systems.frozen import CodeStage, FirstStage, FrozenPart, GaussianStage, ProvidesFirstStage, reading_stages_once
from difflineage.systems.ldm import LDMSystem
from difflineage.systems.registry import (
    SYSTEMS,
    build_system,
    config_from_dict,
    load,
    load_checkpoint,
    load_config,
    model_config_class,
    system_class,
    system_for,
)
from difflineage.systems.vae import VAESystem
from difflineage.systems.vqvae import VQVAE2System, VQVAESystem

__all__ = ["SYSTEMS", "System", "VAESystem", "DDPMSystem", "AutoencoderKLSystem", "LDMSystem", "DiTSystem",
           "DyDiTSystem", "VQVAESystem", "VQVAE2System", "DalleSystem", "build_system", "config_from_dict", "load",
           "load_checkpoint", "load_config", "model_config_class", "system_class", "system_for", "CodeStage",
           "FirstStage", "FrozenPart", "GaussianStage", "ProvidesFirstStage", "reading_stages_once"]
