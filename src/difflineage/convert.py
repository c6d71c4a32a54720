"""``difflineage convert``: a DiT from any layout (a difflineage checkpoint, the official files, diffusers) into
any other, including a runnable difflineage checkpoint; DDPM's released diffusers folders to and from runnable
checkpoints; and ``model_kind``, which tells them and Stable Diffusion's files apart. The weight-layout translations
themselves live in ``interop/``; this module sits above the systems, since a runnable checkpoint is a system's."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from difflineage.checkpoint import save_checkpoint
from difflineage.errors import CheckpointError
from difflineage.interop.dit import read_dit_file
from difflineage.models.dit import DiT
from difflineage.systems import DiTSystem, config_from_dict, load
from difflineage.systems.spaces import autoencoder_architecture, autoencoder_weights
from difflineage.weights import load_state_dict_strict


def model_kind(path: Union[str, Path]) -> str:
    """What ``path`` holds, from its layout: ``stable-diffusion`` (a diffusers folder with unet/ and text_encoder/, or
    a single file of ``model.diffusion_model.*``), ``ddpm-diffusers`` (a UNet2DModel folder), ``ddpm-difflineage`` (a
    difflineage ddpm checkpoint), ``stable-diffusion-run`` (a fine-tune's run or checkpoint), else ``dit`` (what the
    DiT readers take, refusing by name what they do not)."""
    import json

    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir() and (path / "text_encoder").is_dir():
            return "stable-diffusion"
        for config in (path / "config.json", path / "unet" / "config.json"):
            if config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DModel":
                return "ddpm-diffusers"
        if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
            try:
                system = load_config_of(path).system
                if system == "ddpm":
                    return "ddpm-difflineage"
                if system == "stable_diffusion":
                    return "stable-diffusion-run"
            except (CheckpointError, ValueError, OSError):
                pass
        return "dit"
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                if any(k.startswith("model.diffusion_model.") for k in fh.keys()):
                    return "stable-diffusion"
        except Exception:  # not readable: the DiT reader names the problem
            return "dit"
    elif path.suffix == ".ckpt":
        return "stable-diffusion"  # the original single file's suffix (read with weights_only; others refused by name)
    return "dit"


def load_config_of(path: Path):
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.systems import load_config

    return load_config(resolve_checkpoint(path) / "config.yaml")


def read_any_dit(path: Union[str, Path], heads: Optional[int] = None) -> tuple[DiT, str]:
    """A DiT from any of the three layouts: a difflineage checkpoint or run directory (its EMA weights), a
    diffusers model folder or weights file, or an official DiT checkpoint. Returns (model, layout name)."""
    path = Path(path)
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        system = load(path)
        if type(system) is not DiTSystem:  # a DyDiT's blocks carry routers no DiT layout has
            raise CheckpointError(f"{path}: a {system.config.system} checkpoint; convert reads DiT checkpoints")
        return system.dit, "difflineage"
    return read_dit_file(path, heads=heads)


def save_as_checkpoint(model: DiT, out: Union[str, Path], vae: Optional[Union[str, Path]] = None,
                       data_source: str = "folder:data", latent_scale: float = 0.18215,
                       vae_norm_groups: int = 32) -> Path:
    """Write a difflineage checkpoint (safetensors + config.yaml) of a DiT system around ``model``, so that
    ``difflineage sample`` / ``evaluate`` / ``info`` work on it. With ``vae`` (a Stable Diffusion VAE file) the
    DiT runs on its latents scaled by ``latent_scale`` (0.18215, as the official DiT); without, in pixel space.
    The sampling defaults are the official sample.py's: 250 DDPM steps, guidance 4 on the first 3 channels."""
    depth, hidden, heads, patch = model.cfg.resolved()
    latent = vae is not None
    channels, factor = model.in_channels, 1
    if latent:
        ae_cfg, channels = autoencoder_architecture(f"sd-vae:{vae}", vae_norm_groups)
        factor = 2 ** (len(ae_cfg.channels) - 1)
        if ae_cfg.latent_channels != model.in_channels:
            raise ValueError(f"the DiT reads {model.in_channels} latent channels but the VAE {vae} makes "
                             f"{ae_cfg.latent_channels}")
    elif channels not in (1, 3):
        raise ValueError(f"this DiT reads {channels}-channel inputs, so it works over a VAE's latents: give the VAE "
                         "file (vae=..., difflineage convert --vae FILE)")
    side = model.grid * patch * factor
    if model.captions:
        raise ValueError("caption-conditioned DiTs are converted through their own difflineage checkpoints")
    config = config_from_dict({
        "system": "dit",
        "data": {"source": data_source, "image_size": side, "channels": channels,
                 "num_classes": model.y_embedder.num_classes},
        "model": {"first_stage": f"sd-vae:{vae}" if latent else "", "condition": "class", "cache_latents": False,
                  "sd_vae_norm_groups": vae_norm_groups,
                  "guidance_channels": 3 if latent else 0,
                  "dit": {"name": model.cfg.name, "depth": depth, "hidden": hidden, "heads": heads, "patch": patch,
                          "mlp_ratio": model.cfg.mlp_ratio, "block": model.cfg.block},
                  "diffusion": {"variance": "learned_range" if model.cfg.learn_sigma else "fixed_small",
                                "sampler": "ddpm", "sample_steps": 250, "guidance": 4.0}},
    })
    config = DiTSystem.resolve_config(config)
    system = DiTSystem(config)
    load_state_dict_strict(system.dit, model.state_dict(), "the converted DiT")
    if latent:
        load_state_dict_strict(system.space.first_stage, autoencoder_weights(config.model.first_stage,
                                                                        config.model.sd_vae_norm_groups), str(vae))
        system.space.latent_scale.fill_(latent_scale)
    state = system.state_dict()
    return save_checkpoint(Path(out), config, state, state, {"step": 0, "converted_from_layout": "dit"})


# ---------------------------------------------------------------------------------------------------------------------
# DDPM's released models (diffusers' UNet2DModel folders)

_VARIANCE = {"fixed_large": "fixed_large", "fixed_small": "fixed_small", "fixed_small_log": "fixed_small"}


def ddpm_as_checkpoint(source: Union[str, Path], out: Union[str, Path], data_source: str = "folder:data") -> Path:
    """A DDPM model in diffusers' layout (``google/ddpm-cifar10-32``'s UNet2DModel and scheduler config) as a runnable
    difflineage ``ddpm`` checkpoint: ``difflineage sample`` draws from it with DDPM-1000 (the paper's, the default),
    DDIM or DPM-Solver++; ``evaluate`` scores it against ``data_source``."""
    from dataclasses import asdict

    from difflineage.interop.ddpm import read_ddpm_folder
    from difflineage.systems import DDPMSystem

    cfg, io, state, scheduler = read_ddpm_folder(source)
    if scheduler.get("beta_schedule") != "linear" or (scheduler.get("beta_start"), scheduler.get("beta_end")) != (1e-4, 0.02):
        raise CheckpointError(f"{source}: betas {scheduler.get('beta_schedule')} {scheduler.get('beta_start')}.."
                              f"{scheduler.get('beta_end')}; difflineage's DDPM runs the paper's linear 1e-4..0.02")
    variance = _VARIANCE.get(scheduler.get("variance_type", "fixed_large"))
    prediction = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(scheduler.get("prediction_type", "epsilon"))
    if variance is None or prediction is None:
        raise CheckpointError(f"{source}: variance_type={scheduler.get('variance_type')!r}, prediction_type="
                              f"{scheduler.get('prediction_type')!r}: not a DDPM difflineage samples")
    if io["in_channels"] != io["out_channels"]:
        raise CheckpointError(f"{source}: {io['in_channels']} input and {io['out_channels']} output channels; a pixel DDPM "
                              "predicts as many as it reads")
    timesteps = int(scheduler.get("num_train_timesteps", 1000))
    config = config_from_dict({
        "system": "ddpm",
        "data": {"source": data_source, "image_size": io["sample_size"], "channels": io["in_channels"]},
        "model": {"unet": asdict(cfg), "condition": "none", "cond_drop": 0.0,
                  "diffusion": {"schedule": "linear", "timesteps": timesteps, "prediction": prediction,
                                "variance": variance, "sampler": "ddpm", "sample_steps": timesteps}},
    })
    system = DDPMSystem(config)
    load_state_dict_strict(system.unet, state, str(source))
    state = system.state_dict()
    return save_checkpoint(Path(out), config, state, state, {"step": 0, "converted_from_layout": "diffusers"})


def checkpoint_as_ddpm_folder(checkpoint: Union[str, Path], out: Union[str, Path]) -> Path:
    """A difflineage pixel ``ddpm`` checkpoint (its EMA weights) as a diffusers ``DDPMPipeline`` folder. Only UNets with
    the released models' blocks have that layout (``unet.attention_block=plain``, ``time_conditioning=add``)."""
    from difflineage.interop.ddpm import write_ddpm_folder

    system = load(Path(checkpoint))
    m, d = system.config.model, system.config.data
    if system.config.system != "ddpm" or m.condition != "none":
        raise CheckpointError(f"{checkpoint}: a {system.config.system} checkpoint with condition {m.condition}; the "
                              "diffusers DDPM layout holds unconditional pixel DDPMs")
    if m.unet.attention_block != "plain" or m.unet.time_conditioning != "add" or m.diffusion.schedule != "linear":
        raise CheckpointError(f"{checkpoint}: its UNet (attention_block={m.unet.attention_block}, time_conditioning="
                              f"{m.unet.time_conditioning}) has no diffusers layout; only DDPM's own blocks (plain, add) "
                              "do")
    scheduler = {"num_train_timesteps": m.diffusion.timesteps, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "variance_type": m.diffusion.variance, "clip_sample": True,
                 "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[m.diffusion.prediction]}
    io = {"in_channels": d.channels, "out_channels": d.channels, "sample_size": d.image_size}
    return write_ddpm_folder(m.unet, io, system.unet.state_dict(), scheduler, out)


def fine_tuned_weights(run: Union[str, Path]):
    """A Stable Diffusion fine-tune (a ``stable_diffusion`` run or checkpoint, its EMA weights) as whole-model weights:
    its pretrained files with the UNet replaced by the fine-tuned one, adapters merged in, ready for the writers."""
    from dataclasses import replace

    from difflineage.interop.stable_diffusion import read_stable_diffusion

    system = load(Path(run))
    m = system.config.model
    base = read_stable_diffusion(m.pretrained, m.version or None, m.prediction or None, m.tokenizer or None)
    return replace(base, unet_state=system.merged_unet_state(), source=str(run))
