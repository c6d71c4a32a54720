"""Stable Diffusion's CLIP text encoders, to and from :class:`~difflineage.models.clip_text.CLIPTextEncoder`.

* **transformers** (``CLIPTextModel``): the diffusers folder's ``text_encoder/`` and SD 1.x's single file
  (``cond_stage_model.transformer.text_model.*``): ``embeddings.*``, ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``,
  ``layer_norm1/2``, ``mlp.fc1/fc2``, ``final_layer_norm``.
* **open_clip**: SD 2.x's single file (``cond_stage_model.model.*``): ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``.
  SD 2.x reads the penultimate layer; the file keeps all 24 (``skip_last=1``), while diffusers' folders drop the
  unused last one (23 layers, ``skip_last=0``). Writing a 23-layer encoder in this layout appends a zero layer in
  its place, which nothing reads.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch

from difflineage.errors import CheckpointError
from difflineage.models.clip_text import CLIPTextConfig

TextLayout = Literal["transformers", "open_clip"]

# held by some files, read by nothing SD does: the position-id buffer, CLIP's projection and temperature
_UNUSED = re.compile(r"^(embeddings\.position_ids|text_projection(\.weight)?|logit_scale|attn_mask)$")


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def detect_text_layout(state: dict[str, torch.Tensor]) -> TextLayout:
    if any(k.startswith("transformer.resblocks.") for k in state):
        return "open_clip"
    return "transformers"


def strip_text_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``text_model.`` (transformers' files) and the unused tensors."""
    out = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    return {k: v for k, v in out.items() if not _UNUSED.match(k)}


def config_from_transformers(config: dict[str, Any], source: str = "config.json") -> CLIPTextConfig:
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise CheckpointError(f"{source}: a {arch}; Stable Diffusion's text encoder is a CLIPTextModel")
    width = int(config.get("hidden_size", 512))
    if int(config.get("intermediate_size", 4 * width)) != 4 * width:
        raise CheckpointError(f"{source}: intermediate_size={config['intermediate_size']} is not 4 x hidden_size; not a "
                              "CLIP text tower difflineage reads")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{source}: hidden_act={act!r}; CLIP's towers use quick_gelu (OpenAI) or gelu (OpenCLIP)")
    cfg = CLIPTextConfig(vocab_size=int(config.get("vocab_size", 49408)), width=width,
                         layers=int(config.get("num_hidden_layers", 12)), heads=int(config.get("num_attention_heads", 8)),
                         max_length=int(config.get("max_position_embeddings", 77)), activation=act, skip_last=0,
                         eps=float(config.get("layer_norm_eps", 1e-5)))
    cfg.check()
    return cfg


def config_to_transformers(cfg: CLIPTextConfig) -> dict[str, Any]:
    """The config.json of the same tower as transformers builds it (the layers SD reads: ``skip_last`` dropped)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_hidden_layers": cfg.layers - cfg.skip_last,
            "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.max_length, "hidden_act": cfg.activation,
            "layer_norm_eps": cfg.eps, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
            "projection_dim": cfg.width, "torch_dtype": "float32"}


def config_from_state(state: dict[str, torch.Tensor], layout: TextLayout, source: str = "state dict") -> CLIPTextConfig:
    """The tower's shape from a state dict (prefixes stripped). Heads are 64 wide in both released towers; the
    activation and the layer read follow the layout: quick-GELU and the last layer for transformers' (SD 1.x),
    GELU and the penultimate layer for OpenCLIP's (SD 2.x)."""
    emb = "token_embedding.weight" if layout == "open_clip" else "embeddings.token_embedding.weight"
    if emb not in state:
        raise CheckpointError(f"{source}: no {emb}; not a CLIP text encoder")
    vocab, width = state[emb].shape
    if layout == "open_clip":
        layers = _count(state, r"^transformer\.resblocks\.(\d+)\.")
        length = state["positional_embedding"].shape[0]
        cfg = CLIPTextConfig(int(vocab), int(width), layers, int(width) // 64, int(length), "gelu", skip_last=1)
    else:
        layers = _count(state, r"^encoder\.layers\.(\d+)\.")
        length = state["embeddings.position_embedding.weight"].shape[0]
        cfg = CLIPTextConfig(int(vocab), int(width), layers, int(width) // 64, int(length), "quick_gelu")
    cfg.check()
    return cfg


def to_ours(state: dict[str, torch.Tensor], cfg: CLIPTextConfig, layout: TextLayout,
            source: str = "state dict") -> dict[str, torch.Tensor]:
    """Their tensors (prefixes stripped) -> ours. Every tensor must be used and every one of ours given."""
    state = strip_text_prefix(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(ours: str, *theirs: str) -> None:
        lacking = [k for k in theirs if k not in state]
        if lacking:
            raise CheckpointError(f"{source}: lacks {', '.join(lacking)} (a {layout} CLIP text encoder of "
                                  f"{cfg.layers} layers was expected)")
        used.update(theirs)
        out[ours] = torch.cat([state[k] for k in theirs]) if len(theirs) > 1 else state[theirs[0]]

    if layout == "open_clip":
        take("token_embedding.weight", "token_embedding.weight")
        take("position_embedding", "positional_embedding")
        for i in range(cfg.layers):
            p = f"transformer.resblocks.{i}"
            take(f"layers.{i}.attn.qkv.weight", f"{p}.attn.in_proj_weight")
            take(f"layers.{i}.attn.qkv.bias", f"{p}.attn.in_proj_bias")
            for ours, theirs in (("norm1", "ln_1"), ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"),
                                 ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
                for w in ("weight", "bias"):
                    take(f"layers.{i}.{ours}.{w}", f"{p}.{theirs}.{w}")
        for w in ("weight", "bias"):
            take(f"final_norm.{w}", f"ln_final.{w}")
    else:
        take("token_embedding.weight", "embeddings.token_embedding.weight")
        take("position_embedding", "embeddings.position_embedding.weight")
        for i in range(cfg.layers):
            p = f"encoder.layers.{i}"
            for w in ("weight", "bias"):
                take(f"layers.{i}.attn.qkv.{w}", *(f"{p}.self_attn.{x}_proj.{w}" for x in "qkv"))
                for ours, theirs in (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"),
                                     ("norm2", "layer_norm2"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                    take(f"layers.{i}.{ours}.{w}", f"{p}.{theirs}.{w}")
        for w in ("weight", "bias"):
            take(f"final_norm.{w}", f"final_layer_norm.{w}")
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} tensors no {cfg.layers}-layer CLIP text encoder has: "
                              + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    return out


def from_ours(state: dict[str, torch.Tensor], cfg: CLIPTextConfig, layout: TextLayout) -> dict[str, torch.Tensor]:
    """Ours -> their layout (no prefix; transformers' keys under ``text_model.``). transformers' layout keeps the
    layers SD reads; OpenCLIP's keeps 24-style towers whole (a zero last layer is added to a tower that ends at
    the layer SD reads, as the original SD 2.x file has one more)."""
    out: dict[str, torch.Tensor] = {}
    if layout == "open_clip":
        out["token_embedding.weight"] = state["token_embedding.weight"]
        out["positional_embedding"] = state["position_embedding"]
        layers = cfg.layers
        for i in range(layers):
            p = f"transformer.resblocks.{i}"
            out[f"{p}.attn.in_proj_weight"] = state[f"layers.{i}.attn.qkv.weight"]
            out[f"{p}.attn.in_proj_bias"] = state[f"layers.{i}.attn.qkv.bias"]
            for ours, theirs in (("norm1", "ln_1"), ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"),
                                 ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
                for w in ("weight", "bias"):
                    out[f"{p}.{theirs}.{w}"] = state[f"layers.{i}.{ours}.{w}"]
        if cfg.skip_last == 0:  # SD 2.x's file reads the penultimate layer: the one we end at
            last = f"transformer.resblocks.{layers - 1}."
            out.update({k.replace(last, f"transformer.resblocks.{layers}."): torch.zeros_like(v)
                        for k, v in list(out.items()) if k.startswith(last)})
        for w in ("weight", "bias"):
            out[f"ln_final.{w}"] = state[f"final_norm.{w}"]
    else:
        out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
        out["text_model.embeddings.position_embedding.weight"] = state["position_embedding"]
        for i in range(cfg.layers - cfg.skip_last):
            p = f"text_model.encoder.layers.{i}"
            for w in ("weight", "bias"):
                for x, part in zip("qkv", state[f"layers.{i}.attn.qkv.{w}"].chunk(3)):
                    out[f"{p}.self_attn.{x}_proj.{w}"] = part.contiguous()
                for ours, theirs in (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"),
                                     ("norm2", "layer_norm2"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                    out[f"{p}.{theirs}.{w}"] = state[f"layers.{i}.{ours}.{w}"]
        for w in ("weight", "bias"):
            out[f"text_model.final_layer_norm.{w}"] = state[f"final_norm.{w}"]
    return out
