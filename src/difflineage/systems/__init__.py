"""The systems of the lineage, by name. Each is a ``System`` (see ``systems/base.py``)."""

from difflineage.systems.base import System
from difflineage.systems.vae import VAESystem

SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (VAESystem,)}

__all__ = ["SYSTEMS", "System", "VAESystem"]
