"""The UNets of Stable Diffusion 1.x/2.x and of DDPM's released models, in their two published layouts, to and from
:class:`~difflineage.models.unet.UNet`.

* **diffusers** (``unet/diffusion_pytorch_model.safetensors`` with its ``config.json``): ``UNet2DConditionModel``
  (Stable Diffusion) and ``UNet2DModel`` (``google/ddpm-cifar10-32`` and the other DDPM ports).
* **original** (the CompVis / Stability single file, ``model.diffusion_model.*``): ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``time_embed``, ``out``.

Our UNet numbers its blocks as the original does (``down.{i}`` is ``input_blocks.{i + 1}``, ``up.{i}`` is
``output_blocks.{i}``), keeps q, k and v of a self-attention stacked in one ``qkv`` projection and k and v of a
cross-attention in one ``kv``; the maps below stack and split them. Every map is built from the model's config,
one entry per parameter, so a file that does not fit is named key by key by strict loading.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch

from difflineage.errors import CheckpointError
from difflineage.models.unet import UNetConfig

Layout = Literal["diffusers", "original"]

# one entry per parameter of ours: (our key, the other layout's keys, stacked along dim 0 in this order)
KeyMap = list[tuple[str, tuple[str, ...]]]

_RES = {"diffusers": {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                      "skip": "conv_shortcut"},
        "original": {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb": "emb_layers.1", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "skip": "skip_connection"}}


def _wb(ours: str, theirs: str, bias: bool = True) -> KeyMap:
    pairs = [(f"{ours}.weight", (f"{theirs}.weight",))]
    return pairs + [(f"{ours}.bias", (f"{theirs}.bias",))] if bias else pairs


def _res_map(ours: str, theirs: str, layout: Layout, skip: bool) -> KeyMap:
    names = _RES[layout]
    out: KeyMap = []
    for mine in ("norm1", "conv1", "emb", "norm2", "conv2") + (("skip",) if skip else ()):
        out += _wb(f"{ours}.{mine}", f"{theirs}.{names[mine]}")
    return out


def _attention_map(ours: str, theirs: str, cross: bool, bias: bool) -> KeyMap:
    """Our Attention (``qkv`` or ``q`` + ``kv``, ``proj``) against ``to_q``, ``to_k``, ``to_v``, ``to_out.0``."""
    t = theirs
    groups = [("q", (f"{t}.to_q",)), ("kv", (f"{t}.to_k", f"{t}.to_v"))] if cross else \
        [("qkv", (f"{t}.to_q", f"{t}.to_k", f"{t}.to_v"))]
    out: KeyMap = []
    for mine, sources in groups:
        out.append((f"{ours}.{mine}.weight", tuple(f"{s}.weight" for s in sources)))
        if bias:
            out.append((f"{ours}.{mine}.bias", tuple(f"{s}.bias" for s in sources)))
    return out + _wb(f"{ours}.proj", f"{t}.to_out.0")


def _transformer_map(ours: str, theirs: str, cfg: UNetConfig, cross: bool) -> KeyMap:
    out = _wb(f"{ours}.norm", f"{theirs}.norm") + _wb(f"{ours}.proj_in", f"{theirs}.proj_in")
    for d in range(cfg.transformer_depth):
        o, t = f"{ours}.blocks.{d}", f"{theirs}.transformer_blocks.{d}"
        for n in ("norm1", "norm2", "norm3"):
            out += _wb(f"{o}.{n}", f"{t}.{n}")
        out += _attention_map(f"{o}.attn1", f"{t}.attn1", cross=False, bias=False)
        out += _attention_map(f"{o}.attn2", f"{t}.attn2", cross=cross, bias=False)
        out += _wb(f"{o}.ff.proj", f"{t}.ff.net.0.proj") + _wb(f"{o}.ff.out", f"{t}.ff.net.2")
    return out + _wb(f"{ours}.proj_out", f"{theirs}.proj_out")


def _plain_attention_map(ours: str, theirs: str) -> KeyMap:
    return _wb(f"{ours}.norm", f"{theirs}.group_norm") + _attention_map(f"{ours}.attn", theirs, cross=False, bias=True)


def key_map(cfg: UNetConfig, layout: Layout, image_size: int, cross: bool) -> KeyMap:
    """Every parameter of ``UNet(cfg, ..., image_size)`` against its name(s) in ``layout``. ``cross``: the
    attention blocks have a cross-attention (a caption-conditioned UNet)."""
    if cfg.attention_block == "difflineage":
        raise CheckpointError("unet.attention_block=difflineage is this project's own block; the diffusers and original "
                              "layouts hold the transformer (Stable Diffusion) or plain (DDPM) blocks")
    if cfg.pooled_text and cross:
        raise CheckpointError("unet.pooled_text=true has no place in the Stable Diffusion layouts; set it false")
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    ch = cfg.channels
    widths = [ch * m for m in cfg.channel_mult]
    diffusers = layout == "diffusers"

    def attention(ours: str, theirs: str) -> KeyMap:
        if cfg.attention_block == "transformer":
            return _transformer_map(ours, theirs, cfg, cross)
        return _plain_attention_map(ours, theirs)

    if diffusers:
        out = _wb("t_embedder.mlp.0", "time_embedding.linear_1") + _wb("t_embedder.mlp.2", "time_embedding.linear_2")
        out += _wb("conv_in", "conv_in")
    else:
        out = _wb("t_embedder.mlp.0", "time_embed.0") + _wb("t_embedder.mlp.2", "time_embed.2")
        out += _wb("conv_in", "input_blocks.0.0")
    side, width = image_size, ch
    for level in range(levels):
        attn = side in cfg.attention_resolutions
        for j in range(nrb):
            idx = level * (nrb + 1) + j
            theirs = f"down_blocks.{level}" if diffusers else f"input_blocks.{idx + 1}"
            out += _res_map(f"down.{idx}.0", f"{theirs}.resnets.{j}" if diffusers else f"{theirs}.0", layout,
                            skip=width != widths[level])
            width = widths[level]
            if attn:
                out += attention(f"down.{idx}.1", f"{theirs}.attentions.{j}" if diffusers else f"{theirs}.1")
        if level < levels - 1:
            idx = level * (nrb + 1) + nrb
            conv = 1 if cfg.downsample_padding == 0 else 0
            out += _wb(f"down.{idx}.{conv}", f"down_blocks.{level}.downsamplers.0.conv" if diffusers
                       else f"input_blocks.{idx + 1}.0.op")
            side //= 2
    mid = "mid_block" if diffusers else "middle_block"
    out += _res_map("mid.0", f"{mid}.resnets.0" if diffusers else f"{mid}.0", layout, skip=False)
    out += attention("mid.1", f"{mid}.attentions.0" if diffusers else f"{mid}.1")
    out += _res_map("mid.2", f"{mid}.resnets.1" if diffusers else f"{mid}.2", layout, skip=False)
    skips = [ch] + [w for level, w in enumerate(widths) for _ in range(nrb + (level < levels - 1))]
    for k, level in enumerate(reversed(range(levels))):
        attn = side in cfg.attention_resolutions
        for j in range(nrb + 1):
            idx = k * (nrb + 1) + j
            theirs = f"up_blocks.{k}" if diffusers else f"output_blocks.{idx}"
            cin = width + skips.pop()
            out += _res_map(f"up.{idx}.0", f"{theirs}.resnets.{j}" if diffusers else f"{theirs}.0", layout,
                            skip=cin != widths[level])
            width = widths[level]
            if attn:
                out += attention(f"up.{idx}.1", f"{theirs}.attentions.{j}" if diffusers else f"{theirs}.1")
            if level > 0 and j == nrb:
                at = 1 + attn
                out += _wb(f"up.{idx}.{at + 1}", f"up_blocks.{k}.upsamplers.0.conv" if diffusers
                           else f"output_blocks.{idx}.{at}.conv")
        if level > 0:
            side *= 2
    out += _wb("norm_out", "conv_norm_out" if diffusers else "out.0")
    out += _wb("conv_out", "conv_out" if diffusers else "out.2")
    return out


# diffusers < 0.14 named a plain attention block's projections query/key/value/proj_attn (DDPM's hub files do)
_OLD_ATTENTION = re.compile(r"\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_OLD_ATTENTION.sub(lambda m: f".{_OLD_NAMES[m[1]]}.{m[2]}", k): v for k, v in state.items()}


def to_ours(state: dict[str, torch.Tensor], kmap: KeyMap, source: str) -> dict[str, torch.Tensor]:
    """Their state dict (prefix stripped) -> ours, stacking q/k/v. A key the map does not know, or one it lacks, is
    named, so a file of another model is refused before any loading."""
    state = _modern_names(state)
    wanted = {k for _, theirs in kmap for k in theirs}
    missing = sorted(wanted - set(state))
    extra = sorted(set(state) - wanted)
    if missing or extra:
        parts = [f"{label} ({len(keys)}): " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
                 for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise CheckpointError(f"{source} does not fit the UNet its config describes: " + "; ".join(parts))
    return {ours: torch.cat([state[k] for k in theirs]) if len(theirs) > 1 else state[theirs[0]]
            for ours, theirs in kmap}


def from_ours(state: dict[str, torch.Tensor], kmap: KeyMap) -> dict[str, torch.Tensor]:
    """Our state dict -> theirs, splitting the stacked projections into equal parts."""
    out = {}
    for ours, theirs in kmap:
        parts = state[ours].chunk(len(theirs)) if len(theirs) > 1 else (state[ours],)
        out.update({k: p.contiguous() for k, p in zip(theirs, parts)})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# configs


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}")


def config_from_diffusers(config: dict[str, Any], source: str = "config.json") -> tuple[UNetConfig, dict[str, Any]]:
    """A diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` config.json -> (our UNetConfig, the rest: in/out
    channels, sample size, context width or None). Anything our UNet cannot express is refused by name."""
    cls = config.get("_class_name", "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel")
    if cls not in ("UNet2DConditionModel", "UNet2DModel"):
        raise _refuse(source, f"a {cls}; difflineage reads the UNet2DConditionModel of Stable Diffusion 1.x/2.x and "
                              "the UNet2DModel of DDPM")
    conditional = cls == "UNet2DConditionModel"
    if conditional and config.get("addition_embed_type"):
        raise _refuse(source, f"addition_embed_type={config['addition_embed_type']!r} (an SDXL-style UNet); "
                              "difflineage reads Stable Diffusion 1.x and 2.x")
    for key, allowed in (("time_embedding_type", ("positional", None)), ("class_embed_type", (None,)),
                         ("center_input_sample", (False, None)), ("mid_block_scale_factor", (1, 1.0, None)),
                         ("act_fn", ("silu", None)), ("encoder_hid_dim", (None,)),
                         ("resnet_time_scale_shift", ("default", "scale_shift", None)),
                         ("attn_norm_num_groups", (None,)), ("num_class_embeds", (None,)),
                         ("time_cond_proj_dim", (None,)), ("conv_in_kernel", (3, None)), ("conv_out_kernel", (3, None))):
        if config.get(key) not in allowed:
            raise _refuse(source, f"{key}={config[key]!r} is not supported (expected {allowed[0]!r})")
    boc = list(config.get("block_out_channels", (320, 640, 1280, 1280) if conditional else (224, 448, 672, 896)))
    if any(b % boc[0] for b in boc):
        raise _refuse(source, f"block_out_channels={boc} are not multiples of the first")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if len(down) != len(boc) or len(up) != len(boc):
        raise _refuse(source, f"{len(down)} down and {len(up)} up block types for {len(boc)} levels")
    sample = int(config.get("sample_size") or 64)
    if isinstance(sample, (list, tuple)):
        sample = int(sample[0])
    attn_down = ["Attn" in t for t in down]
    attn_up = ["Attn" in t for t in up]
    if attn_down != attn_up[::-1]:
        raise _refuse(source, f"attention in down blocks {down} and up blocks {up} is not mirrored")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn" if conditional else "UNetMidBlock2D")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D") or config.get("add_attention") is False:
        raise _refuse(source, f"mid block {mid_type} without attention is not supported")
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise _refuse(source, f"transformer_layers_per_block={depth} differ by level")
        depth = depth[0]
    flip, shift = config.get("flip_sin_to_cos", True), config.get("freq_shift", 0)
    if (flip, shift) == (True, 0):
        layout = "cos_sin"
    elif (flip, shift) == (False, 1):
        layout = "ddpm"
    else:
        raise _refuse(source, f"flip_sin_to_cos={flip}, freq_shift={shift}: a timestep embedding difflineage does "
                              "not have (it has True/0 and False/1)")
    heads, head_channels = 1, 0
    if conditional:  # diffusers' attention_head_dim means the number of heads here (num_attention_heads wins)
        given = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        per_level = list(given) if isinstance(given, (list, tuple)) else [given] * len(boc)
        dims = {w // h for w, h in zip(boc, per_level)}
        if len(set(per_level)) == 1:
            heads = per_level[0]
        elif len(dims) == 1:
            head_channels = dims.pop()
        else:
            raise _refuse(source, f"attention heads {per_level} give neither one head count nor one head width")
    elif config.get("attention_head_dim"):  # UNet2DModel: the width of a head
        head_channels = int(config["attention_head_dim"])
    unet = UNetConfig(channels=boc[0], channel_mult=tuple(b // boc[0] for b in boc),
                      num_res_blocks=int(config.get("layers_per_block", 2)),
                      attention_resolutions=tuple(sample // 2 ** i for i, a in enumerate(attn_down) if a),
                      heads=heads, head_channels=head_channels, dropout=float(config.get("dropout", 0.0) or 0.0),
                      norm_groups=int(config.get("norm_num_groups", 32)), norm_eps=float(config.get("norm_eps", 1e-5)),
                      time_conditioning="scale_shift" if config.get("resnet_time_scale_shift") == "scale_shift" else "add",
                      attention_block="transformer" if conditional else "plain", timestep_embedding=layout,
                      transformer_depth=int(depth), linear_projection=bool(config.get("use_linear_projection", False)),
                      downsample_padding=int(config.get("downsample_padding", 1)), pooled_text=False,
                      upcast_attention=bool(config.get("upcast_attention", False)))
    unet.check()
    extra = {"in_channels": int(config.get("in_channels", 4)), "out_channels": int(config.get("out_channels", 4)),
             "sample_size": sample,
             "context_dim": int(config.get("cross_attention_dim", 768)) if conditional else None}
    return unet, extra


def config_to_diffusers(cfg: UNetConfig, in_channels: int, out_channels: int, sample_size: int,
                        context_dim: int | None) -> dict[str, Any]:
    """The config.json diffusers builds the same network from."""
    levels = len(cfg.channel_mult)
    boc = [cfg.channels * m for m in cfg.channel_mult]
    attn = [sample_size // 2 ** i in cfg.attention_resolutions for i in range(levels)]
    common = {"in_channels": in_channels, "out_channels": out_channels, "sample_size": sample_size,
              "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.norm_groups,
              "norm_eps": cfg.norm_eps, "downsample_padding": cfg.downsample_padding, "act_fn": "silu",
              "flip_sin_to_cos": cfg.timestep_embedding == "cos_sin",
              "freq_shift": 0 if cfg.timestep_embedding == "cos_sin" else 1,
              "resnet_time_scale_shift": "scale_shift" if cfg.time_conditioning == "scale_shift" else "default",
              "dropout": cfg.dropout}
    if context_dim is not None:
        heads = [cfg.heads_at(w) for w in boc]
        return {"_class_name": "UNet2DConditionModel", **common, "cross_attention_dim": context_dim,
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
                "use_linear_projection": cfg.linear_projection, "transformer_layers_per_block": cfg.transformer_depth,
                "upcast_attention": cfg.upcast_attention,
                "center_input_sample": False}
    return {"_class_name": "UNet2DModel", **common,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
            "attention_head_dim": cfg.head_channels or None, "time_embedding_type": "positional",
            "center_input_sample": False, "mid_block_scale_factor": 1, "add_attention": True}


def _levels(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def config_from_original(state: dict[str, torch.Tensor], source: str = "state dict",
                         heads: int | None = None, head_channels: int | None = None) -> tuple[UNetConfig, dict[str, Any]]:
    """Read a Stable Diffusion UNet's shape off an original-layout state dict (``model.diffusion_model.`` stripped).

    The head count is not in the weights: by default 8 heads for a 768-wide context (SD 1.x) and 64-wide heads for a
    1024-wide one (SD 2.x), as the released configs have them."""
    if "input_blocks.0.0.weight" not in state:
        raise _refuse(source, "no input_blocks.0.0.weight (expected a Stable Diffusion UNet in the original layout)")
    ch = int(state["input_blocks.0.0.weight"].shape[0])
    blocks = _levels(state, r"^input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in state]
    nrb = downs[0] - 1 if downs else len(blocks) - 1
    levels = len(downs) + 1
    mult, attn_levels = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        key = f"input_blocks.{first}.0.out_layers.3.weight"
        if key not in state:
            raise _refuse(source, f"lacks {key}, needed to infer the UNet's shape")
        width = int(state[key].shape[0])
        if width % ch:
            raise _refuse(source, f"level {level} is {width} wide, not a multiple of {ch}")
        mult.append(width // ch)
        attn_levels.append(f"input_blocks.{first}.1.norm.weight" in state)
    cross = [k for k in state if k.endswith("attn2.to_k.weight")]
    context_dim = int(state[cross[0]].shape[1]) if cross else None
    proj = [k for k in state if k.endswith(".proj_in.weight")]
    linear = bool(proj) and state[proj[0]].dim() == 2
    depth = len(_levels(state, r"^middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    if heads is None and head_channels is None:
        if context_dim == 1024:
            head_channels = 64
        else:
            heads = 8
    sample = 64  # the structure does not depend on it; 512 px / 8
    unet = UNetConfig(channels=ch, channel_mult=tuple(mult), num_res_blocks=nrb,
                      attention_resolutions=tuple(sample // 2 ** i for i, a in enumerate(attn_levels) if a),
                      heads=heads or 8, head_channels=head_channels or 0, norm_groups=32, norm_eps=1e-5,
                      time_conditioning="add", attention_block="transformer", timestep_embedding="cos_sin",
                      transformer_depth=depth, linear_projection=linear, pooled_text=False)
    unet.check()
    extra = {"in_channels": int(state["input_blocks.0.0.weight"].shape[1]),
             "out_channels": int(state["out.2.weight"].shape[0]) if "out.2.weight" in state else 4,
             "sample_size": sample, "context_dim": context_dim}
    return unet, extra
