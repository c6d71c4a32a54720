"""The systems of the lineage, by name. Each is a ``System`` (see ``systems/base.py``)."""

from difflineage.systems.autoencoder import AutoencoderKLSystem
from difflineage.systems.base import System
from difflineage.systems.dalle import DalleSystem
from difflineage.systems.ddpm import DDPMSystem
from difflineage.systems.dit import DiTSystem
from difflineage.systems.dydit import DyDiTSystem
from difflineage.systems.ldm import LDMSystem
from difflineage.systems.vae import VAESystem
from difflineage.systems.vqvae import VQVAE2System, VQVAESystem

SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (VAESystem, DDPMSystem, AutoencoderKLSystem, LDMSystem, DiTSystem,
                                                    DyDiTSystem, VQVAESystem, VQVAE2System, DalleSystem)}

__all__ = ["SYSTEMS", "System", "VAESystem", "DDPMSystem", "AutoencoderKLSystem", "LDMSystem", "DiTSystem",
           "DyDiTSystem", "VQVAESystem",
           "VQVAE2System", "DalleSystem"]
