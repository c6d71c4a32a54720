"""DDPM's released models in diffusers' layout (``google/ddpm-cifar10-32`` and its kin): a ``UNet2DModel`` folder
(``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin``, with ``scheduler_config.json`` beside or in
``scheduler/``), read into and written from our pixel UNet.

The released CIFAR-10 model (Ho et al. 2020, FID 3.17): channels 128 x (1, 2, 2, 2), two residual blocks per level,
single-head attention at 16x16, dropout 0.1, the timestep embedding added to the features, T = 1000 linear betas
1e-4..0.02, eps prediction, sampled with the posterior variance beta_t ("fixed_large").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from difflineage.errors import CheckpointError
from difflineage.interop import sd_unet
from difflineage.models.unet import UNetConfig
from difflineage.weights import plain_tensors, read_weights

DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "variance_type": "fixed_large", "clip_sample": True, "prediction_type": "epsilon"}


def _folder_parts(path: Path) -> tuple[Path, Path]:
    """(the UNet's folder, the scheduler config's path) of a UNet2DModel folder or a DDPMPipeline folder."""
    unet = path / "unet" if (path / "unet" / "config.json").is_file() else path
    scheduler = path / "scheduler" / "scheduler_config.json"
    return unet, scheduler if scheduler.is_file() else path / "scheduler_config.json"


def read_ddpm_folder(path: str | Path) -> tuple[UNetConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(UNet config, in/out channels and sample size, our state dict, the scheduler's settings) of a DDPM folder."""
    path = Path(path)
    unet_dir, scheduler_path = _folder_parts(path)
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json (or unet/config.json); a DDPM model in diffusers' layout is a "
                              "folder with config.json and diffusion_pytorch_model.safetensors (or .bin)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{config_path}: a {config['_class_name']}; a DDPM model's UNet is a UNet2DModel")
    cfg, io = sd_unet.config_from_diffusers(config, str(config_path))
    weights = next((unet_dir / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                    if (unet_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{unet_dir}: no diffusion_pytorch_model.safetensors or .bin beside its config.json")
    kmap = sd_unet.key_map(cfg, "diffusers", io["sample_size"], cross=False)
    state = sd_unet.to_ours(read_weights(weights, "a DDPM UNet"), kmap, str(weights))
    scheduler = dict(DDPM_SCHEDULER)
    if scheduler_path.is_file():
        scheduler.update({k: v for k, v in json.loads(scheduler_path.read_text()).items() if not k.startswith("_")})
    return cfg, io, state, scheduler


def write_ddpm_folder(cfg: UNetConfig, io: dict[str, Any], state: dict[str, torch.Tensor], scheduler: dict[str, Any],
                      folder: str | Path) -> Path:
    """A ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``) diffusers loads."""
    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    kmap = sd_unet.key_map(cfg, "diffusers", io["sample_size"], cross=False)
    save_file(plain_tensors(sd_unet.from_ours(state, kmap)), str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "unet" / "config.json").write_text(json.dumps(
        sd_unet.config_to_diffusers(cfg, io["in_channels"], io["out_channels"], io["sample_size"], None), indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **scheduler},
                                                                           indent=2))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    return folder
