"""What the commands share: the sampling and InceptionV3 options, the sampling options as System.sample's keyword
arguments, the metrics' printed form, the held-out split of a run, and whether this process prints."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from difflineage.systems import SYSTEMS


def declared_sampling_options() -> dict[str, dict]:
    """Every sampling option a command offers, as the systems declare them (``System.SampleOptions``): name ->
    {type, help, choices, systems: the registered systems that take it}."""
    out: dict[str, dict] = {}
    for name, cls in SYSTEMS.items():
        for option, control in cls.SampleOptions.controls().items():
            out.setdefault(option, {**control, "systems": []})["systems"].append(name)
    return out


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The declared options of System.sample that a command passes on (``sampling_options`` reads them back): each
    applies to the systems that declare it, and left out it is the recipe's."""
    for name, control in declared_sampling_options().items():
        kwargs = {"type": control["type"], "default": None,
                  "help": f"{control['help']} ({', '.join(control['systems'])}); default: the recipe's"}
        if control["choices"]:
            kwargs["choices"] = list(control["choices"])
        # the field's other names as flags too (the official DiT scripts' --cfg-scale and --num-sampling-steps)
        flags = ["--" + n.replace("_", "-") for n in (name, *control["aliases"]) if n != "num_inference_steps"]
        p.add_argument(*flags, dest=name, **kwargs)


def sampling_options(args) -> dict:
    """The sampling options given on the command line (those a sub-command has), by System.sample's names."""
    return {k: getattr(args, k) for k in declared_sampling_options() if getattr(args, k, None) is not None}


def add_device_option(p: argparse.ArgumentParser, per_process: bool = False) -> None:
    """``--device``, ``auto`` by default in every command (CUDA where a GPU is visible, else the CPU). A command
    that may run under torchrun (``per_process``) leaves ``auto`` for each process to resolve to its own GPU; the
    others take the resolved device."""
    p.add_argument("--device", type=str if per_process else _device, default="auto",
                   help="auto (default: CUDA where a GPU is visible, else the CPU), cpu or cuda")


def _device(value: str) -> str:
    from difflineage.train.distributed import pick_device

    if value not in ("auto", "cpu") and not value.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: give auto, cpu or cuda")
    return str(pick_device(value)) if value == "auto" else value


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
        add_device_option(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def format_metrics(m: dict) -> str:
    """The headline numbers of metrics.json, each beside its real-vs-real value."""
    lines = []
    if "fid" in m:
        lines.append(f"{m['samples']} samples scored on {m['feature_network']} against {m['reference_images']} "
                     f"{m['split']} images (real-vs-real: {m['real_baseline_images']} training images):")
        pairs = [("FID", "fid", "fid_real"), ("KID", "kid", "kid_real"), ("Inception Score", "inception_score",
                 "inception_score_real"), ("precision", "precision", "precision_real"), ("recall", "recall", "recall_real"),
                 ("class accuracy", "class_accuracy", "class_accuracy_real"), ("CLIP score", "clip_score", "clip_score_real"),
                 ("retrieval top-1", "retrieval_top1", "retrieval_top1_real"),
                 ("retrieval top-5", "retrieval_top5", "retrieval_top5_real"),
                 ("  compositional", "retrieval_compositional_top5", "retrieval_compositional_top5_real")]
        for label, key, real in pairs:
            if key in m:
                beside = "real images" if key.startswith("retrieval") else "real-vs-real"
                lines.append(f"  {label:<16}{m[key]:>10.4f}   {beside} {m[real]:.4f}")
        if "retrieval_candidates" in m:
            lines.append(f"  (caption retrieval: each image's own caption ranked among {m['retrieval_candidates']} by the "
                         "shipped scoring CLIP; chance is 1% top-1, 5% top-5)")
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
