"""DyDiT (Zhao et al., ICLR 2025): a DiT that spends less compute where the denoising task is easy.

- Timestep-wise dynamic width (TDW): in every block, two routers read the timestep embedding and switch
  attention heads (``attn_rate.router``, Linear(D, H - 1)) and MLP channel groups (``mlp_rate.router``, the MLP
  hidden layer split into H groups) on or off. Unit 0 is always on; :meth:`DyDiT.rank_units_by_importance`
  reorders heads and groups (without changing the network's function) so that unit 0 is the most important.
  The released inference code routes every unit instead (Linear(D, H)); ``keep_first=False`` is that layout,
  which its checkpoint needs.
- Spatial-wise dynamic tokens (SDT): a token router (``token_selection.mlp_head``: Linear(D, D/16) - ReLU -
  Linear(D/16, 1)) on the residual stream after the attention branch decides per token whether it goes through
  the MLP; a token that is off skips the MLP branch only (attention always sees every token).

Routers decide with a Gumbel-sigmoid and straight-through gradients in training (hard decisions forward, the
soft relaxation's gradient backward; temperature ``tau``) and with a hard threshold (logit > 0) at inference.
Router biases start large (15 for width, 35 for tokens), so a DyDiT made from a DiT starts as that DiT.

Three ways to run the blocks (``mode``):

- ``masked`` (training, and the reference): every head, channel and token is computed and the switched-off
  ones are multiplied by zero, as the released code does. Not faster than DiT.
- ``fast`` (inference): width masks depend only on the timestep, so for each distinct timestep in the batch
  the blocks run with the active heads' q/k/v rows and projection columns and the active groups' fc1 rows and
  fc2 columns sliced out of the weights (exact: GELU(0) = 0), and the MLP runs on the gathered active tokens only,
  its output added back in place. This is where the wall-clock speed-up comes from.
- ``full``: routers ignored, every unit on: the DiT the model was made from (the fine-tuning warm-up's
  second loss term).

Only the adaLN-Zero block (DiT's default, and DyDiT's) is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.models.dit import DiT, DiTBlock, DiTConfig
from difflineage.models.step_cache import BlockLoop, plain_loop
from difflineage.nn.activations import gelu_tanh
from difflineage.nn.attention import attention
from difflineage.weights import load_state_dict_strict

MODES = ("masked", "fast", "full")
WIDTH_BIAS, TOKEN_BIAS = 15.0, 35.0  # router bias at creation: every unit on


@dataclass
class DyDiTConfig:
    """:param width: timestep-wise dynamic width (head and MLP-group routers).
    :param tokens: spatial-wise dynamic tokens (token routers before the MLP).
    :param tau: temperature of the Gumbel-sigmoid in training.
    :param keep_first: unit 0 (head 0, MLP group 0) always on, the width routers Linear(D, H - 1), as the DyDiT
        training code makes them (and every DyDiT fine-tuned here); false: Linear(D, H), every unit routed, the
        layout of the released inference code and its checkpoint (dydit_0.7.pth). Read from a file's router shapes
        when one is loaded."""

    width: bool = True
    tokens: bool = True
    tau: float = 5.0
    keep_first: bool = True

    def check(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"model.dydit.tau={self.tau} must be positive")


def route(logits: torch.Tensor, tau: float, train: bool) -> torch.Tensor:
    """Binary on/off decisions from router logits. In training: Gumbel-sigmoid, hard forward, soft backward
    (straight-through): soft = sigmoid((logits + g1 - g2) / tau), hard = [soft > 0.5]. At inference: [logits > 0]."""
    if not train:
        return (logits > 0).to(logits.dtype)
    u = torch.rand((2, *logits.shape), device=logits.device, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
    g = -torch.log(-torch.log(u))  # two Gumbel(0, 1) draws
    soft = torch.sigmoid((logits.float() + g[0] - g[1]) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # value: hard; gradient: the soft relaxation's


class WidthRouter(nn.Module):
    """``router``: Linear(D, units - 1) on the timestep embedding with unit 0 always on (``keep_first``), or
    Linear(D, units), every unit routed (the released checkpoint's layout)."""

    def __init__(self, dim: int, units: int, keep_first: bool = True):
        super().__init__()
        self.keep_first = keep_first
        self.router = nn.Linear(dim, units - 1 if keep_first else units)
        nn.init.constant_(self.router.bias, WIDTH_BIAS)

    def forward(self, t_emb: torch.Tensor, tau: float, train: bool) -> torch.Tensor:
        """(N, D) -> (N, units) masks (straight-through in training)."""
        m = route(self.router(t_emb), tau, train)
        return torch.cat([torch.ones_like(m[:, :1]), m], dim=1) if self.keep_first else m


class TokenRouter(nn.Module):
    """``mlp_head``: Linear(D, D/16) - ReLU - Linear(D/16, 1) per token -> logit (token goes through the MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_head = nn.Sequential(nn.Linear(dim, max(dim // 16, 1)), nn.ReLU(), nn.Linear(max(dim // 16, 1), 1))
        nn.init.constant_(self.mlp_head[2].bias, TOKEN_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x).squeeze(-1)  # (N, T) logits


class DyDiTBlock(DiTBlock):
    """An adaLN-Zero DiT block with width and token routers (see the module docstring)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dcfg: DyDiTConfig):
        super().__init__(hidden, heads, mlp_ratio, "adaln_zero")
        self.heads, self.hidden, self.dcfg = heads, hidden, dcfg
        self.mlp_hidden = self.mlp.fc1.out_features
        if self.mlp_hidden % heads:
            raise ConfigError(f"DyDiT splits the MLP's {self.mlp_hidden} channels into {heads} groups (one per "
                              "head); choose mlp_ratio so that they divide")
        if dcfg.width:
            self.attn_rate = WidthRouter(hidden, heads, dcfg.keep_first)
            self.mlp_rate = WidthRouter(hidden, heads, dcfg.keep_first)
        if dcfg.tokens:
            self.token_selection = TokenRouter(hidden)
        self._slices: Optional[tuple] = None  # (key, sliced weights) of the last width mask (fast path); the key holds
        # each weight's version, so weights changed in place (a load, an EMA update) are sliced again
        self.token_record: Optional[list] = None  # a list to append the fast path's (N, T) token decisions to

    def train(self, mode: bool = True):
        self._slices = None  # weights are about to change (or were loaded): slice again
        return super().train(mode)

    # -- masks -----------------------------------------------------------------------------------

    def width_masks(self, t_emb: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) head masks and (N, H) MLP-group masks from the timestep embedding."""
        if not self.dcfg.width:
            ones = t_emb.new_ones(t_emb.shape[0], self.heads)
            return ones, ones
        return self.attn_rate(t_emb, self.dcfg.tau, train), self.mlp_rate(t_emb, self.dcfg.tau, train)

    # -- masked (reference / training) -----------------------------------------------------------

    def forward_masked(self, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor, train: bool,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every unit computed, switched-off ones multiplied by zero. Returns x and per-sample usage:
        ``heads``, ``groups`` (fractions on) and ``tokens`` (fraction of tokens through the MLP), each (N,)."""
        n, t, d = x.shape
        h = self.heads
        heads, groups = self.width_masks(t_emb, train)
        seen = {}

        def attention_branch(y: torch.Tensor) -> torch.Tensor:
            q, k, v = self.attn.qkv(y).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = attention(q, k, v) * heads.to(q.dtype)[:, :, None, None]  # (N, h, T, d/h)
            return self.attn.proj(a.transpose(1, 2).reshape(n, t, d))

        def mlp_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            tokens = route(self.token_selection(x), self.dcfg.tau, train) if self.dcfg.tokens else x.new_ones(n, t)
            hidden = gelu_tanh(self.mlp.fc1(y))
            hidden = hidden * groups.to(hidden.dtype).repeat_interleave(self.mlp_hidden // h, dim=1)[:, None]
            seen["tokens"] = tokens
            return x + gate[:, None] * self.mlp.fc2(hidden) * tokens.to(hidden.dtype)[..., None]

        x = self.adaln_zero(x, c, attention_branch, mlp_residual)
        return x, {"heads": heads.mean(1), "groups": groups.mean(1), "tokens": seen["tokens"].float().mean(1)}

    # -- fast (inference) ------------------------------------------------------------------------

    def active_units(self, t_emb_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the heads and MLP groups on at one timestep (``t_emb_row`` (1, D))."""
        heads, groups = self.width_masks(t_emb_row, train=False)
        return heads[0].nonzero().squeeze(1), groups[0].nonzero().squeeze(1)

    def sliced_weights(self, heads: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The active rows/columns of qkv, proj, fc1 and fc2 (kept for the last mask seen: consecutive sampler
        steps usually share it)."""
        params = (self.attn.qkv.weight, self.attn.qkv.bias, self.attn.proj.weight, self.mlp.fc1.weight,
                  self.mlp.fc1.bias, self.mlp.fc2.weight)
        key = (tuple(heads.tolist()), tuple(groups.tolist()), tuple((p.data_ptr(), p._version) for p in params))
        cache = not torch.is_grad_enabled()  # slices made with autograd on stay in their graph
        if cache and self._slices is not None and self._slices[0] == key:
            return self._slices[1]
        d, h = self.hidden, self.heads
        hd, gs = d // h, self.mlp_hidden // h
        dev = self.attn.qkv.weight.device
        head_ch = (heads.to(dev)[:, None] * hd + torch.arange(hd, device=dev)).flatten()  # channels within q (or k, v)
        qkv_rows = torch.cat([head_ch + j * d for j in range(3)])
        group_ch = (groups.to(dev)[:, None] * gs + torch.arange(gs, device=dev)).flatten()
        w_qkv, b_qkv, w_proj, w_fc1, b_fc1, w_fc2 = params
        full_heads, full_groups = len(heads) == h, len(groups) == h
        sliced = (w_qkv if full_heads else w_qkv.index_select(0, qkv_rows),
                  b_qkv if full_heads else b_qkv.index_select(0, qkv_rows),
                  w_proj if full_heads else w_proj.index_select(1, head_ch),
                  w_fc1 if full_groups else w_fc1.index_select(0, group_ch),
                  b_fc1 if full_groups else b_fc1.index_select(0, group_ch),
                  w_fc2 if full_groups else w_fc2.index_select(1, group_ch))
        self._slices = (key, sliced) if cache else None
        return sliced

    def forward_fast(self, x: torch.Tensor, c: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The block on samples that share one timestep, with only the active units and tokens computed."""
        n, t, d = x.shape
        w_qkv, b_qkv, w_proj, w_fc1, b_fc1, w_fc2 = self.sliced_weights(heads, groups)
        k, hd = len(heads), d // self.heads
        seen = {}

        def attention_branch(y: torch.Tensor) -> torch.Tensor:
            if k == 0:  # every head off (only where unit 0 is routed too): the projection of nothing, its bias
                return self.attn.proj.bias.to(y.dtype).expand(n, t, d)
            q, kk, v = F.linear(y, w_qkv, b_qkv).view(n, t, 3, k, hd).permute(2, 0, 3, 1, 4)
            a = attention(q, kk, v).transpose(1, 2).reshape(n, t, k * hd)
            return F.linear(a, w_proj, self.attn.proj.bias)

        def mlp_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            keep = self.token_selection(x) > 0 if self.dcfg.tokens else None  # (N, T)
            if self.token_record is not None:
                self.token_record.append(keep.cpu() if keep is not None else torch.ones(n, t, dtype=torch.bool))
            if keep is None or bool(keep.all()):
                y = F.linear(gelu_tanh(F.linear(h, w_fc1, b_fc1)), w_fc2, self.mlp.fc2.bias)
                seen["tokens"] = x.new_ones(n)
                return torch.addcmul(x, gate[:, None], y)
            idx = keep.flatten().nonzero().squeeze(1)  # active tokens of the flattened (N * T) batch
            y = F.linear(gelu_tanh(F.linear(h.reshape(n * t, d).index_select(0, idx), w_fc1, b_fc1)),
                         w_fc2, self.mlp.fc2.bias)
            y = y * gate.index_select(0, torch.div(idx, t, rounding_mode="floor"))
            seen["tokens"] = keep.float().mean(1)
            return x.reshape(n * t, d).index_add(0, idx, y.to(x.dtype)).view(n, t, d)

        x = self.adaln_zero(x, c, attention_branch, mlp_residual)
        return x, {"heads": x.new_full((n,), k / self.heads), "groups": x.new_full((n,), len(groups) / self.heads),
                   "tokens": seen["tokens"]}


class DyDiT(DiT):
    """A class- or caption-conditioned adaLN-Zero DiT with DyDiT's routers; parameter names are the official
    DiT's plus, per block, ``attn_rate.router``, ``mlp_rate.router`` and ``token_selection.mlp_head.{0,2}``
    (the released DyDiT checkpoints' names).

    ``forward(..., mode=None, return_usage=False)``: ``mode`` defaults to ``masked`` in training and to
    ``inference_mode`` (``fast`` unless set) in eval mode; with ``return_usage`` it also returns per-sample fractions ``heads``, ``groups``, ``tokens``
    of shape (N, depth).
    """

    def __init__(self, cfg: DiTConfig, in_channels: int, input_size: int, num_classes: int,
                 context_dim: Optional[int] = None, dynamic: Optional[DyDiTConfig] = None):
        if cfg.block != "adaln_zero":
            raise ConfigError(f"DyDiT makes adaLN-Zero DiT blocks dynamic; model.dit.block={cfg.block!r} is not one")
        self.dynamic = dynamic or DyDiTConfig()
        self.inference_mode = "fast"  # the mode of eval-mode calls that name none
        super().__init__(cfg, in_channels, input_size, num_classes, context_dim)

    def make_block(self, hidden: int, heads: int) -> nn.Module:
        return DyDiTBlock(hidden, heads, self.cfg.mlp_ratio, self.dynamic)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        for m in self.modules():  # the routers' biases start every unit on (super() zeroed every linear bias)
            if isinstance(m, WidthRouter):
                nn.init.constant_(m.router.bias, WIDTH_BIAS)
            elif isinstance(m, TokenRouter):
                nn.init.constant_(m.mlp_head[2].bias, TOKEN_BIAS)

    # -- FLOPs ---------------------------------------------------------------------------------------

    def block_macs(self) -> tuple[int, int]:
        """Multiply-accumulates per image of one block's attention (qkv, scores, values, projection) and MLP."""
        d, t = self.blocks[0].hidden, self.grid * self.grid
        return 4 * t * d * d + 2 * t * t * d, 2 * t * d * self.blocks[0].mlp_hidden

    def static_macs(self) -> int:
        """Multiply-accumulates per image of everything the routers do not touch: patch embedding, timestep and
        condition embedders, the blocks' adaLN regressions and the final layer."""
        d, t, p = self.blocks[0].hidden, self.grid * self.grid, self.patch
        macs = t * d * self.in_channels * p * p  # patch embedding
        macs += self.t_embedder.frequency_dim * d + d * d  # timestep MLP
        macs += len(self.blocks) * d * 6 * d + d * 2 * d  # adaLN-Zero regressions, final adaLN
        macs += t * d * p * p * self.out_channels  # final linear
        if self.captions:
            macs += self.text_pooled.in_features * d
        return macs

    def flops_ratio(self, usage: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample share of the whole network's arithmetic that is computed with the routers' decisions,
        (N,): (static + sum_l [attn * heads_l + mlp * groups_l * tokens_l]) / (static + depth * (attn + mlp)),
        where static is what the routers do not touch (:meth:`static_macs`)."""
        attn, mlp = self.block_macs()
        static = self.static_macs()
        kept = attn * usage["heads"] + mlp * usage["groups"] * usage["tokens"]
        return (static + kept.sum(1)) / (static + len(self.blocks) * (attn + mlp))

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                pooled: Optional[torch.Tensor] = None, mode: Optional[str] = None, return_usage: bool = False,
                block_loop: BlockLoop = plain_loop):
        mode = mode or ("masked" if self.training else self.inference_mode)
        if mode not in MODES:
            raise ValueError(f"unknown DyDiT mode {mode!r}; choose one of {', '.join(MODES)}")
        e = self.embed(x, t, labels, context, context_mask, pooled)
        tokens, c, t_emb = e["tokens"], e["c"], e["t_emb"]
        if mode == "full":
            ones = tokens.new_ones(len(tokens))
            tokens, usage = self._run_blocks(tokens, lambda i, x: (
                self.run_block(DiTBlock.forward, self.blocks[i], x, c), {"heads": ones, "groups": ones, "tokens": ones}),
                block_loop)
        elif mode == "masked":
            tokens, usage = self._run_blocks(tokens, lambda i, x: self.run_block(self.blocks[i].forward_masked, x, c,
                                                                                 t_emb, self.training), block_loop)
        else:
            tokens, usage = self._forward_fast(tokens, c, t_emb, t, block_loop)
        out = self.head(tokens, c, e["n_image"])
        if not return_usage:
            return out
        return out, {k: torch.stack([u[k] for u in usage], dim=1) for k in ("heads", "groups", "tokens")}

    def _forward_fast(self, tokens: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor, t: torch.Tensor,
                      block_loop: BlockLoop):
        """Blocks on sliced weights, one group of samples per distinct timestep (width masks depend on t only)."""
        values, inverse = torch.unique(t, return_inverse=True)
        if len(values) == 1:
            return self._run_fast(tokens, c, t_emb[:1], block_loop)
        if block_loop is not plain_loop:
            raise ValueError("step caching follows one sampler step per network call: all samples must share a timestep")
        out = torch.empty_like(tokens)
        parts: list[tuple[torch.Tensor, list]] = []
        for i in range(len(values)):
            idx = (inverse == i).nonzero().squeeze(1)
            y, u = self._run_fast(tokens.index_select(0, idx), c.index_select(0, idx), t_emb[idx[:1]])
            out = out.index_copy(0, idx, y.to(out.dtype))
            parts.append((idx, u))
        usage = []
        for layer in range(len(self.blocks)):
            merged = {}
            for k in ("heads", "groups", "tokens"):
                v = tokens.new_empty(len(tokens))
                for idx, u in parts:
                    v[idx] = u[layer][k].to(v.dtype)
                merged[k] = v
            usage.append(merged)
        return out, usage

    def _run_fast(self, tokens: torch.Tensor, c: torch.Tensor, t_emb_row: torch.Tensor,
                  block_loop: BlockLoop = plain_loop):
        return self._run_blocks(tokens, lambda i, x: self.blocks[i].forward_fast(x, c, *self.blocks[i].active_units(t_emb_row)),
                                block_loop)

    def _run_blocks(self, tokens: torch.Tensor, step: Callable[[int, torch.Tensor], tuple[torch.Tensor, dict]],
                    block_loop: BlockLoop):
        """The block stack through ``block_loop`` (DiT's), ``step(i, x)`` -> (x, usage) for block i. A block the loop
        does not compute (a step cache adds its residual of the step before) counts no units."""
        zero = tokens.new_zeros(len(tokens))
        usage = [{"heads": zero, "groups": zero, "tokens": zero} for _ in self.blocks]

        def block(i: int, x: torch.Tensor) -> torch.Tensor:
            y, usage[i] = step(i, x)
            return y

        return block_loop(len(self.blocks), block, tokens), usage

    # -- making a DyDiT from a DiT ------------------------------------------------------------------

    @torch.no_grad()
    def rank_units_by_importance(self) -> None:
        """Reorder every block's heads and MLP channels by weight magnitude, most important first, so that the
        always-on unit 0 (head 0, channel group 0) is the most important one. The network's function is
        unchanged: q/k/v rows and projection columns move together per head, fc1 rows (and bias) and fc2
        columns together per channel. Call before fine-tuning (the routers' outputs are not permuted)."""
        for block in self.blocks:
            d, h = block.hidden, block.heads
            hd = d // h
            qkv, proj, fc1, fc2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
            head_score = qkv.weight.abs().view(3, h, hd, d).sum(dim=(0, 2, 3)) + proj.weight.abs().view(d, h, hd).sum(dim=(0, 2))
            order = torch.argsort(head_score, descending=True, stable=True)
            ch = (order[:, None] * hd + torch.arange(hd, device=order.device)).flatten()
            rows = torch.cat([ch + j * d for j in range(3)])
            qkv.weight.copy_(qkv.weight[rows])
            qkv.bias.copy_(qkv.bias[rows])
            proj.weight.copy_(proj.weight[:, ch])
            channel_score = fc1.weight.abs().sum(1) + fc2.weight.abs().sum(0)
            order = torch.argsort(channel_score, descending=True, stable=True)
            fc1.weight.copy_(fc1.weight[order])
            fc1.bias.copy_(fc1.bias[order])
            fc2.weight.copy_(fc2.weight[:, order])

    def load_dit_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a DiT state dict (the DiT's keys, no routers): strict about every DiT key, routers kept as made."""
        routers = {k: v for k, v in self.state_dict().items() if is_router_key(k)}
        load_state_dict_strict(self, {**state, **routers}, source)


def is_router_key(key: str) -> bool:
    return any(f".{name}." in key for name in ("attn_rate", "mlp_rate", "token_selection"))


def router_keys_of(state: dict[str, Any]) -> list[str]:
    return [k for k in state if is_router_key(k)]
