"""A frozen text encoder: the text tower of a CLIP trained apart (a DALL-E ``clip`` stage), as Stable Diffusion uses
CLIP's, for the caption-conditioned diffusion systems (``model.text_encoder=RUN``).

The denoiser then learns from captions through a representation that images shaped first, and never changes it: the
same caption gives the same tokens at every step. The part encodes the training set's distinct captions once, before
training, and looks each batch up. The run's config records the tower's architecture and the digest of its
weights, which a fresh run checks when it loads them and a resumed or loaded one checks against its checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Optional

import torch

from difflineage.config import Config
from difflineage.errors import CheckpointError, ConfigError
from difflineage.nn.text import TextEncoder
from difflineage.systems.frozen import FrozenPart
from difflineage.weights import state_digest

CLIP_PREFIX = "clip.text_encoder."  # where a DALL-E clip stage keeps its text tower


class FrozenTextEncoder(FrozenPart):
    """Captions -> (token features (N, L, W), mask (N, L), pooled (N, W)) from a frozen ``TextEncoder``. ``attach``
    encodes the training captions once, in a fixed order, so that a step looks its batch up (and a resumed run gets
    the very numbers a straight one got); any other batch is encoded as it comes."""

    kind: ClassVar[str] = "text"
    table_limit: ClassVar[int] = 100_000  # more distinct training captions than this are encoded batch by batch
    table_batch: ClassVar[int] = 256

    def __init__(self, module: TextEncoder, spec: str):
        super().__init__(module, spec)
        self._table: dict[str, int] = {}
        self._encoded: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def load(self, weights: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
        super().load(weights, source)
        self._table, self._encoded = {}, None

    @torch.no_grad()
    def attach(self, captions: Optional[list[str]]) -> None:
        """Encode the distinct ``captions`` and the empty one (the dropped condition), in their order, in fixed
        batches; none when there are more than ``table_limit``."""
        self._table, self._encoded = {}, None
        self.module.eval()  # as in training, whatever mode the system was in (a transformer's eval path differs)
        distinct = list(dict.fromkeys(["", *(captions or [])]))
        if len(distinct) > self.table_limit:
            return
        parts = [self.module(distinct[s: s + self.table_batch]) for s in range(0, len(distinct), self.table_batch)]
        self._encoded = tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[assignment]
        self._table = {c: i for i, c in enumerate(distinct)}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._encoded is not None and all(c in self._table for c in captions):
            device = self.module.position_embedding.device
            if self._encoded[0].device != device:
                self._encoded = tuple(e.to(device) for e in self._encoded)  # type: ignore[assignment]
            index = torch.tensor([self._table[c] for c in captions], device=device)
            return tuple(e[index] for e in self._encoded)  # type: ignore[return-value]
        return self.module(captions)

    def __deepcopy__(self, memo: dict) -> "FrozenTextEncoder":
        """Shared encodings: a copy of the system holding it (the EMA's) uses the copied module and the same table."""
        copy = FrozenTextEncoder.__new__(FrozenTextEncoder)
        copy.module = memo.get(id(self.module), self.module)
        copy.spec, copy._table, copy._encoded = self.spec, self._table, self._encoded
        return copy


def resolve_text_encoder(config: Config) -> Config:
    """``model.text_encoder`` read: the CLIP stage's text architecture into ``model.text`` and its weights' digest into
    ``model.text_encoder_digest``; a checkpoint of anything else is refused by name."""
    m = config.model
    if not getattr(m, "text_encoder", ""):
        return config
    if m.condition != "caption":
        raise ConfigError(f"model.text_encoder={m.text_encoder} encodes captions, but model.condition={m.condition}; "
                          "set model.condition=caption or drop model.text_encoder")
    ckpt = clip_stage(m.text_encoder)
    digest = state_digest(ckpt.part(CLIP_PREFIX))
    return replace(config, model=replace(m, text=ckpt.config.model.clip.text, text_encoder_digest=digest))


def clip_stage(path: str):
    from difflineage.systems.dalle import DalleSystem

    return DalleSystem.stage_checkpoint(path, "text_encoder", "clip")


def load_text_encoder(part: FrozenTextEncoder, digest: str) -> None:
    """A fresh run: the CLIP stage's text tower into ``part``, checked against the digest its config recorded."""
    part.load(clip_stage(part.spec).part(CLIP_PREFIX), f"model.text_encoder={part.spec}")
    check_text_digest(part, digest, f"the CLIP stage {part.spec} changed since this run's config was made (its text "
                                    "tower's weights differ); start the run again to read it afresh")


def check_text_digest(part: FrozenTextEncoder, digest: str, problem: str) -> None:
    if digest and part.digest != digest:
        raise CheckpointError(f"frozen text encoder: {problem} (sha256 {part.digest[:12]}, recorded {digest[:12]})")


__all__ = ["FrozenTextEncoder", "check_text_digest", "load_text_encoder", "resolve_text_encoder"]
