"""A whole Stable Diffusion 1.x/2.x model, read from and written to its two published layouts. Nothing is downloaded
and nothing unpickled: safetensors, or ``torch.load(weights_only=True)`` for ``.ckpt``/``.bin`` files.

* **the diffusers folder**: ``unet/``, ``text_encoder/``, ``vae/`` (each safetensors with its ``config.json``),
  ``tokenizer/`` (``vocab.json``, ``merges.txt``), ``scheduler/scheduler_config.json``, ``model_index.json``;
* **the original single file** (CompVis / Stability): ``model.diffusion_model.*`` (UNet),
  ``cond_stage_model.transformer.*`` (1.x: OpenAI CLIP ViT-L/14 in transformers' layout) or
  ``cond_stage_model.model.*`` (2.x: OpenCLIP ViT-H/14), ``first_stage_model.*`` (the VAE), often with the noise
  schedule's buffers (``betas``, ``alphas_cumprod``, ...) and EMA copies (``model_ema.*``), which are not read.
  A single file holds no tokenizer: its ``tokenizer/`` folder is given apart.

What the weights cannot say is said by the caller or by the release's convention: SD 1.x predicts noise (eps);
SD 2.x's 768-px models predict v and its 512-px base eps, which a single file does not record (``prediction``).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from difflineage.errors import CheckpointError
from difflineage.interop import sd_text, sd_unet
from difflineage.interop.sd_vae import ldm_to_diffusers, sd_vae_from_state
from difflineage.models.autoencoder_kl import AutoencoderKL
from difflineage.models.clip_text import CLIPTextConfig
from difflineage.models.unet import UNetConfig
from difflineage.weights import plain_tensors, read_weights, state_digest

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
_UNET, _TEXT1, _TEXT2, _VAE = "model.diffusion_model.", "cond_stage_model.transformer.", "cond_stage_model.model.", \
    "first_stage_model."


@dataclass
class SDWeights:
    """A Stable Diffusion model as read: each network's config and state dict in our layout, the VAE built, the
    scheduler's settings (diffusers' names), the tokenizer's folder (None when not known) and where it came from."""

    version: str  # "1.x" or "2.x"
    unet: UNetConfig
    unet_io: dict[str, Any]  # in_channels, out_channels, sample_size, context_dim
    unet_state: dict[str, torch.Tensor]
    text: CLIPTextConfig
    text_state: dict[str, torch.Tensor]
    vae: AutoencoderKL
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))
    latent_scale: float = 0.18215
    tokenizer: Optional[Path] = None
    source: str = ""

    @functools.cached_property
    def unet_digest(self) -> str:
        """sha256 of the UNet's weights (computed once per read: what a fine-tune records and checks)."""
        return state_digest(self.unet_state)

    @property
    def prediction(self) -> str:
        """eps or v, in our words."""
        return {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.scheduler.get("prediction_type", "epsilon")]


def _version_of(text: CLIPTextConfig) -> str:
    """1.x conditions on OpenAI's CLIP (quick-GELU), 2.x on OpenCLIP's (GELU)."""
    return "1.x" if text.activation == "quick_gelu" else "2.x"


def _check_version(found: str, expected: Optional[str], source: str) -> None:
    if expected and found != expected:
        tower = "OpenAI's CLIP ViT-L/14 text tower" if found == "1.x" else "OpenCLIP ViT-H/14's text tower"
        raise CheckpointError(f"{source}: a Stable Diffusion {found} model (it conditions on {tower}), read as "
                              f"{expected}; drop the version or give {found}")


def _check_widths(text: CLIPTextConfig, io: dict, source: str) -> None:
    if text.width != io["context_dim"]:
        raise CheckpointError(f"{source}: its text encoder is {text.width} wide but its UNet reads "
                              f"{io['context_dim']}-wide text")


def _prediction_type(prediction: Optional[str]) -> Optional[str]:
    if prediction is None:
        return None
    names = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    if prediction not in names:
        raise ValueError(f"prediction={prediction!r}; choose eps or v")
    return names[prediction]


def _one_weights_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return folder / found[0]
    raise CheckpointError(f"{folder}: no weights file of the {what} (looked for {', '.join(names)})")


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the {what} of a diffusers folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_diffusers_folder(folder: Path, version: Optional[str] = None, prediction: Optional[str] = None) -> SDWeights:
    """A diffusers Stable Diffusion folder (``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, ``scheduler/``)."""
    lacking = [d for d in ("unet", "text_encoder", "vae") if not (folder / d).is_dir()]
    if lacking:
        what = "a DDPM model (a UNet2DModel): load it with load_ddpm" if (folder / "config.json").is_file() and \
            json.loads((folder / "config.json").read_text()).get("_class_name") == "UNet2DModel" else \
            "not a Stable Diffusion folder"
        raise CheckpointError(f"{folder}: lacks {', '.join(d + '/' for d in lacking)}; {what}")
    unet_cfg, io = sd_unet.config_from_diffusers(_json(folder / "unet" / "config.json", "UNet"), str(folder / "unet"))
    if io["context_dim"] is None:
        raise CheckpointError(f"{folder / 'unet'}: a UNet without cross-attention, not Stable Diffusion's")
    unet_file = _one_weights_file(folder / "unet", ("diffusion_pytorch_model.safetensors",
                                                     "diffusion_pytorch_model.bin"), "UNet")
    kmap = sd_unet.key_map(unet_cfg, "diffusers", io["sample_size"], cross=True)
    unet_state = sd_unet.to_ours(read_weights(unet_file, "a diffusers UNet"), kmap, str(unet_file))
    text_cfg = sd_text.config_from_transformers(_json(folder / "text_encoder" / "config.json", "text encoder"),
                                                str(folder / "text_encoder"))
    text_file = _one_weights_file(folder / "text_encoder", ("model.safetensors", "pytorch_model.bin"), "text encoder")
    text_state = sd_text.to_ours(read_weights(text_file, "a CLIP text encoder"), text_cfg, "transformers", str(text_file))
    found = _version_of(text_cfg)
    _check_version(found, version, str(folder))
    _check_widths(text_cfg, io, str(folder))
    vae_json = _json(folder / "vae" / "config.json", "VAE")
    vae_file = _one_weights_file(folder / "vae", ("diffusion_pytorch_model.safetensors",
                                                   "diffusion_pytorch_model.bin"), "VAE")
    vae = sd_vae_from_state(read_weights(vae_file, "a diffusers VAE"), str(vae_file),
                            int(vae_json.get("norm_num_groups", 32)))
    scheduler = dict(SD_SCHEDULER)
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler.update({k: v for k, v in _json(folder / "scheduler" / "scheduler_config.json", "scheduler").items()
                          if not k.startswith("_")})
    if prediction is not None:
        scheduler["prediction_type"] = _prediction_type(prediction)
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    return SDWeights(found, unet_cfg, io, unet_state, text_cfg, text_state, vae, scheduler,
                     float(vae_json.get("scaling_factor", 0.18215)), tokenizer, str(folder))


def describe_other(state: dict, source: str) -> str:
    """What a file that is not a Stable Diffusion 1.x/2.x single file looks like, in words."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint (conditioner.embedders.*); difflineage reads Stable Diffusion 1.x and 2.x"
    if any(k.startswith(("x_embedder.", "t_embedder.")) for k in keys) and any(".adaLN_modulation." in k for k in keys):
        return "a DiT checkpoint (x_embedder, adaLN_modulation); read it with `difflineage convert` or load_official_dit"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys) or \
            (any(k.startswith(_VAE) for k in keys) and not any(k.startswith(_UNET) for k in keys)):
        return "a VAE alone (encoder.*, decoder.*); use it as a first stage: model.first_stage=sd-vae:PATH"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "a diffusers UNet's weights file alone; give the whole diffusers folder (unet/, text_encoder/, vae/, ...)"
    if any(k.startswith("text_model.") for k in keys):
        return "a CLIP text encoder alone"
    shown = ", ".join(sorted(keys)[:4]) or "nothing"
    return f"not a Stable Diffusion checkpoint (no model.diffusion_model.* weights; it holds {shown} ...)"


def _written_prediction(path: Path) -> Optional[str]:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {"epsilon": "eps", "v_prediction": "v"}.get((fh.metadata() or {}).get("prediction_type", ""))


def read_single_file(path: Path, version: Optional[str] = None, prediction: Optional[str] = None,
                     tokenizer: Optional[Path] = None) -> SDWeights:
    """An original-layout Stable Diffusion file (``.safetensors``, or ``.ckpt`` readable with ``weights_only``)."""
    raw = read_weights(path, "a Stable Diffusion checkpoint")
    if isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    state = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    unet_raw = {k[len(_UNET):]: v for k, v in state.items() if k.startswith(_UNET)}
    if not unet_raw or any(k.startswith("conditioner.embedders.") for k in state):
        raise CheckpointError(f"{path}: {describe_other(state, str(path))}")
    text1 = {k[len(_TEXT1):]: v for k, v in state.items() if k.startswith(_TEXT1)}
    text2 = {k[len(_TEXT2):]: v for k, v in state.items() if k.startswith(_TEXT2)}
    if not (text1 or text2):
        raise CheckpointError(f"{path}: holds a UNet but no text encoder (cond_stage_model.*); not a whole Stable "
                              "Diffusion 1.x/2.x file")
    found = "2.x" if text2 else "1.x"
    _check_version(found, version, str(path))
    # the heads are not in the weights: SD 1.x has 8 at every level, SD 2.x heads 64 wide
    unet_cfg, io = sd_unet.config_from_original(unet_raw, str(path), heads=8 if found == "1.x" else None,
                                                head_channels=64 if found == "2.x" else None)
    kmap = sd_unet.key_map(unet_cfg, "original", io["sample_size"], cross=True)
    unet_state = sd_unet.to_ours(unet_raw, kmap, f"{path} (model.diffusion_model.*)")
    layout: sd_text.TextLayout = "open_clip" if text2 else "transformers"
    text_raw = sd_text.strip_text_prefix(text2 or text1)
    text_cfg = sd_text.config_from_state(text_raw, layout, str(path))
    text_state = sd_text.to_ours(text_raw, text_cfg, layout, f"{path} (cond_stage_model.*)")
    _check_widths(text_cfg, io, str(path))
    vae = sd_vae_from_state({k: v for k, v in state.items() if k.startswith(_VAE)}, f"{path} (first_stage_model.*)")
    scheduler = dict(SD_SCHEDULER)
    if prediction is None:  # a file difflineage wrote says it
        prediction = _written_prediction(path)
    if found == "2.x" and prediction is None:
        raise CheckpointError(f"{path}: a Stable Diffusion 2.x file does not record what its UNet predicts: the 768-px "
                              "models (v2-0/v2-1 768-v) predict v, the 512-px base models eps; give prediction='v' or "
                              "'eps' (--prediction)")
    if prediction is not None:
        scheduler["prediction_type"] = _prediction_type(prediction)
    if "betas" in state:  # the file's own schedule: check it is SD's
        from difflineage.diffusion.schedules import scaled_linear_betas

        want = torch.from_numpy(scaled_linear_betas(len(state["betas"])))
        if not torch.allclose(state["betas"].double(), want, rtol=1e-4, atol=1e-8):
            raise CheckpointError(f"{path}: its betas are not Stable Diffusion's scaled-linear 0.00085..0.012 schedule")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise CheckpointError(f"{tokenizer}: no tokenizer folder (vocab.json and merges.txt)")
    return SDWeights(found, unet_cfg, io, unet_state, text_cfg, text_state, vae, scheduler, 0.18215,
                     Path(tokenizer) if tokenizer else None, str(path))


def read_stable_diffusion(path: str | Path, version: Optional[str] = None, prediction: Optional[str] = None,
                          tokenizer: Optional[str | Path] = None) -> SDWeights:
    """A Stable Diffusion model from a diffusers folder or an original single file. ``version`` ("1.x"/"2.x"), when
    given, must be what the weights are; ``prediction`` ("eps"/"v") overrides the folder's scheduler and is needed
    for a 2.x single file; ``tokenizer`` is a ``tokenizer/`` folder (a single file holds none; a folder's own is
    used otherwise)."""
    path = Path(path)
    if version is not None and version not in ("1.x", "2.x", "1", "2"):
        raise ValueError(f"version={version!r}; choose 1.x or 2.x")
    version = f"{version[0]}.x" if version else None
    if path.is_dir():
        weights = read_diffusers_folder(path, version, prediction)
        if tokenizer is not None:
            weights = replace(weights, tokenizer=Path(tokenizer))
        return weights
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder; give a diffusers Stable Diffusion folder or an "
                              "original .safetensors/.ckpt file")
    return read_single_file(path, version, prediction, Path(tokenizer) if tokenizer else None)


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _vae_config(vae: AutoencoderKL, scaling: float, sample_size: int) -> dict[str, Any]:
    cfg = vae.cfg
    n = len(cfg.channels)
    return {"_class_name": "AutoencoderKL", "in_channels": vae.image_channels, "out_channels": vae.image_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers_per_block,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
            "sample_size": sample_size, "scaling_factor": scaling, "mid_block_add_attention": cfg.mid_attention}


def write_diffusers_folder(weights: SDWeights, folder: str | Path) -> Path:
    """The model as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads (the tokenizer's
    files copied when known)."""
    folder = Path(folder)
    for sub in ("unet", "text_encoder", "vae", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    io = weights.unet_io
    kmap = sd_unet.key_map(weights.unet, "diffusers", io["sample_size"], cross=True)
    save_file(plain_tensors(sd_unet.from_ours(weights.unet_state, kmap)),
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "unet" / "config.json").write_text(json.dumps(sd_unet.config_to_diffusers(weights.unet, **io), indent=2))
    save_file(plain_tensors(sd_text.from_ours(weights.text_state, weights.text, "transformers")),
              str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(sd_text.config_to_transformers(weights.text),
                                                                     indent=2))
    save_file(plain_tensors(ldm_to_diffusers(weights.vae.state_dict())),
              str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    side = io["sample_size"] * 2 ** (len(weights.vae.cfg.channels) - 1)
    (folder / "vae" / "config.json").write_text(json.dumps(_vae_config(weights.vae, weights.latent_scale, side), indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", **weights.scheduler}, indent=2))
    if weights.tokenizer is not None and Path(weights.tokenizer).resolve() != (folder / "tokenizer").resolve():
        shutil.copytree(weights.tokenizer, folder / "tokenizer", dirs_exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    return folder


def write_single_file(weights: SDWeights, path: str | Path) -> Path:
    """The model as one original-layout ``.safetensors`` file (UNet, text encoder and VAE; no tokenizer)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: difflineage writes single files as .safetensors")
    io = weights.unet_io
    kmap = sd_unet.key_map(weights.unet, "original", io["sample_size"], cross=True)
    out = {_UNET + k: v for k, v in sd_unet.from_ours(weights.unet_state, kmap).items()}
    if weights.version == "2.x":
        out.update({_TEXT2 + k: v for k, v in sd_text.from_ours(weights.text_state, weights.text, "open_clip").items()})
    else:
        out.update({_TEXT1 + k: v for k, v in sd_text.from_ours(weights.text_state, weights.text, "transformers").items()})
    out.update({_VAE + k: v for k, v in weights.vae.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(plain_tensors(out), str(path), metadata={"format": "pt", "written_by": "difflineage",
                                                        "prediction_type": weights.scheduler.get("prediction_type", "")})
    return path


__all__ = ["SDWeights", "describe_other", "read_diffusers_folder", "read_single_file", "read_stable_diffusion",
           "write_diffusers_folder", "write_single_file"]
