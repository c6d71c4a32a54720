"""Multi-head attention, used by every attention layer of the project: through
torch.nn.functional.scaled_dot_product_attention (fused kernels on GPU and for long sequences), or, for short
sequences in bf16/fp16 on the CPU, as two batched matrix products around a softmax, which measures 2-5x
faster there in training (the CPU's fused kernel is slow in its backward pass at these sizes; see
docs/dit.md)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Self-attention (context None) or cross-attention to ``context`` (N, L, context_dim).

    Self-attention keeps q, k and v in one stacked projection (``qkv``, as timm and DiT name it);
    cross-attention has ``q`` from the input and ``kv`` from the context.
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, bias: bool = True,
                 out_bias: Optional[bool] = None, causal: bool = False):
        """``bias``: biases on the q/k/v projections; ``out_bias`` on the output projection (default: ``bias``;
        Stable Diffusion has none on q/k/v and one on the output). ``causal``: each position attends only to itself
        and those before it (CLIP's text tower)."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} does not split into {heads} heads")
        self.heads = heads
        self.causal = causal
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias if out_bias is None else out_bias)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, T, D) -> (N, T, D). ``context_mask`` (N, L) is True where a context token may be attended."""
        n, t, d = x.shape
        h = self.heads
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.q(x).view(n, t, h, d // h).transpose(1, 2)  # (N, h, T, d/h)
            k, v = self.kv(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)  # (N, h, L, d/h)
        else:
            q, k, v = self.qkv(x).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (N, h, T, d/h)
        mask = context_mask[:, None, None, :] if context_mask is not None else None
        if self.causal:
            order = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T), True = may attend
            mask = order if mask is None else mask & order
        out = attention(q, k, v, mask)  # (N, h, T, d/h)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


# Largest attention-score tensor (batch x heads x queries x keys elements) for which the explicit product is
# used on the CPU in low precision. Measured on an AVX-512 bf16 CPU: 2-5x faster than the fused kernel in
# training at 64-256 tokens (batch 8-128), slower once the fp32 scores outgrow the caches (DiT-XL/2 at batch
# 32: 8.4M+ elements; 512+ tokens).
SMALL_SCORES = 8 * 2**20


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over (N, h, T, d) tensors; ``mask`` boolean, True = may attend."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and \
            q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] <= SMALL_SCORES:
        # the scale is folded into q; the CPU softmax kernel accumulates bf16/fp16 in fp32 internally
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
