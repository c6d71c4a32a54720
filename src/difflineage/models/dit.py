"""DiT (Peebles & Xie, 2023): a transformer over patchified (latent) images, conditioned on the diffusion
timestep and a class label through one of four block designs of the paper:

- ``adaln_zero`` (the default and the paper's best): the condition regresses per-channel shift, scale and a
  gate for the attention and MLP branches; the regressor's output layer starts at zero, so every block
  starts as the identity.
- ``adaln``: shift and scale only (no gates), regressor initialised like any linear layer.
- ``cross_attention``: t and y embeddings form a two-token sequence that the image tokens attend to, in an
  extra cross-attention layer after self-attention.
- ``in_context``: t and y embeddings are appended to the image tokens as two more tokens, and the blocks are
  plain ViT blocks; the two tokens are dropped after the last block.

Caption conditioning (for text-conditioned DiT): the pooled text embedding, projected (``text_pooled``), takes the
label's place in the condition vector (adaLN) and in the two condition tokens (in-context, cross-attention), and
the cross-attention block attends to the projected text tokens (``text_tokens``) as well. A fifth block, for captions
only, is the text-to-image DiT block of PixArt-alpha (Chen et al. 2024):

- ``adaln_zero_cross``: adaLN-Zero conditioned on t and the pooled caption, with a cross-attention layer to the
  caption's tokens between self-attention and the MLP.

Parameter names follow the official code (timm names), so its checkpoints load with no renaming:
``pos_embed``, ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}``,
``final_layer.{linear,adaLN_modulation.1}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn

from difflineage.errors import ConfigError
from difflineage.models.step_cache import BlockLoop, plain_loop
from difflineage.nn.activations import gelu_tanh
from difflineage.nn.attention import Attention
from difflineage.nn.embeddings import LabelEmbedder, TimestepEmbedder

# The paper's configurations: depth, hidden size, heads (patch size is the /N suffix).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS = {f"DiT-{s}/{p}": (*DIT_SIZES[s], p) for s in DIT_SIZES for p in (2, 4, 8)}
BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attention", "in_context")  # the paper's four
# For captions: adaLN-Zero conditioned on the timestep and the pooled caption, with a cross-attention layer to the
# caption's tokens between self-attention and the MLP (the text-to-image DiT block of PixArt-alpha).
TEXT_BLOCK = "adaln_zero_cross"
ADALN_ZERO = ("adaln_zero", TEXT_BLOCK)


@dataclass
class DiTConfig:
    """:param name: a named configuration (``DiT-XL/2`` ...) or ``custom`` to use depth/hidden/heads/patch.
    :param block: the conditioning block design (see the module docstring).
    :param learn_sigma: predict the variance interpolation too (2C output channels), as DiT does."""

    name: str = "custom"
    depth: int = 6
    hidden: int = 128
    heads: int = 4
    patch: int = 2
    mlp_ratio: float = 4.0
    block: Literal["adaln_zero", "adaln", "cross_attention", "in_context", "adaln_zero_cross"] = "adaln_zero"
    learn_sigma: bool = True
    class_dropout: float = 0.1
    grad_checkpointing: bool = False

    def resolved(self) -> tuple[int, int, int, int]:
        """(depth, hidden, heads, patch) of this config."""
        return DIT_CONFIGS[self.name] if self.name != "custom" else (self.depth, self.hidden, self.heads, self.patch)

    def check(self) -> None:
        if self.name != "custom" and self.name not in DIT_CONFIGS:
            raise ConfigError(f"model.dit.name={self.name!r} is not a DiT configuration; choose custom or one of "
                              f"{', '.join(DIT_CONFIGS)}")
        depth, hidden, heads, patch = self.resolved()
        if hidden % heads or hidden % 4:
            raise ConfigError(f"DiT hidden={hidden} must be divisible by heads={heads} and by 4 (2-D positions)")
        if min(depth, patch) < 1 or not 0 <= self.class_dropout < 1:
            raise ConfigError("DiT depth and patch must be at least 1, class_dropout in [0, 1)")


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positions (MAE / DiT): half the channels encode the row, half the column,
    each as [sin, cos] of 1 / 10000^(2i / (dim / 2)) frequencies. Returns (grid * grid, dim), float64."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # (w, h) order
    return np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift per sample, in one fused kernel."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p x p stride-p convolution (``x_embedder.proj``)."""

    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: element-wise ops keep their first input's memory layout, so a transposed view here would
        # carry a (N, D, T) layout down the whole residual stream, and every LayerNorm and linear would copy it
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Mlp(nn.Module):
    """fc1 - GELU (tanh approximation, as DiT) - fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DiTBlock(nn.Module):
    """One transformer block with the chosen conditioning. LayerNorms have no affine parameters, eps 1e-6."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, block: str):
        super().__init__()
        self.block = block
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        if block in ("adaln_zero", "adaln", TEXT_BLOCK):
            n = 6 if block in ADALN_ZERO else 4  # shift, scale, (gate) for attention, then for the MLP
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n * hidden))
        if block in ("cross_attention", TEXT_BLOCK):
            self.norm_cross = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(hidden, heads, context_dim=hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond_tokens: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, T, D); c (N, D) the condition vector; cond_tokens (N, L, D) for cross-attention, with
        ``cond_mask`` (N, L) True where a token may be attended (None: all)."""
        if self.block == "adaln_zero":
            return self.adaln_zero(x, c, self.attn, lambda x, h, gate: torch.addcmul(x, gate[:, None], self.mlp(h)))
        if self.block == TEXT_BLOCK:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = torch.addcmul(x, gate_msa[:, None], self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
            x = x + self.cross_attn(self.norm_cross(x), cond_tokens, cond_mask)
            return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        if self.block == "adaln":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x))
        if self.block == "cross_attention":
            x = x + self.cross_attn(self.norm_cross(x), cond_tokens, cond_mask)
        return x + self.mlp(self.norm2(x))


    def adaln_zero(self, x: torch.Tensor, c: torch.Tensor, attention_branch: Callable[[torch.Tensor], torch.Tensor],
                   mlp_residual: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The adaLN-Zero block (the paper's Figure 3), written once for every way of running its branches: the
        condition ``c`` (N, D) regresses shift, scale and gate for each branch; ``x + gate_msa * attention(
        modulate(norm1(x)))``, then ``mlp_residual(x, modulate(norm2(x)), gate_mlp)`` adds the gated MLP branch
        (plain here; DyDiT's masked and fast paths route heads, channel groups and tokens inside the two callables)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa[:, None], attention_branch(modulate(self.norm1(x), shift_msa, scale_msa)))
        return mlp_residual(x, modulate(self.norm2(x), shift_mlp, scale_mlp), gate_mlp)


class FinalLayer(nn.Module):
    """LayerNorm (adaLN-modulated for the adaLN blocks) and a linear map to p * p * C_out per token."""

    def __init__(self, hidden: int, patch: int, out_channels: int, adaptive: bool):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaptive = adaptive
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm_final(x)
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """(x (N, C, S, S), t (N,), y (N,) labels with ``num_classes`` as the null class) -> (N, C_out, S, S).

    With ``context_dim`` (a text encoder's width) the model is caption-conditioned instead: it takes
    ``context`` (N, L, context_dim), ``context_mask`` (N, L) and ``pooled`` (N, context_dim) in place of labels.
    """

    def __init__(self, cfg: DiTConfig, in_channels: int, input_size: int, num_classes: int,
                 context_dim: Optional[int] = None):
        super().__init__()
        depth, hidden, heads, patch = cfg.resolved()
        if input_size % patch:
            raise ConfigError(f"DiT patch {patch} does not divide the input side {input_size}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if cfg.learn_sigma else in_channels
        self.patch = patch
        self.grid = input_size // patch
        self.x_embedder = PatchEmbed(in_channels, hidden, patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.captions = context_dim is not None
        if self.captions:
            self.text_pooled = nn.Linear(context_dim, hidden)
            if cfg.block in ("cross_attention", TEXT_BLOCK):
                self.text_tokens = nn.Linear(context_dim, hidden)
        else:
            if cfg.block == TEXT_BLOCK:
                raise ConfigError(f"DiT block {TEXT_BLOCK} attends to a caption's tokens: it needs model.condition="
                                  "caption (for classes, adaln_zero is the paper's best block)")
            self.y_embedder = LabelEmbedder(num_classes, hidden, cfg.class_dropout)
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden, self.grid)).float()[None].to(self.x_embedder.proj.weight.device)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, but in the state dict as DiT keeps it
        self.blocks = nn.ModuleList([self.make_block(hidden, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, self.out_channels, adaptive=cfg.block in ("adaln_zero", "adaln", TEXT_BLOCK))
        self.initialize_weights()

    def make_block(self, hidden: int, heads: int) -> nn.Module:
        """One block of the stack (subclasses such as DyDiT make their own kind)."""
        return DiTBlock(hidden, heads, self.cfg.mlp_ratio, self.cfg.block)

    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform linears with zero biases, the patch projection like a
        linear, N(0, 0.02) for the label table and the timestep MLP; zero for every adaLN-Zero modulation
        output and for the final linear layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if not self.captions:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.block in ADALN_ZERO:
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.adaptive:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) -> (N, C, S, S)."""
        n, p, g, c = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.view(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
              context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
              pooled: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """The inputs of the block stack: ``tokens`` (N, T, D), the timestep embedding ``t_emb`` (N, D), the
        condition vector ``c`` (N, D), ``cond_tokens`` / ``cond_mask`` for the token-based designs, and
        ``n_image`` (the image tokens, which lead the sequence)."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        if self.captions:
            if pooled is None or context is None:
                raise ValueError("this DiT is caption-conditioned: give context, context_mask and pooled text embeddings")
            y_emb = self.text_pooled(pooled)
        else:
            if labels is None:
                raise ValueError("this DiT is class-conditional: give labels (the null class for unconditional)")
            y_emb = self.y_embedder(labels)
        cond_tokens, cond_mask = torch.stack([t_emb, y_emb], dim=1), None  # (N, 2, D) for the token-based designs
        if self.captions and self.cfg.block == "cross_attention":  # the text tokens join the attended sequence
            cond_tokens = torch.cat([cond_tokens, self.text_tokens(context)], dim=1)
            if context_mask is not None:
                cond_mask = torch.cat([torch.ones_like(context_mask[:, :2]), context_mask.bool()], dim=1)
        elif self.cfg.block == TEXT_BLOCK:  # t and the pooled caption go through adaLN; the tokens are attended
            cond_tokens, cond_mask = self.text_tokens(context), None if context_mask is None else context_mask.bool()
        n_image = tokens.shape[1]
        if self.cfg.block == "in_context":
            tokens = torch.cat([tokens, cond_tokens], dim=1)  # (N, T + 2, D)
        return {"tokens": tokens, "t_emb": t_emb, "c": t_emb + y_emb, "cond_tokens": cond_tokens,
                "cond_mask": cond_mask, "n_image": n_image}

    def head(self, tokens: torch.Tensor, c: torch.Tensor, n_image: int) -> torch.Tensor:
        """The final layer over the image tokens, unpatchified: (N, C_out, S, S)."""
        return self.unpatchify(self.final_layer(tokens[:, :n_image], c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                pooled: Optional[torch.Tensor] = None, block_loop: BlockLoop = plain_loop) -> torch.Tensor:
        """``block_loop``: how the blocks are run (every one in order; a ``StepCache`` reuses some while sampling)."""
        e = self.embed(x, t, labels, context, context_mask, pooled)
        tokens, c, cond_tokens, cond_mask = e["tokens"], e["c"], e["cond_tokens"], e["cond_mask"]
        tokens = block_loop(len(self.blocks),
                            lambda i, x: self.run_block(self.blocks[i], x, c, cond_tokens, cond_mask), tokens)
        return self.head(tokens, c, e["n_image"])  # (N, C_out, S, S)

    def run_block(self, block_fn: Callable[..., Any], *args: Any) -> Any:
        """``block_fn(*args)``, through activation checkpointing when ``grad_checkpointing`` is on in training
        (the activations are recomputed in the backward pass instead of kept: memory for compute)."""
        if self.cfg.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block_fn, *args, use_reentrant=False)
        return block_fn(*args)
