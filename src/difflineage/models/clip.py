"""A small CLIP (Radford et al. 2021): an image encoder and a text encoder trained contrastively so that an
image and its caption embed close together, used by DALL-E to rerank its samples and as the CLIP-score metric
of caption-conditioned systems.

Both encoders end in a linear projection to a shared space; embeddings are L2-normalised and compared by
cosine similarity times a learned temperature (``logit_scale``, initialised to 1 / 0.07 as in the paper).
The loss is the symmetric cross-entropy over a batch's image-caption similarity matrix. Datasets whose
captions repeat (a caption per class) give a batch several true pairs per caption: with ``targets="caption"``
every image whose caption equals the row's is a positive, with equal target mass, instead of a false negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.errors import ConfigError
from difflineage.nn.text import TextEncoder, TextEncoderConfig


@dataclass
class CLIPConfig:
    """:param embed: width of the shared embedding space. :param channels: width of the first image conv
    stage (doubled at each of three stride-2 stages)."""

    embed: int = 64
    channels: int = 32
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def check(self) -> None:
        if self.embed < 2 or self.channels < 1:
            raise ConfigError("clip.embed must be >= 2 and clip.channels >= 1")
        self.text.check()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     same: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE over normalised (N, E) embeddings. ``same`` (N, N) bool marks pairs that are true
    matches (default: the diagonal); each row's (and column's) target spreads evenly over its matches."""
    logits = logit_scale * image_emb @ text_emb.t()  # (N images, N captions)
    if same is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    t = same.float()
    return (F.cross_entropy(logits, t / t.sum(1, keepdim=True)) + F.cross_entropy(logits.t(), t.t() / t.t().sum(1, keepdim=True))) / 2


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.image_encoder = nn.Sequential(
            nn.Conv2d(image_channels, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8 if c % 4 == 0 else 1, 2 * c), nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1), nn.GroupNorm(8 if c % 4 == 0 else 1, 4 * c), nn.GELU(),
            nn.Conv2d(4 * c, 8 * c, 4, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_projection = nn.Linear(8 * c, cfg.embed)
        self.text_encoder = TextEncoder(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, embed), unit length."""
        return F.normalize(self.image_projection(self.image_encoder(images)).float(), dim=-1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """N captions -> (N, embed), unit length."""
        return F.normalize(self.text_projection(self.text_encoder(captions, trim=True)[2]).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp()  # the paper clips the temperature at 100

    def loss(self, images: torch.Tensor, captions: list[str], targets: str = "caption") -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive loss, image->caption top-1 accuracy in the batch) for a batch of pairs."""
        img, txt = self.encode_image(images), self.encode_text(captions)
        same = None
        if targets == "caption":
            ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
            cid = torch.tensor([ids[c] for c in captions], device=img.device)
            same = cid[:, None] == cid[None, :]
        loss = contrastive_loss(img, txt, self.scale(), same)
        with torch.no_grad():
            hit = (img @ txt.t()).argmax(1)
            acc = (same[torch.arange(len(hit)), hit] if same is not None else hit == torch.arange(len(hit), device=hit.device))
        return loss, acc.float().mean()

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its caption, (N,)."""
        return (self.encode_image(images) * self.encode_text(captions)).sum(-1)


def clip_score(clip: CLIP, images: torch.Tensor, captions: list[str], batch: int = 250) -> float:
    """The CLIP score of images against their captions: 100 x mean max(cosine, 0) (Hessel et al. 2021 without
    their 2.5 rescaling; torchmetrics' convention). ``images`` in [-1, 1]."""
    device = next(clip.parameters()).device
    total = 0.0
    for s in range(0, len(images), batch):
        cos = clip.score(images[s: s + batch].to(device), captions[s: s + batch])
        total += cos.clamp_min(0).sum().item()
    return 100.0 * total / max(1, len(images))


@torch.no_grad()
def retrieval_accuracy(clip: CLIP, images: torch.Tensor, captions: list[str], batch: int = 250) -> dict[str, float]:
    """Held-out retrieval: ``image_to_caption`` is the share of images whose most similar caption (among the
    distinct captions of the set) is their own; ``caption_to_image`` the share of captions whose most similar
    image (among the set's images, in groups of ``batch``) carries that caption."""
    device = next(clip.parameters()).device
    distinct = list(dict.fromkeys(captions))
    txt = clip.encode_text(distinct)
    cid = torch.tensor([distinct.index(c) for c in captions])
    img = torch.cat([clip.encode_image(images[s: s + batch].to(device)) for s in range(0, len(images), batch)]).cpu()
    i2t = ((img @ txt.cpu().t()).argmax(1) == cid).float().mean().item()
    hits, count = 0, 0
    for s in range(0, len(images), batch):
        g_img, g_cid = img[s: s + batch], cid[s: s + batch]
        for c in g_cid.unique():
            best = (g_img @ txt[c].cpu()).argmax()
            hits += int(g_cid[best] == c)
            count += 1
    return {"image_to_caption": i2t, "caption_to_image": hits / max(1, count)}
