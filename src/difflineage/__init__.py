"""difflineage: the lineage of image generators (VAE, VQ-VAE, VQ-VAE-2, DALL-E, DDPM, latent diffusion,
DiT, DyDiT) on one trainer, one checkpoint format and one command.

``difflineage.load(path)`` rebuilds a trained system from a checkpoint; ``difflineage.load_config(name)`` reads a
recipe. The layers, and which may import which: docs/architecture.md.
"""

from __future__ import annotations

from difflineage.systems.registry import load, load_config

__version__ = "0.1.0"

__all__ = ["load", "load_config", "__version__"]
