"""difflineage: the lineage of image generators (VAE, VQ-VAE, VQ-VAE-2, DALL-E, DDPM, latent diffusion,
DiT, DyDiT) on one trainer, one checkpoint format and one command."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path, use_ema: bool = True, device: str = "cpu"):
    """Rebuild a trained system from a checkpoint (or a run directory's latest one), ready to sample.

    ``use_ema`` picks the EMA weights (what the papers sample from); False gives the raw weights.
    Nothing pickled is read: weights come from safetensors, the config from YAML.
    """
    from difflineage.train.checkpoint import load_checkpoint, load_state_dict_strict
    from difflineage.train.trainer import build_system

    ckpt = load_checkpoint(path, map_location="cpu", training_state=False)
    system = build_system(ckpt.config)
    weights, name = (ckpt.ema, "ema.safetensors") if use_ema and ckpt.ema is not None else (ckpt.model, "model.safetensors")
    load_state_dict_strict(system, weights, f"{ckpt.path}/{name}")
    system.checkpoint_path = ckpt.path
    return system.to(device).eval()


__all__ = ["load", "__version__"]
