"""DiT weights: the official facebookresearch/DiT checkpoints and the diffusers ``DiTTransformer2DModel`` layout.

:class:`~difflineage.models.dit.DiT` (block ``adaln_zero``) uses the official parameter names, so a released
checkpoint (``DiT-XL-2-256x256.pt``: a plain state dict) or a training checkpoint of the official code
(``{"model", "ema", "opt", "args"}``; the EMA weights are taken) loads with no renaming. The architecture is
inferred from the shapes, except the number of heads, which no tensor records: it comes from the paper's
configuration of that depth and width, or from the caller.

diffusers stores the same weights differently:

* ``attn.qkv`` (one ``[3D, D]`` projection, q then k then v) is split into ``attn1.to_q/to_k/to_v``;
  ``attn.proj`` is ``attn1.to_out.0``, ``mlp.fc1/fc2`` are ``ff.net.0.proj`` / ``ff.net.2``,
  ``adaLN_modulation.1`` is ``norm1.linear`` and ``x_embedder.proj`` is ``pos_embed.proj``;
* the timestep and label embedders live inside every block
  (``transformer_blocks.N.norm1.emb.{timestep_embedder.linear_1/2, class_embedder.embedding_table}``): a
  DiT has one of each, so they are copied into every block, and taken from block 0 (after checking that all
  blocks agree) coming back; the final layer uses block 0's;
* the final layer's adaLN is ``proj_out_1`` and its linear ``proj_out_2``; the chunk orders are the official
  ones in both places (blocks: shift, scale, gate for attention then MLP; final layer: shift, scale);
* the fixed 2-D sin-cos ``pos_embed`` is a non-persistent buffer there (recomputed, not in the state dict):
  it is dropped going to diffusers and regenerated coming back.

Two numerical differences remain in diffusers' *forward*, with identical weights (see
:func:`match_paper_numerics`): its timestep frequencies use ``downscale_freq_shift=1`` (exponent divided by
``half - 1`` instead of DiT's ``half``), hard-coded in ``CombinedTimestepLabelEmbeddings``; and the LayerNorm
before the MLP (``norm3``) uses the config's ``norm_eps``, 1e-5 by default, where DiT uses 1e-6.

Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)`` (with
``argparse.Namespace`` allowed, which the official training checkpoints hold under ``"args"``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from difflineage.errors import CheckpointError
from difflineage.models.dit import DIT_CONFIGS, DIT_SIZES, DiT, DiTConfig, sincos_pos_embed_2d
from difflineage.weights import load_state_dict_strict, plain_tensors, read_weights

StateDict = dict[str, torch.Tensor]

# Our (official) names -> diffusers names, for parameters of modules: "<module>.<weight|bias>".
_BLOCK_TO_DIFFUSERS = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                       "adaLN_modulation.1": "norm1.linear"}
_TOP_TO_DIFFUSERS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
                     "final_layer.linear": "proj_out_2"}
# The condition embedders, which diffusers keeps in every block's norm1.emb.
_EMB_TO_DIFFUSERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                     "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                     "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_QKV = ("to_q", "to_k", "to_v")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_WRAPPERS = ("ema", "model", "state_dict", "module")  # preferred first
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


# ----------------------------------------------------------------------------------------------------------
# Official layout


def load_official_dit(path: Union[str, Path], learn_sigma: Optional[bool] = None, heads: Optional[int] = None,
                      ) -> tuple[DiT, dict[str, Any]]:
    """Build a :class:`DiT` from an official DiT checkpoint, in eval mode, and return it with the inferred
    settings (``name, depth, hidden, heads, patch, mlp_ratio, in_channels, out_channels, input_size,
    num_classes, learn_sigma, weights``; ``weights`` says which entry of the file was used).

    :param path: a ``.pt``/``.pth``/``.bin`` torch file (read with ``weights_only=True``; a file that needs
        code unpickled is refused) or a ``.safetensors`` file; a plain state dict, or a training checkpoint
        ``{"model": ..., "ema": ...}`` whose ``ema`` weights are preferred.
    :param learn_sigma: inferred from the output layer (``p*p*2C`` rows: learned variance); a value given
        here is checked against the file.
    :param heads: attention heads (no tensor records them); by default those of the paper's configuration of
        the same depth and width.
    :raises CheckpointError: naming the path: unreadable or refused file, unknown layout, missing, unexpected
        or misshapen keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected an official DiT checkpoint (.pt or .safetensors)")
    raw = _read(path)
    state, which = _pick_weights(raw, str(path))
    return _build(state, str(path), heads=heads, learn_sigma=learn_sigma, weights=which)


def save_official_dit(model: Union[DiT, StateDict], path: Union[str, Path]) -> Path:
    """Write a DiT's weights in the official layout: a plain dict of tensors, ``torch.save``-d (what
    ``torch.load`` in the official sample.py reads), or safetensors when ``path`` ends in ``.safetensors``."""
    if isinstance(model, nn.Module):
        if not isinstance(model, DiT) or model.cfg.block != "adaln_zero":
            block = getattr(getattr(model, "cfg", None), "block", type(model).__name__)
            raise ValueError(f"only adaLN-Zero DiTs have an official layout (got {block!r})")
        if model.captions:
            raise ValueError("a caption-conditioned DiT has no official layout (the official DiT embeds class labels; "
                             "its text encoder would be lost): keep its difflineage checkpoint")
        state = model.state_dict()
    else:
        state = model
    plain = plain_tensors(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(plain, str(path), metadata={"format": "pt", "layout": "facebookresearch/DiT"})
    else:
        torch.save(plain, path)
    return path


def infer_dit_settings(state: StateDict, source: str = "state dict", heads: Optional[int] = None,
                       learn_sigma: Optional[bool] = None) -> dict[str, Any]:
    """The architecture of an official-layout DiT state dict, from its shapes (see :func:`load_official_dit`)."""
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight", "blocks.0.mlp.fc1.weight", "blocks.0.adaLN_modulation.1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        shown = ", ".join(sorted(state)[:5]) or "nothing"
        raise CheckpointError(f"{source} is not an official DiT state dict: missing {', '.join(missing)} "
                              f"(found {shown}{' ...' if len(state) > 5 else ''})")
    proj = state["x_embedder.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has shape {tuple(proj.shape)}, "
                              "expected (hidden, channels, patch, patch)")
    hidden, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    mod_rows = state["blocks.0.adaLN_modulation.1.weight"].shape[0]
    if mod_rows != 6 * hidden:
        raise CheckpointError(f"{source}: blocks.0.adaLN_modulation.1.weight has {mod_rows} rows, expected "
                              f"6 x {hidden} (adaLN-Zero, the only official block design)")
    pos = state["pos_embed"]
    tokens = int(pos.shape[-2]) if pos.ndim >= 2 else -1
    grid = math.isqrt(max(tokens, 0))
    if pos.ndim != 3 or grid * grid != tokens or pos.shape[-1] != hidden:
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(pos.shape)}, expected (1, side^2, {hidden})")
    num_classes = int(state["y_embedder.embedding_table.weight"].shape[0]) - 1  # last row: the null class
    out_rows = int(state["final_layer.linear.weight"].shape[0])
    if out_rows == patch * patch * 2 * in_channels:
        inferred_sigma = True
    elif out_rows == patch * patch * in_channels:
        inferred_sigma = False
    else:
        raise CheckpointError(f"{source}: final_layer.linear.weight has {out_rows} rows, expected "
                              f"{patch}*{patch}*{in_channels} or twice that (learned sigma)")
    if learn_sigma is not None and learn_sigma != inferred_sigma:
        raise CheckpointError(f"{source}: learn_sigma={learn_sigma} was asked for but the output layer has "
                              f"{out_rows} rows, i.e. learn_sigma={inferred_sigma}")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if heads is None:
        heads = next((h for d, w, h in DIT_SIZES.values() if (d, w) == (depth, hidden)), None)
        if heads is None:
            raise CheckpointError(f"{source}: depth {depth}, hidden {hidden} is none of the paper's DiT sizes, "
                                  "and checkpoints do not record the number of attention heads: pass heads=")
    if hidden % heads:
        raise CheckpointError(f"{source}: hidden {hidden} does not split into heads={heads}")
    name = next((n for n, cfg in DIT_CONFIGS.items() if cfg == (depth, hidden, heads, patch)), "custom")
    if mlp_ratio != 4.0:
        name = "custom"
    return {"name": name, "depth": depth, "hidden": hidden, "heads": int(heads), "patch": patch,
            "mlp_ratio": mlp_ratio, "in_channels": in_channels,
            "out_channels": in_channels * (2 if inferred_sigma else 1), "input_size": grid * patch,
            "num_classes": num_classes, "learn_sigma": inferred_sigma}


def dit_config_of(settings: dict[str, Any], base: Optional[DiTConfig] = None) -> DiTConfig:
    """The :class:`DiTConfig` of inferred settings (:func:`infer_dit_settings`): the architecture (sizes, patch,
    MLP ratio, the adaLN-Zero block) from the file; the other fields from ``base``, or by default with the file's
    ``learn_sigma``."""
    s = settings
    return replace(base or DiTConfig(learn_sigma=s["learn_sigma"]), name=s["name"], depth=s["depth"],
                   hidden=s["hidden"], heads=s["heads"], patch=s["patch"], mlp_ratio=s["mlp_ratio"], block="adaln_zero")


def _build(state: StateDict, source: str, heads: Optional[int], learn_sigma: Optional[bool],
           weights: str) -> tuple[DiT, dict[str, Any]]:
    s = infer_dit_settings(state, source, heads=heads, learn_sigma=learn_sigma)
    cfg = dit_config_of(s)
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = DiT(cfg, in_channels=s["in_channels"], input_size=s["input_size"], num_classes=s["num_classes"])
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, state, source)
    return model.eval(), {**s, "weights": weights}


def _read(path: Path) -> dict:
    # The official training checkpoints keep their argparse.Namespace under "args": plain attributes,
    # no code runs to rebuild it, so it is the one class allowed beyond tensors and containers.
    return read_weights(path, "DiT weights", safe_classes=(argparse.Namespace,))


def _pick_weights(raw: dict, source: str) -> tuple[StateDict, str]:
    """The weights of a file: the ``ema`` (else ``model``, ``state_dict``) entry of a training checkpoint or
    the plain state dict itself, with a DDP ``module.`` / ``torch.compile`` prefix removed."""
    which = "state_dict"
    for key in _WRAPPERS:
        if isinstance(raw.get(key), dict):
            raw, which = raw[key], key
            break
    bad = sorted(str(k) for k, v in raw.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if bad:
        raise CheckpointError(f"{source}: the {which} entries {', '.join(bad[:5])} are not tensors; expected a "
                              "DiT state dict (plain, or under 'ema' / 'model')")
    state = dict(raw)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, which


# ----------------------------------------------------------------------------------------------------------
# diffusers layout


def dit_to_diffusers(state: Union[StateDict, DiT], depth: Optional[int] = None) -> StateDict:
    """Official / difflineage DiT state dict -> ``DiTTransformer2DModel`` state dict (see the module notes).

    ``depth`` (the number of blocks, which receive a copy of the embedders each) is counted from the keys
    when not given. Keys of neither layout are passed through, so that strict loading names them."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    counted = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    depth = counted if depth is None else depth
    if depth < 1:
        raise CheckpointError("dit_to_diffusers: the state dict has no blocks.N.* keys")
    out: StateDict = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue  # recomputed by diffusers (a non-persistent buffer)
        module, _, param = key.rpartition(".")
        if module in _EMB_TO_DIFFUSERS:
            for n in range(depth):  # one copy per block, each its own tensor (safetensors refuses shared ones)
                out[f"transformer_blocks.{n}.{_EMB_TO_DIFFUSERS[module]}.{param}"] = value.detach().clone()
        elif module in _TOP_TO_DIFFUSERS:
            out[f"{_TOP_TO_DIFFUSERS[module]}.{param}"] = value
        elif m := _BLOCK_KEY.match(key):
            n, sub = m.group(1), m.group(2)
            if sub == "attn.qkv":
                for name, part in zip(_QKV, value.chunk(3, dim=0)):  # rows: q, then k, then v
                    out[f"transformer_blocks.{n}.attn1.{name}.{param}"] = part.clone()
            elif sub in _BLOCK_TO_DIFFUSERS:
                out[f"transformer_blocks.{n}.{_BLOCK_TO_DIFFUSERS[sub]}.{param}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def diffusers_to_dit(state: StateDict, sample_size: Optional[int] = None) -> StateDict:
    """``DiTTransformer2DModel`` state dict -> official / difflineage DiT state dict.

    The embedders are taken from block 0, after checking that every block holds the same ones. ``pos_embed``
    is taken from the file when it has one (``pos_embed.pos_embed``, older diffusers), else regenerated for a
    ``sample_size`` x ``sample_size`` latent (the diffusers config's ``sample_size``).

    :raises CheckpointError: blocks whose embedders differ, a partial q/k/v, no way to make ``pos_embed``.
    """
    top = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
    block_names = {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()}
    emb_names = {v: k for k, v in _EMB_TO_DIFFUSERS.items()}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    embs: dict[str, dict[int, torch.Tensor]] = {}  # our key -> block -> tensor
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value.reshape(1, -1, value.shape[-1])
        elif module in top:
            out[f"{top[module]}.{param}"] = value
        elif m := _DIFFUSERS_BLOCK_KEY.match(key):
            n, sub = m.group(1), m.group(2)
            if sub in emb_names:
                embs.setdefault(f"{emb_names[sub]}.{param}", {})[int(n)] = value
            elif sub.startswith("attn1.") and sub[len("attn1."):] in _QKV:
                qkv.setdefault((n, param), {})[sub[len("attn1."):]] = value
            elif sub in block_names:
                out[f"blocks.{n}.{block_names[sub]}.{param}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (n, param), parts in sorted(qkv.items()):
        absent = [p for p in _QKV if p not in parts]
        if absent:
            raise CheckpointError(f"transformer_blocks.{n}.attn1 has no {', '.join(absent)}.{param}: q, k and v "
                                  "are needed together to form attn.qkv")
        out[f"blocks.{n}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    blocks = sorted({int(m.group(1)) for k in state if (m := _DIFFUSERS_BLOCK_KEY.match(k))})
    for ours, per_block in embs.items():
        theirs = f"{_EMB_TO_DIFFUSERS[ours.rpartition('.')[0]]}.{ours.rpartition('.')[2]}"
        if 0 not in per_block:
            raise CheckpointError(f"transformer_blocks.0.{theirs} is missing (other blocks have it)")
        for n in blocks:
            if n not in per_block:
                raise CheckpointError(f"transformer_blocks.{n}.{theirs} is missing (block 0 has it)")
            if not torch.equal(per_block[n], per_block[0]):
                raise CheckpointError(f"transformer_blocks.{n}.{theirs} differs from block 0's: a DiT has one "
                                      "timestep and one label embedder, so every block must hold the same")
        out[ours] = per_block[0]
    if "pos_embed" not in out:
        proj = state.get("pos_embed.proj.weight")
        if proj is None or sample_size is None:
            raise CheckpointError("diffusers_to_dit: pos_embed is not stored in diffusers checkpoints; pass "
                                  "sample_size (the latent side, the diffusers config's sample_size) and keep "
                                  "pos_embed.proj.weight so that it can be regenerated")
        hidden, patch = int(proj.shape[0]), int(proj.shape[-1])
        if sample_size % patch:
            raise CheckpointError(f"diffusers_to_dit: patch {patch} does not divide sample_size {sample_size}")
        out["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(hidden, sample_size // patch)).float()[None]
    return out


def diffusers_dit_config(model: DiT) -> dict[str, Any]:
    """Keyword arguments of ``diffusers.DiTTransformer2DModel`` for the architecture of ``model`` (with
    ``norm_eps=1e-6`` as DiT; the timestep shift still needs :func:`match_paper_numerics`)."""
    depth, hidden, heads, patch = model.cfg.resolved()
    if model.cfg.block != "adaln_zero" or model.cfg.mlp_ratio != 4.0:
        raise ValueError("diffusers' DiTTransformer2DModel is adaLN-Zero with an MLP ratio of 4 only")
    if model.captions:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditioned: a caption-conditioned DiT has no "
                         "diffusers layout; keep its difflineage checkpoint")
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                out_channels=model.out_channels, num_layers=depth, sample_size=model.grid * patch, patch_size=patch,
                num_embeds_ada_norm=model.y_embedder.num_classes, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate")


def match_paper_numerics(diffusers_model: nn.Module) -> nn.Module:
    """Make a diffusers DiT compute what the official DiT computes, in place: timestep frequencies with
    ``downscale_freq_shift=0`` and ``flip_sin_to_cos=True`` ([cos, sin]) in every block's embedder (diffusers
    hard-codes a shift of 1), and eps 1e-6 for every LayerNorm (diffusers' ``norm3``, before the MLP, takes
    the config's ``norm_eps``, 1e-5 by default). Returns the model."""
    for module in diffusers_model.modules():
        if hasattr(module, "downscale_freq_shift") and hasattr(module, "flip_sin_to_cos"):
            module.downscale_freq_shift = 0
            module.flip_sin_to_cos = True
        elif isinstance(module, nn.LayerNorm):
            module.eps = 1e-6
    return diffusers_model


def load_diffusers_dit(path_or_state: Union[str, Path, StateDict], heads: Optional[int] = None,
                       sample_size: Optional[int] = None, learn_sigma: Optional[bool] = None,
                       ) -> tuple[DiT, dict[str, Any]]:
    """Build a :class:`DiT` from diffusers ``DiTTransformer2DModel`` weights: a state dict, a weights file
    (``.safetensors`` or a torch file), or a model folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``; a pipeline folder's ``transformer/`` is used). ``heads`` and
    ``sample_size`` default to the folder's config.json; the rest is inferred as in :func:`load_official_dit`.
    The result computes the official DiT, not diffusers' forward (see :func:`match_paper_numerics`)."""
    if isinstance(path_or_state, dict):
        state, source, which = path_or_state, "diffusers state dict", "state_dict"
    else:
        path = Path(path_or_state)
        if path.is_dir() and (path / "transformer").is_dir() and not (path / "config.json").exists():
            path = path / "transformer"
        folder = path if path.is_dir() else path.parent
        config_file = folder / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{config_file}: not readable JSON ({exc})") from exc
            heads = heads if heads is not None else config.get("num_attention_heads")
            sample_size = sample_size if sample_size is not None else config.get("sample_size")
        if path.is_dir():
            files = [path / f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
            found = [f for f in files if f.is_file()]
            if not found:
                raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors (or .bin) in this folder")
            path = found[0]
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; expected diffusers DiT weights or a model folder")
        state, which = _pick_weights(_read(path), str(path))
        source = str(path)
        if sample_size is None:
            raise CheckpointError(f"{path}: diffusers weights do not record the latent side (their sample_size) and "
                                  f"there is no config.json beside them; give the model folder, or put its "
                                  "config.json next to the file")
    official = diffusers_to_dit(state, sample_size=sample_size)
    return _build(official, source, heads=heads, learn_sigma=learn_sigma, weights=which)


# ----------------------------------------------------------------------------------------------------------
# Either layout from a file, and writing the diffusers layout


def read_dit_file(path: Union[str, Path], heads: Optional[int] = None) -> tuple[DiT, str]:
    """A DiT from a diffusers model folder or weights file, or an official DiT checkpoint. Returns (model,
    layout name: ``diffusers`` or ``official``)."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_dit(path, heads=heads)[0], "diffusers"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    state, which = _pick_weights(_read(path), str(path))
    if any(k.startswith("transformer_blocks.") for k in state):  # by path: the config.json beside it is read too
        return load_diffusers_dit(path, heads=heads)[0], "diffusers"
    return _build(state, str(path), heads=heads, learn_sigma=None, weights=which)[0], "official"


def save_diffusers_dit(model: DiT, folder: Union[str, Path]) -> Path:
    """Write a diffusers model folder: ``config.json`` for ``DiTTransformer2DModel`` and
    ``diffusion_pytorch_model.safetensors`` (loadable with ``DiTTransformer2DModel.from_pretrained``; note that
    diffusers' forward differs from the paper's in its timestep frequencies, see :func:`match_paper_numerics`)."""
    config = {"_class_name": "DiTTransformer2DModel", **diffusers_dit_config(model)}  # refuses before writing
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in dit_to_diffusers(model.state_dict()).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return folder
