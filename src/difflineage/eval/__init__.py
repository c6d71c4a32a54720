"""Evaluation: sample quality the way the field measures it, and likelihood where a system has one.

- ``evaluate.py``: ``evaluate_system`` and ``score_samples``, samples scored against the data's held-out split on a
  feature network, each metric beside its real-vs-real value, and the system's own held-out scores (metrics.json).
- ``fid50k.py``: ``evaluate_adm``, FID-50K as the papers compute it, and ``write_reference_batch``.
- ``metrics.py``: FID, KID, Inception Score and precision/recall, one implementation of each.
- ``adm.py``: ADM's npz layout, reference batches and evaluator features; ``sampling.py``: seeded, sharded sampling;
  ``features.py``, ``classifier.py``, ``inception.py``: the feature networks; ``clip_score.py``: the CLIP score;
  ``flops.py``: FLOPs; ``dydit_pictures.py``: DyDiT's width and token pictures.
"""

from difflineage.eval.evaluate import evaluate_system, score_samples
from difflineage.eval.features import feature_network
from difflineage.eval.fid50k import evaluate_adm, parts_folder, write_reference_batch
from difflineage.eval.sampling import bf16_autocast, generate, quantise

__all__ = ["bf16_autocast", "evaluate_adm", "evaluate_system", "feature_network", "generate", "parts_folder",
           "quantise", "score_samples", "write_reference_batch"]
