"""The three conditioning blocks other than adaLN-Zero (adaLN, cross-attention, in-context; DiT paper, section 3.2)
against an independent implementation: each whole model's forward pass rebuilt from torch's own
``nn.MultiheadAttention`` and written-out LayerNorm, modulation and MLP, with the model's weights copied in. The
adaLN-Zero block is checked against the official checkpoints elsewhere (tests/test_dit_interop.py); these three
have no released code, so a fault in them would otherwise show only as slow learning (the design-space study)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.models.dit import DiT, DiTConfig


def reference_mha(attn, hidden: int, heads: int) -> nn.MultiheadAttention:
    """torch's multi-head attention carrying the weights of our ``Attention`` (self: ``qkv``; cross: ``q`` + ``kv``)."""
    mha = nn.MultiheadAttention(hidden, heads, batch_first=True)
    with torch.no_grad():
        if attn.cross:
            mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            mha.in_proj_weight.copy_(attn.qkv.weight)
            mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha.eval()


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def mlp(block, x: torch.Tensor) -> torch.Tensor:
    h = x @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))  # GELU, tanh form
    return h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def reference_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's description of each block, written out. Embeddings (patches, timestep, label) are the model's
    own modules, which the adaLN-Zero model shares and the official checkpoints check."""
    cfg = model.cfg
    depth, hidden, heads, patch = cfg.resolved()
    tokens = model.x_embedder(x) + model.pos_embed
    t_emb, y_emb = model.t_embedder(t), model.y_embedder(y)
    c = t_emb + y_emb
    pair = torch.stack([t_emb, y_emb], dim=1)  # "the embeddings of t and c as two tokens"
    n_image = tokens.shape[1]
    if cfg.block == "in_context":
        tokens = torch.cat([tokens, pair], dim=1)
    for block in model.blocks:
        self_attn = reference_mha(block.attn, hidden, heads)
        if cfg.block == "adaln":  # LayerNorm whose scale and shift are regressed from c, no gates
            mod = F.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
            shift1, scale1, shift2, scale2 = mod.split(hidden, dim=1)
            h = layer_norm(tokens) * (1 + scale1[:, None]) + shift1[:, None]
            tokens = tokens + self_attn(h, h, h, need_weights=False)[0]
            tokens = tokens + mlp(block, layer_norm(tokens) * (1 + scale2[:, None]) + shift2[:, None])
            continue
        h = layer_norm(tokens)
        tokens = tokens + self_attn(h, h, h, need_weights=False)[0]
        if cfg.block == "cross_attention":  # a cross-attention layer after self-attention, over the two tokens
            cross = reference_mha(block.cross_attn, hidden, heads)
            tokens = tokens + cross(layer_norm(tokens), pair, pair, need_weights=False)[0]
        tokens = tokens + mlp(block, layer_norm(tokens))
    out = layer_norm(tokens[:, :n_image])
    final = model.final_layer
    if final.adaptive:
        mod = F.silu(c) @ final.adaLN_modulation[1].weight.T + final.adaLN_modulation[1].bias
        shift, scale = mod.split(hidden, dim=1)
        out = out * (1 + scale[:, None]) + shift[:, None]
    out = out @ final.linear.weight.T + final.linear.bias  # (N, T, p * p * C_out)
    n, g, ch = x.shape[0], model.grid, model.out_channels
    return out.view(n, g, g, patch, patch, ch).permute(0, 5, 1, 3, 2, 4).reshape(n, ch, g * patch, g * patch)


@pytest.mark.parametrize("block", ["adaln", "cross_attention", "in_context"])
def test_block_matches_an_independent_implementation(block):
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=32, heads=4, patch=2, block=block), in_channels=4, input_size=8,
                num_classes=10).eval()
    with torch.no_grad():  # the zero-initialised outputs would hide the blocks' work: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        ours, theirs = model(x, t, y), reference_forward(model, x, t, y)
    assert ours.shape == (3, 8, 8, 8)
    assert theirs.abs().mean() > 0.1  # a live output, not zeros on both sides
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # and the label reaches the output: another class changes it
    with torch.no_grad():
        other = model(x, t, torch.tensor([3, 2, 1]))
    assert (other - ours).abs().max() > 1e-3
