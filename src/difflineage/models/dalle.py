"""DALL-E (Ramesh et al. 2021): a discrete VAE that turns images into grids of tokens, and one decoder-only
transformer over [caption tokens, image tokens].

Discrete VAE: the encoder gives logits over K codes at each position of an (S / 2^d)^2 grid. In training the
code is relaxed with the Gumbel-softmax (a soft one-hot at temperature tau, annealed toward 0 so it becomes
hard), the decoder reads the soft mixture of code embeddings, and the objective is an ELBO whose KL term to the
uniform prior over codes is weighted by beta (annealed up from 0, as in the paper). At inference the code is
the argmax: hard tokens.

Transformer: text tokens (a BPE vocabulary, fixed length, BOS first) followed by image tokens, each with its
own token and position embeddings; pre-norm GPT blocks with causal self-attention; separate output heads for the
text and the image vocabularies. It models the whole sequence, the text too, with the loss weighted 1/8 on text
and 7/8 on image tokens as in the paper. Sampling runs one position at a time with a key/value cache (each step
computes only the new token), with temperature, top-k and top-p (nucleus) filtering and classifier-free guidance
(the model sees an empty caption for a share of training examples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.models.vqvae import decoder, encoder
from difflineage.nn.attention import attention

# -- discrete VAE -----------------------------------------------------------------------------------


@dataclass
class DVAEConfig:
    """:param codes: vocabulary K of image tokens. :param downsample: stride-2 stages (2: 32x32 -> 8x8 tokens).
    :param tau_start, tau_end: Gumbel-softmax temperature, annealed geometrically over the first
        ``tau_anneal`` share of training (the paper: 1 -> 1/16).
    :param kl_weight: beta of the KL to the uniform prior, reached with a cosine ramp over the first
        ``kl_warmup`` share of training (the paper: 0 -> 6.6, at 192 pixel values per token; see docs/dalle.md).
    :param sigma: the decoder's Gaussian standard deviation (in [-1, 1] pixel units) for the reconstruction term.
    :param anneal_steps: the training steps those shares are of; filled in with ``train.steps`` when training starts
        (so a resumed run with another ``train.steps`` keeps its schedule); None in runs from before it existed,
        which anneal over their ``train.steps`` as they always did."""

    channels: int = 64
    res_blocks: int = 2
    downsample: int = 2
    codes: int = 512
    code_dim: int = 64
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_anneal: float = 0.8
    kl_weight: float = 6.6
    kl_warmup: float = 0.05
    sigma: float = 0.1
    anneal_steps: Optional[int] = None

    def check(self) -> None:
        if self.downsample < 1 or self.codes < 2 or self.code_dim < 1 or self.channels < 2:
            raise ConfigError("dvae needs downsample >= 1, codes >= 2, code_dim >= 1 and channels >= 2")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"dvae temperatures must satisfy 0 < tau_end <= tau_start "
                              f"(got {self.tau_start} -> {self.tau_end})")
        if not (0 <= self.tau_anneal <= 1 and 0 <= self.kl_warmup <= 1):
            raise ConfigError("dvae.tau_anneal and dvae.kl_warmup are shares of training, in [0, 1]")
        if self.kl_weight < 0 or self.sigma <= 0:
            raise ConfigError("dvae.kl_weight must be >= 0 and dvae.sigma > 0")
        if self.anneal_steps is not None and self.anneal_steps < 1:
            raise ConfigError(f"dvae.anneal_steps={self.anneal_steps} must be 1 or more (null: train.steps)")

    def temperature(self, progress: float) -> float:
        """tau at ``progress`` (0..1 of training): geometric from tau_start to tau_end, then held."""
        f = min(1.0, progress / self.tau_anneal) if self.tau_anneal > 0 else 1.0
        return self.tau_start * (self.tau_end / self.tau_start) ** f

    def beta(self, progress: float) -> float:
        """KL weight at ``progress``: a cosine ramp from 0 to kl_weight, then held."""
        f = min(1.0, progress / self.kl_warmup) if self.kl_warmup > 0 else 1.0
        return self.kl_weight * (1 - math.cos(math.pi * f)) / 2


def gumbel_softmax(logits: torch.Tensor, tau: float, dim: int = 1, hard: bool = False,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """softmax((logits + g) / tau) with g ~ Gumbel(0, 1) along ``dim``: a relaxed one-hot sample of the
    categorical softmax(logits), which tends to an exact one-hot as tau -> 0. ``hard``: the one-hot of the
    same sample (no gradient)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    e = (-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10)  # Exp(1) noise
    g = -torch.log(e)
    y = ((logits.float() + g) / tau).softmax(dim)
    if hard:
        return F.one_hot(y.argmax(dim), y.shape[dim]).movedim(-1, dim).to(y.dtype)
    return y


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform over K) = sum_k q_k log q_k + log K, per position (``dim`` removed), in nats."""
    logq = logits.float().log_softmax(dim)
    return (logq.exp() * logq).sum(dim) + math.log(logits.shape[dim])


class DiscreteVAE(nn.Module):
    """Images (N, C, S, S) <-> token grids (N, S / 2^d, S / 2^d) of K codes."""

    def __init__(self, cfg: DVAEConfig, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder(image_channels, cfg.channels, cfg.codes, cfg.downsample, cfg.res_blocks)
        self.codebook = nn.Embedding(cfg.codes, cfg.code_dim)
        self.decoder = decoder(cfg.code_dim, cfg.channels, image_channels, cfg.downsample, cfg.res_blocks)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.cfg.downsample

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) code logits."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction from the Gumbel-softmax relaxed codes, the logits)."""
        logits = self.logits(x)
        soft = gumbel_softmax(logits, tau, dim=1)  # (N, K, h, w), sums to 1 over K
        z = torch.einsum("nkhw,kd->ndhw", soft.to(self.codebook.weight.dtype), self.codebook.weight)
        return self.decoder(z), logits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Hard tokens: the most likely code at each position, (N, h, w) long."""
        return self.logits(x).argmax(1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, h, w) tokens -> images (N, C, S, S)."""
        return self.decoder(self.codebook(tokens).movedim(-1, 1))


# -- the transformer ----------------------------------------------------------------------------------


@dataclass
class DalleTransformerConfig:
    """:param text_length: caption tokens per sequence, BOS included. :param text_vocab: BPE vocabulary size
    (the tokenizer is trained to at most this many entries). :param text_loss_weight: the text tokens' share of
    the loss (the paper: 1/8; the image tokens get the rest)."""

    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_length: int = 8
    text_vocab: int = 128
    text_loss_weight: float = 0.125

    def check(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"transformer.width={self.width} must be divisible by transformer.heads={self.heads}")
        if self.text_length < 2 or self.depth < 1 or self.text_vocab < 16:
            raise ConfigError("transformer.text_length must be >= 2, depth >= 1 and text_vocab >= 16")
        if not 0 <= self.text_loss_weight < 1:
            raise ConfigError(f"transformer.text_loss_weight={self.text_loss_weight} must lie in [0, 1)")


class KVCache:
    """Keys and values of every layer for the positions computed so far, preallocated to ``capacity``."""

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, device, dtype):
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions filled (the same for every layer once a forward pass has finished)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (N, h, t, d) new keys/values after the cached ones; return all keys/values so far."""
        start, t = self.length, k.shape[2]
        if start + t > self.k.shape[3]:
            raise ValueError(f"the key/value cache holds {self.k.shape[3]} positions; {start + t} asked")
        self.k[layer, :, :, start: start + t] = k
        self.v[layer, :, :, start: start + t] = v
        return self.k[layer, :, :, : start + t], self.v[layer, :, :, : start + t]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, t, d/h)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None
        if t > 1:  # query i (at position past + i) sees keys 0 .. past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0: all) and the smallest set whose probability reaches ``top_p``
    (1: all); the rest become -inf. (N, V) -> (N, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full (the first always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class DalleTransformer(nn.Module):
    """p(text, image tokens) = prod p(token_i | tokens < i) over [text_length caption tokens, image tokens]."""

    def __init__(self, cfg: DalleTransformerConfig, image_codes: int, image_side: int):
        super().__init__()
        self.cfg = cfg
        self.image_codes, self.image_side = image_codes, image_side
        self.image_length = image_side * image_side
        w = cfg.width
        self.text_embedding = nn.Embedding(cfg.text_vocab, w)
        self.text_position = nn.Parameter(torch.randn(cfg.text_length, w) * 0.02)
        self.image_embedding = nn.Embedding(image_codes, w)
        self.image_position = nn.Parameter(torch.randn(self.image_length, w) * 0.02)
        self.blocks = nn.ModuleList([GPTBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(w)
        self.text_head = nn.Linear(w, cfg.text_vocab)
        self.image_head = nn.Linear(w, image_codes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def length(self) -> int:
        return self.cfg.text_length + self.image_length

    def embed(self, text: Optional[torch.Tensor], image: Optional[torch.Tensor], start: int = 0) -> torch.Tensor:
        """Embeddings of sequence positions ``start`` .. (text tokens first, then image tokens)."""
        parts = []
        lt = self.cfg.text_length
        if text is not None:
            parts.append(self.text_embedding(text) + self.text_position[start: start + text.shape[1]])
            start += text.shape[1]
        if image is not None:
            i0 = start - lt
            parts.append(self.image_embedding(image) + self.image_position[i0: i0 + image.shape[1]])
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def hidden(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits: text (N, Lt), image (N, Li) flattened tokens -> (text logits (N, Lt - 1, Vt)
        predicting text[1:], image logits (N, Li, K) predicting image)."""
        lt = self.cfg.text_length
        if text.shape[1] != lt:
            raise ValueError(f"expected {lt} text tokens, got {text.shape[1]}")
        h = self.hidden(self.embed(text, image[:, :-1]))  # (N, Lt + Li - 1, W); position i predicts token i + 1
        return self.text_head(h[:, : lt - 1]), self.image_head(h[:, lt - 1:])

    def loss(self, text: torch.Tensor, image: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss, text NLL, image NLL) in nats per token; padding is not a text target."""
        text_logits, image_logits = self(text, image)
        target = text[:, 1:]
        text_nll = F.cross_entropy(text_logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad_id)
        if not bool((target != pad_id).any()):  # every caption empty (all dropped): no text term
            text_nll = text_logits.sum() * 0.0
        image_nll = F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten())
        w = self.cfg.text_loss_weight
        return w * text_nll + (1 - w) * image_nll, text_nll, image_nll

    @torch.no_grad()
    def sample(self, text: torch.Tensor, null_text: Optional[torch.Tensor] = None, guidance: float = 1.0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
               use_cache: bool = True, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Image tokens (N, Li) for caption tokens (N, Lt). With ``guidance`` != 1 the logits are
        uncond + guidance * (cond - uncond), the unconditional stream reading ``null_text`` (N, Lt).
        ``use_cache=False`` recomputes the whole prefix at every step (the reference the cache must match)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"top_p={top_p} must lie in (0, 1] and top_k={top_k} be >= 0")
        n = text.shape[0]
        guided = guidance != 1.0
        if guided:
            if null_text is None:
                raise ValueError("classifier-free guidance needs the null (empty) caption's tokens")
            text = torch.cat([text, null_text])
        tokens = torch.zeros(n, 0, dtype=torch.long, device=text.device)
        cache = None
        if use_cache:
            p = next(self.parameters())
            dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
            cache = KVCache(self.cfg.depth, text.shape[0], self.cfg.heads, self.length - 1,
                            self.cfg.width // self.cfg.heads, p.device, dtype)
            h = self.hidden(self.embed(text, None), cache)[:, -1]  # the prompt, once
        for i in range(self.image_length):
            if i > 0:
                last = tokens[:, -1:]
                if guided:
                    last = torch.cat([last, last])
                if use_cache:
                    h = self.hidden(self.embed(None, last, start=self.cfg.text_length + i - 1), cache)[:, -1]
            if not use_cache:
                prefix = tokens if not guided else torch.cat([tokens, tokens])
                h = self.hidden(self.embed(text, prefix if i > 0 else None))[:, -1]
            logits = self.image_head(h).float()
            if guided:
                cond, uncond = logits[:n], logits[n:]
                logits = uncond + guidance * (cond - uncond)
            logits = filter_logits(logits / temperature, top_k, top_p)
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(text.device)
            tokens = torch.cat([tokens, nxt], 1)
            if progress is not None:
                progress(i)
        return tokens

    @torch.no_grad()
    def image_nll(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean NLL of the image tokens given the caption, nats per token, (N,)."""
        _, image_logits = self(text, image)
        return F.cross_entropy(image_logits.transpose(1, 2).float(), image, reduction="none").mean(1)
