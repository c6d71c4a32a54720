"""What the commands share: the sampling and InceptionV3 options, the sampling options as System.sample's keyword
arguments, the metrics' printed form, the held-out split of a run, and whether this process prints."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from difflineage.diffusion.gaussian import SAMPLERS


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options of System.sample that a command passes on (``sampling_options`` reads them back): each applies
    to the systems that have it, and left out it is the recipe's."""
    p.add_argument("--temperature", type=float, default=None, help="scale of the prior noise (systems that have it)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (diffusion systems, DALL-E)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion systems; respaced chain)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="diffusion sampler: ddpm, ddim or dpmpp_2m (DPM-Solver++(2M), 10-20 steps); default: the "
                        "recipe's")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="DALL-E: draw N candidates per image and keep the one its CLIP scores highest")
    p.add_argument("--top-k", type=int, default=None, help="DALL-E: sample among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="DALL-E: sample from the nucleus of probability P (1: all)")
    p.add_argument("--mode", choices=["fast", "masked", "full"], default=None,
                   help="DyDiT: fast (default: sliced weights, active tokens only), masked (every unit computed, "
                        "switched-off ones zeroed, as the released code) or full (routers off)")


def sampling_options(args) -> dict:
    """The sampling options given on the command line (those a sub-command has), by System.sample's names."""
    names = ("temperature", "guidance", "steps", "sampler", "mode", "rerank", "top_k", "top_p")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def add_data_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="data.KEY=VALUE",
                   help="other data settings, as the training run's: e.g. data.stream=true data.resize=resize "
                        "data.class_names=[...]")


def add_inception_options(p: argparse.ArgumentParser, standalone: bool) -> None:
    """The InceptionV3 options of the commands that score with it. ``standalone``: a command that only runs
    InceptionV3 (score, reference): the weights are required, and it takes its batch size, device and progress
    switch from here (evaluate has its own)."""
    p.add_argument("--inception-weights", type=Path, required=standalone, default=None, metavar="FILE",
                   help="the standard FID weights file pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    p.add_argument("--inception-resize", choices=["tf", "pytorch-fid"], default="tf",
                   help="how InceptionV3 resizes to 299 px: tf (default; the TensorFlow FID graph's TF1 bilinear, as "
                        "the papers' evaluator) or pytorch-fid (PyTorch's half-pixel bilinear, as pytorch-fid)")
    if standalone:
        p.add_argument("--batch-size", type=int, default=64, help="images per InceptionV3 call (default 64)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def format_metrics(m: dict) -> str:
    """The headline numbers of metrics.json, each beside its real-vs-real value."""
    lines = []
    if "fid" in m:
        lines.append(f"{m['samples']} samples scored on {m['feature_network']} against {m['reference_images']} "
                     f"{m['split']} images (real-vs-real: {m['real_baseline_images']} training images):")
        pairs = [("FID", "fid", "fid_real"), ("KID", "kid", "kid_real"), ("Inception Score", "inception_score",
                 "inception_score_real"), ("precision", "precision", "precision_real"), ("recall", "recall", "recall_real"),
                 ("class accuracy", "class_accuracy", "class_accuracy_real"), ("CLIP score", "clip_score", "clip_score_real")]
        for label, key, real in pairs:
            if key in m:
                lines.append(f"  {label:<16}{m[key]:>10.4f}   real-vs-real {m[real]:.4f}")
    for key in ("neg_elbo_nats", "nll_iw_nats", "nll_iw_bits_per_dim", "bits_per_dim", "recon_l1", "recon_psnr_db",
                "prior_nll_bits_per_image_token", "clip_retrieval_image_to_caption", "clip_retrieval_caption_to_image",
                "clip_score_real_pairs"):
        if key in m:
            lines.append(f"  {key:<16}{m[key]:>10.4f}")
    return "\n".join(lines)


def heldout(system):
    """The held-out split of the data ``system`` was trained on."""
    from difflineage.data import load_dataset

    return load_dataset(system.config.data, "heldout")


def is_main_process() -> bool:
    """Whether this process prints: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0
