"""Stable Diffusion VAE weights: the original LDM / CompVis key layout and the diffusers one.

:class:`~difflineage.models.autoencoder_kl.AutoencoderKL` uses the LDM names, so an SD checkpoint
(``first_stage_model.*`` of a full model, or a standalone VAE such as ``kl-f8`` / ``sd-vae-ft-mse``)
loads after stripping its prefix. The diffusers layout differs in names and in three structural ways:

* the decoder's ``up_blocks`` are numbered in forward order (``up_blocks.0`` is the deepest level),
  while LDM's ``decoder.up.{i}`` is resolution level i, so ``up_blocks.{k} <-> up.{n-1-k}``;
* attention projections are ``Linear`` weights ``[c, c]`` where LDM has 1x1 convs ``[c, c, 1, 1]``;
* older diffusers files name them ``query/key/value/proj_attn`` instead of ``to_q/to_k/to_v/to_out.0``.

Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors.torch import save_file

from difflineage.errors import CheckpointError, ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.weights import load_state_dict_strict, plain_tensors, read_weights

# Top-level names of the VAE's parameters (either layout); everything else in a checkpoint belongs
# to another sub-model (UNet, text encoder, EMA) or to the training loss (LPIPS, discriminator).
_VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
_PREFIXES = ("first_stage_model.", "vae.")

_LDM_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                          # diffusers < 0.14 attention names
                          "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_PROJ = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")

_DIFFUSERS_MARK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_LDM_MARK = re.compile(r"^(encoder|decoder)\.(down|up|mid|norm_out)\.")

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _levels(state: dict, pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _rename(state: dict[str, torch.Tensor], rules: list[Rule], shortcut: tuple[str, str]) -> dict[str, str]:
    """Map each key through the first matching rule, renaming a ResNet block's 1x1 shortcut within it.

    Keys no rule knows are kept as they are, so strict loading names them.
    """
    out = {}
    for key in state:
        new = key
        for pattern, repl in rules:
            new, hits = pattern.subn(repl, new, count=1)
            if hits:
                new = new.replace(*shortcut)
                break
        out[key] = new
    return out


def ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM-layout VAE state dict to diffusers' ``AutoencoderKL`` layout (keys without prefix)."""
    n = _levels(state, r"^decoder\.up\.(\d+)\.")
    rules: list[Rule] = [
        (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."),
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
        (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\."),
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv."),
        (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\."),
         lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}."),
        (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\."),
         lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv."),
        (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\."),
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\."),
         lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTN_TO_DIFFUSERS[m[2]]}."),
        (re.compile(r"^(encoder|decoder)\.norm_out\."), lambda m: f"{m[1]}.conv_norm_out."),
    ]
    names = _rename(state, rules, (".nin_shortcut.", ".conv_shortcut."))
    out = {}
    for key, value in state.items():
        if _ATTN_PROJ.match(key) and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv [c, c, 1, 1] -> Linear [c, c]
        out[names[key]] = value
    return out


def diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout ``AutoencoderKL`` state dict to the LDM layout (keys without prefix)."""
    n = _levels(state, r"^decoder\.up_blocks\.(\d+)\.")
    attn = "|".join(re.escape(k) for k in _DIFFUSERS_ATTN_TO_LDM)
    rules: list[Rule] = [
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."),
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\."),
         lambda m: f"encoder.down.{m[1]}.downsample.conv."),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."),
         lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\."),
         lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\."),
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.({attn})\."),
         lambda m: f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTN_TO_LDM[m[2]]}."),
        (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), lambda m: f"{m[1]}.norm_out."),
    ]
    names = _rename(state, rules, (".conv_shortcut.", ".nin_shortcut."))
    out = {}
    for key, value in state.items():
        new = names[key]
        if _ATTN_PROJ.match(new) and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear [c, c] -> 1x1 conv [c, c, 1, 1]
        out[new] = value
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> Literal["ldm", "diffusers"]:
    """``"diffusers"`` if any key uses diffusers' block names, else ``"ldm"``."""
    return "diffusers" if any(_DIFFUSERS_MARK.match(k) for k in state) else "ldm"


def infer_sd_vae_config(state: dict[str, torch.Tensor], norm_groups: int = 32,
                        source: str = "state dict") -> tuple[AutoencoderKLConfig, int]:
    """Read ``(config, image_channels)`` off the tensor shapes of an LDM-layout VAE state dict.

    GroupNorm's group count leaves no trace in the weights, hence ``norm_groups``.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source} lacks {key}, needed to infer the autoencoder's shape "
                                  "(expected a Stable Diffusion VAE state dict)")
        return state[key]

    levels = _levels(state, r"^encoder\.down\.(\d+)\.block\.")
    blocks = _levels(state, r"^encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not blocks:
        raise CheckpointError(f"{source} has no encoder.down.0.block.* weights (expected a Stable Diffusion VAE)")
    channels = tuple(int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in range(levels))
    latent = int(need("encoder.conv_out.weight").shape[0]) // 2
    image_channels = int(need("encoder.conv_in.weight").shape[1])
    attention = "encoder.mid.attn_1.q.weight" in state or "decoder.mid.attn_1.q.weight" in state
    cfg = AutoencoderKLConfig(channels=channels, layers_per_block=blocks, latent_channels=latent,
                              norm_groups=norm_groups, mid_attention=attention)
    try:
        cfg.check()
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the inferred autoencoder is impossible: {exc}") from exc
    return cfg, image_channels


def _read(path: Path) -> dict:
    return read_weights(path, "VAE weights")


def _vae_weights(state: dict) -> dict[str, torch.Tensor]:
    """Strip a ``first_stage_model.`` / ``vae.`` prefix and drop other sub-models, ``loss.*`` and non-tensors."""
    for prefix in _PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if sub:
            state = sub
            break
    return {k: v for k, v in state.items()
            if isinstance(k, str) and isinstance(v, torch.Tensor) and k.split(".", 1)[0] in _VAE_ROOTS}


def load_sd_vae(path: str | Path, norm_groups: int = 32) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a Stable Diffusion VAE file, in eval mode.

    Reads ``.safetensors`` or a ``.ckpt``/``.pt``/``.bin`` torch file (``weights_only``; a file that
    needs code unpickled is refused), in either key layout, standalone or inside a full SD checkpoint
    (``{"state_dict": {"first_stage_model.*": ...}}``). The architecture is inferred from the shapes;
    loading is strict. Raises :class:`~difflineage.train.checkpoint.CheckpointError` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected a Stable Diffusion VAE checkpoint "
                              "(.safetensors, .ckpt, .pt or .bin)")
    raw = _read(path)
    if isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    return sd_vae_from_state(raw, str(path), norm_groups)


def sd_vae_from_state(raw: dict, source: str, norm_groups: int = 32) -> AutoencoderKL:
    """:func:`load_sd_vae` on weights already read (a full model's ``first_stage_model.*`` among them)."""
    state = _vae_weights(raw)
    if not state:
        shown = ", ".join(sorted(str(k) for k in raw)[:5]) or "nothing"
        raise CheckpointError(f"{source}: holds no VAE weights (expected encoder.*, decoder.*, quant_conv.*, "
                              f"post_quant_conv.*, optionally under first_stage_model. or vae.; found {shown})")
    if detect_layout(state) == "diffusers":
        state = diffusers_to_ldm(state)
    cfg, image_channels = infer_sd_vae_config(state, norm_groups, source=source)
    model = AutoencoderKL(cfg, image_channels)
    load_state_dict_strict(model, state, source)
    return model.eval()


def save_sd_vae(model: AutoencoderKL, path: str | Path, layout: Literal["ldm", "diffusers"] = "ldm") -> Path:
    """Write ``model``'s weights to a safetensors file in the LDM or the diffusers key layout."""
    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout={layout!r}; choose 'ldm' or 'diffusers'")
    state = model.state_dict()
    if layout == "diffusers":
        state = ldm_to_diffusers(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(plain_tensors(state), str(path),
              metadata={"format": "pt", "layout": layout})
    return path
