"""The CLIP score of a caption-conditioned system's samples: which CLIP scores them, and the scores beside the
held-out images' own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from difflineage.data import ImageDataset
from difflineage.eval.sampling import to_unit
from difflineage.models.clip import clip_score
from difflineage.systems import load
from difflineage.systems.base import CarriesClip


def find_clip(system, clip: Optional[str | Path] = None):
    """The CLIP for the CLIP score: from ``clip`` (a checkpoint holding one: a DALL-E clip or prior stage), else
    the one the system carries; None when the system is not caption-conditioned or no CLIP is at hand."""
    if not system.caption_conditioned:
        if clip is not None:
            raise ValueError(f"--clip {clip}: the {system.config.system} checkpoint does not draw samples for captions, "
                             "so there is no CLIP score to measure")
        return None
    if clip is None:
        return system.clip_model() if isinstance(system, CarriesClip) else None
    holder = load(clip, device=system.device)
    model = holder.clip_model() if isinstance(holder, CarriesClip) else None
    if model is None:
        raise ValueError(f"{clip} holds no CLIP: give a DALL-E clip-stage checkpoint (model.stage=clip) or a "
                         "prior that carries one")
    return model


def instrument_caption_scores(clip, images: torch.Tensor, train: ImageDataset, reference: ImageDataset) -> dict[str, Any]:
    """OpenMoji's caption scores (eval/openmoji_instrument.py) of uint8 samples drawn for the reference's captions in
    turn (sample i for caption i mod len(reference), as ``evaluate`` draws them), beside the reference images' own:
    CLIP score and caption retrieval top-1/top-5 among 100 of the reference's captions, the compositional captions
    (their parts seen in training, their combination not) reported apart."""
    from difflineage.data.openmoji import compositional
    from difflineage.eval.openmoji_instrument import caption_scores

    pool = list(reference.captions)
    comp = torch.zeros(len(pool), dtype=torch.bool)
    comp[compositional(list(train.captions), pool)] = True
    ids = torch.arange(len(images)) % len(pool)
    real_ids = torch.arange(len(pool))
    out = caption_scores(clip, to_unit(images), ids, pool, {"compositional": comp[ids]})
    out.update(caption_scores(clip, to_unit(reference.images), real_ids, pool, {"compositional": comp}, suffix="_real"))
    return {"caption_instrument": "OpenMoji scoring CLIP (shipped)", **out}


def clip_scores(system, images: torch.Tensor, labels: Optional[torch.Tensor], reference: ImageDataset,
                clip=None) -> dict[str, Any]:
    """``clip_score`` of uint8 samples drawn for ``labels`` against the captions they were drawn for, and
    ``clip_score_real`` of the reference images against their own captions, with the CLIP model ``clip``;
    empty without one, or without labels and captions to score against."""
    if clip is None or labels is None or reference.captions is None:
        return {}
    clip.eval()
    return {"clip_score": clip_score(clip, to_unit(images), system.captions_for(labels)),
            "clip_score_real": clip_score(clip, to_unit(reference.images), reference.captions)}


__all__ = ["clip_scores", "find_clip", "instrument_caption_scores"]
