"""The ``difflineage`` command: quickstart, train, sample, evaluate, score, extract, convert, info, demo.

Every sub-command explains its options with ``--help``. Errors in the user's input (config,
data, checkpoint) print one message naming the problem and the fix, and exit with status 2;
a diverged run exits with status 1 and leaves its last good checkpoint in place.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

# Each system's quickstart: its stages in order, as (recipe, run sub-directory or "" for the run itself,
# overrides of that stage). An override may name an earlier stage's checkpoint as {SUB-DIRECTORY}.
# The first entry is the default system (the flagship).
QUICKSTART_RECIPES = {
    "dit": [("autoencoder-mnist", "autoencoder", ["train.steps=800"]),
            ("dit-mnist", "", ["model.first_stage={autoencoder}"])],
    "vae": [("vae-mnist", "", [])],
    "ddpm": [("ddpm-mnist", "", [])],
    "ldm": [("autoencoder-mnist", "autoencoder", []), ("ldm-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae": [("vqvae-mnist", "autoencoder", []), ("vqvae-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae2": [("vqvae2-mnist", "autoencoder", []), ("vqvae2-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "dalle": [("dalle-dvae-mnist", "dvae", []), ("dalle-clip-mnist", "clip", []),
              ("dalle-mnist", "", ["model.first_stage={dvae}", "model.clip_stage={clip}"])],
}
DEFAULT_SYSTEM = next(iter(QUICKSTART_RECIPES))


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from difflineage.errors import CheckpointError, ConfigError, DataError, RunDirError, StorageError, TrainingDiverged

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, CheckpointError, RunDirError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped at once by a second interrupt; the last checkpoint written is intact", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflineage", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="train the default recipe of a system on mnist5k, then sample and score it",
                       description="Train a system's ready-made recipe on the embedded mnist5k digits, write a sample "
                                   "grid, pictures and held-out metrics, and print where they are. Re-running resumes "
                                   "an interrupted quickstart.")
    q.add_argument("--system", default=DEFAULT_SYSTEM, choices=list(QUICKSTART_RECIPES),
                   help=f"which system (default: {DEFAULT_SYSTEM}, the flagship)")
    q.add_argument("--out", type=Path, default=None, help="run directory (default: runs/quickstart-SYSTEM)")
    q.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe values of the final stage, e.g. train.steps=500, of a named "
                        "earlier stage, e.g. autoencoder-mnist:train.steps=400, or of every stage, e.g. "
                        "'*:train.bf16=false'")
    q.add_argument("--eval-k", type=int, default=200, help="importance samples per image for the held-out NLL (default 200)")
    q.add_argument("--eval-n", type=int, default=500, help="samples scored with FID/KID/IS/precision/recall (default 500)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train from a config file or recipe name",
                       description="Train from a YAML config (or a recipe name from configs/). Runs under torchrun "
                                   "as DistributedDataParallel: torchrun --nproc_per_node N -m difflineage train CONFIG.")
    t.add_argument("config", nargs="?", help="YAML file or recipe name (e.g. vae-mnist); optional with --resume")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. model.latent_dim=2 train.steps=2000")
    t.add_argument("--out", type=Path, default=None, help="run directory (default: runs/CONFIG-NAME)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue exactly from the latest checkpoint of --out (or from CKPT)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, or --resume, such a directory is refused)")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="write a checkpoint and stop at STEP, as an interruption would (for time-sliced jobs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a checkpoint into a grid PNG",
                       description="Draw samples from a checkpoint (or a run directory's latest one).")
    s.add_argument("checkpoint", type=Path, help="checkpoint directory or run directory")
    s.add_argument("--n", type=int, default=64,
                   help="number of samples (default 64; without --label, a whole number per class, one row each)")
    s.add_argument("--label", type=int, default=None, help="class to draw (class-conditional systems); default: all classes in turn")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="grid PNG to write (default samples.png)")
    s.add_argument("--npz", type=Path, default=None, help="also write the samples as uint8 N x H x W x C (arr_0), ADM's layout")
    s.add_argument("--nrow", type=int, default=None, help="images per grid row (default: one row per class, or square)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--temperature", type=float, default=None, help="scale of the prior noise (systems that support it)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (diffusion systems, DALL-E)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion systems; respaced chain)")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"], default=None,
                   help="diffusion sampler: ddpm, ddim or dpmpp_2m (DPM-Solver++(2M), 10-20 steps); default: the recipe's")
    s.add_argument("--caption", default=None, help="caption to draw (caption-conditioned systems)")
    s.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="DALL-E: draw N candidates per image and keep the one its CLIP scores highest")
    s.add_argument("--top-k", type=int, default=None, help="DALL-E: sample among the K most likely tokens (0: all)")
    s.add_argument("--top-p", type=float, default=None, help="DALL-E: sample from the nucleus of probability P (1: all)")
    s.add_argument("--mode", choices=["fast", "masked", "full"], default=None,
                   help="DyDiT: fast (default: sliced weights, active tokens only), masked (every unit computed, switched-off ones zeroed, as the released code) or full (routers off)")
    s.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    s.add_argument("--pictures", type=Path, default=None, metavar="DIR",
                   help="also write the system's own pictures into DIR (VAE: reconstructions of held-out images, "
                        "interpolations, and the latent manifold when the latent is 2-D)")
    s.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (faster on AVX-512 bf16 CPUs and GPUs)")
    s.add_argument("--fast", action="store_true",
                   help="the fastest sampling here: DPM-Solver++ (20 steps unless --steps), a step cache for DiT and "
                        "DyDiT calibrated on the model, bf16 autocast where native; also draws the plain samples and "
                        "prints the difference")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score a checkpoint: FID/KID/IS/precision/recall, class accuracy, likelihood",
                       description="Draw --n samples (in batches; spread over processes under torchrun), score them "
                                   "against the held-out split with FID, KID, Inception Score and precision/recall on a "
                                   "feature network, each beside its real-vs-real value at the same count; add the class "
                                   "accuracy of conditional samples and the system's own held-out scores (VAE: ELBO and "
                                   "importance-weighted NLL). Writes metrics.json.")
    e.add_argument("checkpoint", type=Path, help="checkpoint directory or run directory")
    e.add_argument("--n", "--num-samples", dest="n", type=int, default=1000,
                   help="samples to draw and score (default 1000; 0 skips sample metrics). Under torchrun write "
                        "--num-samples: torchrun reads --n as one of its own options")
    e.add_argument("--features", default="auto", choices=["auto", "mnist", "inception"],
                   help="feature network: the MNIST classifier (1-channel data, the auto choice) or InceptionV3")
    add_inception_options(e, standalone=False)
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (systems that have it)")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (systems that have them)")
    e.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp_2m"], default=None,
                   help="diffusion sampler: ddpm, ddim or dpmpp_2m (DPM-Solver++(2M)); default: the recipe's")
    e.add_argument("--temperature", type=float, default=None, help="sampling temperature (systems that have it)")
    e.add_argument("--mode", choices=["fast", "masked", "full"], default=None,
                   help="DyDiT: fast (default: sliced weights, active tokens only), masked (every unit computed, switched-off ones zeroed, as the released code) or full (routers off)")
    e.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="DALL-E: draw N candidates per sample and keep the one its CLIP scores highest")
    e.add_argument("--top-k", type=int, default=None, help="DALL-E: sample among the K most likely tokens (0: all)")
    e.add_argument("--top-p", type=float, default=None, help="DALL-E: sample from the nucleus of probability P (1: all)")
    e.add_argument("--clip", type=Path, default=None, metavar="CKPT",
                   help="caption-conditioned systems: the CLIP for the CLIP score (a DALL-E clip-stage checkpoint); "
                        "default: the CLIP the system carries, if any")
    e.add_argument("--reference", type=Path, default=None, metavar="NPZ",
                   help="FID-50K as the papers: score against this ADM reference batch (e.g. "
                        "VIRTUAL_imagenet256_labeled.npz) with the ADM evaluator's conventions; the samples are drawn "
                        "into NPZ.parts/ over the torchrun processes (run the command again to continue an interrupted "
                        "run), labels uniform, DiT/DyDiT at 250 DDPM steps and guidance 1.5 unless told otherwise, then "
                        "merged into --npz. Needs --inception-weights")
    e.add_argument("--keep-parts", action="store_true", help="with --reference: keep NPZ.parts/ after the merge")
    e.add_argument("--batch-size", type=int, default=250, help="samples per sampling batch (default 250)")
    e.add_argument("--npz", type=Path, default=None,
                   help="also save the samples as ADM's samples.npz (arr_0, uint8 NHWC); with --reference, where the "
                        "merged samples go (default CHECKPOINT/samples_N.npz)")
    e.add_argument("--split", default="heldout", choices=["heldout", "train"], help="reference split (default heldout)")
    e.add_argument("--k", type=int, default=1000, help="VAE: importance samples per image for the NLL bound (default 1000)")
    e.add_argument("--bpd-images", type=int, default=100,
                   help="diffusion: held-out images for the bits/dim bound (default 100; 0 skips it)")
    e.add_argument("--bpd-steps", type=int, default=None,
                   help="diffusion: steps of the chain for the bound (default: all T; fewer gives that chain's bound)")
    e.add_argument("--out", type=Path, default=None, help="metrics JSON to write (default: CHECKPOINT/metrics.json)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    e.add_argument("--bf16", action="store_true",
                   help="draw the samples under bfloat16 autocast (the held-out likelihood stays fp32); docs/dit.md "
                        "compares the scores with and without")
    e.add_argument("--fast", action="store_true",
                   help="draw the samples the fastest way here (as sample --fast: DPM-Solver++ at 20 steps unless "
                        "--steps, a step cache for DiT and DyDiT calibrated on the model, bf16 autocast where native); "
                        "metrics.json records the choices (docs/sampling.md measures what they cost in FID)")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("extract", help="encode a training set once with a frozen first stage into a latent store",
                       description="Encode every training image, and its mirror image, with a frozen first stage into "
                                   "a sharded latent store (posterior mean and std, or code maps) that two-stage "
                                   "systems train from with data.latents=STORE. Runs under torchrun (each process "
                                   "encodes its share of the shards); run again to finish an interrupted extraction.")
    x.add_argument("--first-stage", required=True, metavar="RUN_OR_FILE",
                   help="an autoencoder_kl run, a Stable Diffusion VAE file (sd-vae:PATH or the path), a VQ-VAE / "
                        "VQ-VAE-2 autoencoder run or a DALL-E dVAE run")
    x.add_argument("--data", required=True, metavar="SOURCE", help="the data source (imagenet:PATH, folder:PATH, mnist5k, ...)")
    x.add_argument("--out", required=True, type=Path, metavar="STORE", help="the store's folder")
    x.add_argument("--image-size", type=int, required=True, help="the side the images are cropped to (data.image_size)")
    x.add_argument("--channels", type=int, default=None, help="image channels (default: the first stage's)")
    x.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="data.KEY=VALUE",
                   help="other data settings, e.g. data.stream=true data.resize=resize")
    x.add_argument("--shard-size", type=int, default=16384, help="images per shard (default 16384)")
    x.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    x.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage type of the moments")
    x.add_argument("--workers", type=int, default=None, help="decoding worker processes (streamed sources)")
    x.add_argument("--device", default="auto", help="auto, cpu or cuda")
    x.add_argument("--vae-norm-groups", type=int, default=32,
                   help="GroupNorm groups of a Stable Diffusion VAE file given as --first-stage (32 in Stable Diffusion)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_extract)

    r = sub.add_parser("score", help="score an ADM-layout sample npz against an ADM reference batch (FID-50K etc.)",
                       description="FID, sFID, Inception Score and precision/recall of samples (uint8 N x H x W x 3 in "
                                   "arr_0, as 'sample --npz' and 'evaluate --npz' write them) against an ADM reference "
                                   "batch (e.g. VIRTUAL_imagenet256_labeled.npz), computed as ADM's evaluator does: the "
                                   "numbers the DiT and DyDiT papers report.")
    r.add_argument("samples", type=Path, help="sample batch .npz (arr_0)")
    r.add_argument("--reference", type=Path, required=True, help="ADM reference batch .npz (arr_0, mu, sigma, mu_s, sigma_s)")
    r.add_argument("--out", type=Path, default=None, help="also write the scores as JSON")
    add_inception_options(r, standalone=True)
    r.set_defaults(func=cmd_score)

    f = sub.add_parser("reference", help="write an ADM reference batch of a data source's held-out images",
                       description="Write a reference batch in ADM's layout (arr_0 images, mu/sigma pool statistics, "
                                   "mu_s/sigma_s spatial statistics) from --n images spread over a split of a data "
                                   "source, cropped as training crops them, for `evaluate --reference` and `score`. "
                                   "For data of one's own; ImageNet-256 FID-50K is scored against ADM's "
                                   "VIRTUAL_imagenet256_labeled.npz, as the papers are.")
    f.add_argument("--data", required=True, metavar="SOURCE", help="the data source (imagenet:PATH, folder:PATH, ...)")
    f.add_argument("--image-size", type=int, required=True, help="the side the images are cropped to")
    f.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    f.add_argument("--split", default="heldout", choices=["heldout", "train"], help="the split (default heldout)")
    f.add_argument("--n", type=int, default=10000, help="images (default 10000, the ADM batches' count)")
    f.add_argument("--out", type=Path, required=True, help="the reference batch .npz to write")
    add_inception_options(f, standalone=True)
    f.set_defaults(func=cmd_reference)

    c = sub.add_parser("convert", help="convert DiT weights between the official, diffusers and difflineage layouts",
                       description="Read a DiT from an official checkpoint (DiT-XL-2-256x256.pt style), a diffusers "
                                   "DiTTransformer2DModel folder or file, or a difflineage checkpoint, and write it in "
                                   "another layout. Keys are checked strictly; nothing is downloaded or unpickled.")
    c.add_argument("source", type=Path, help="official .pt/.safetensors file, diffusers folder/file, or difflineage checkpoint")
    c.add_argument("dest", type=Path, help="output: a file (official), a folder (diffusers) or a checkpoint directory")
    c.add_argument("--to", required=True, choices=["official", "diffusers", "difflineage"], help="layout to write")
    c.add_argument("--vae", type=Path, default=None, metavar="FILE",
                   help="--to difflineage: the Stable Diffusion VAE the DiT works over (latents scaled by 0.18215); "
                        "without it the checkpoint is a pixel-space DiT")
    c.add_argument("--vae-norm-groups", type=int, default=32, help="GroupNorm groups of the VAE (32 in Stable Diffusion)")
    c.add_argument("--data", default="folder:data", metavar="SOURCE",
                   help="--to difflineage: data.source to record (the dataset evaluate compares against)")
    c.add_argument("--heads", type=int, default=None, help="attention heads, when not the paper's for this width")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="show a checkpoint's config, parameter count and steps trained")
    i.add_argument("checkpoint", type=Path, help="checkpoint directory or run directory")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    w = sub.add_parser("demo", help="serve a page on localhost that samples trained runs in the browser",
                       description="Start the browser demo (Gradio, an optional extra: pip install -e \".[demo]\") on "
                                   "http://HOST:PORT: a class or caption, the number of images, a seed and the options of "
                                   "the run's family; a gallery with the time and counted FLOPs per image; a DyDiT beside "
                                   "its base DiT, with its active heads, MLP groups and tokens per sample "
                                   "(docs/demo.md). Works offline.")
    w.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                   help="run (or checkpoint) directories to offer, the first shown first (default: every run under "
                        "--runs-dir)")
    w.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="where to look for runs when none is named (default runs/)")
    w.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    w.set_defaults(func=cmd_demo)
    return p


# --------------------------------------------------------------------------------------------


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


def cmd_train(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.systems import load_config
    from difflineage.train import Trainer

    if args.config is None and not args.resume:
        raise SystemExit("difflineage train: give CONFIG (a YAML file or recipe name), or --resume")
    config = load_config(args.config, args.overrides) if args.config else None
    run_dir = args.out
    if run_dir is None:
        if args.config is None:
            raise SystemExit("difflineage train --resume without CONFIG needs --out RUN_DIR (or --resume CKPT with --out)")
        run_dir = Path("runs") / Path(args.config).stem
    resume = args.resume
    if config is None and args.overrides:  # continue with changed settings: the checkpoint's config, overridden
        config = load_config(resolve_checkpoint(run_dir if resume is True else resume) / "config.yaml", args.overrides)
    result = Trainer(config, run_dir, resume=resume, stop_at=args.stop_at, progress=not args.no_progress,
                     overwrite=args.overwrite).fit()
    if _is_main_process():
        line = f"{result.status} at step {result.step}: checkpoint {result.checkpoint}"
        print(line + (f", samples {result.samples}" if result.samples else ""))
    return 0 if result.status != "interrupted" else 130


def cmd_quickstart(args) -> int:
    from difflineage.checkpoint import latest_checkpoint
    from difflineage.eval import evaluate_system
    from difflineage.systems import load, load_config
    from difflineage.train import Trainer
    from difflineage.train.rundir import holds_run

    run_dir = args.out or Path("runs") / f"quickstart-{args.system}"
    again = " ".join(["difflineage quickstart --system", args.system, *(["--out", shlex.quote(str(args.out))] if args.out else []),
                      *(["--set", *map(shlex.quote, args.overrides)] if args.overrides else [])])
    earlier: dict[str, str] = {}  # sub-directory -> checkpoint of the stages trained so far
    stages = QUICKSTART_RECIPES[args.system]
    known = {recipe for recipe, _, _ in stages} | {"*"}
    for o in args.overrides:
        if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] not in known:
            print(f"error: --set {o}: {o.split(':', 1)[0]!r} is not a stage of the {args.system} quickstart "
                  f"({', '.join(sorted(known - {'*'}))}, or * for every stage)", file=sys.stderr)
            return 2
    for recipe, sub, stage_overrides in stages:
        # --set KEY=VALUE applies to the final stage, --set RECIPE:KEY=VALUE to that stage
        mine = [o.split(":", 1)[1] for o in args.overrides if o.startswith((recipe + ":", "*:"))]
        plain = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
        overrides = [o.format(**earlier) for o in stage_overrides] + (plain if not sub else []) + mine
        config = load_config(recipe, overrides)
        stage_dir = run_dir / sub if sub else run_dir
        resume = latest_checkpoint(stage_dir) is not None
        if resume:
            print(f"resuming the quickstart run in {stage_dir}")
        print(f"training {recipe} into {stage_dir}")
        # a stage that stopped before its first checkpoint has nothing to resume: it starts again
        result = Trainer(config, stage_dir, resume=resume or None, progress=not args.no_progress,
                         overwrite=not resume and holds_run(stage_dir), resume_command=again).fit()
        if result.status != "finished":
            return 130
        earlier[sub] = str(result.checkpoint)
    system = load(result.checkpoint)
    pictures = system.pictures(_heldout(system), run_dir)
    metrics = evaluate_system(system, n=args.eval_n, k=args.eval_k, bpd_images=20, progress=not args.no_progress,
                              out=run_dir / "metrics.json", checkpoint=result.checkpoint)
    print(f"\nquickstart ({args.system}) finished: {result.step} steps in {run_dir}/")
    lines = {"samples": result.samples, **pictures, "loss curve": run_dir / "loss.png",
             "metrics": run_dir / "metrics.json", "checkpoint": result.checkpoint}
    width = max(len(name) for name in lines) + 2
    for name, path in lines.items():
        print(f"  {name + ':':<{width}}{path}")
    print(format_metrics(metrics))
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from difflineage.eval import bf16_autocast
    from difflineage.eval.sampling import fast_sampling
    from difflineage.images import save_grid, to_uint8
    from difflineage.systems import load

    system = load(args.checkpoint, use_ema=not args.no_ema, device=args.device)
    options = sampling_options(args)
    if args.label is not None and not system.num_classes:
        print(f"error: --label needs a class-conditional checkpoint; {args.checkpoint} is unconditional "
              "(train with model.conditional=true)", file=sys.stderr)
        return 2
    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    condition = [args.caption] * args.n if args.caption is not None else args.label
    per_class = None
    if condition is None and system.num_classes and args.n >= system.num_classes:
        condition, per_class = system.grid_labels(args.n)  # one row per class
        args.n = len(condition)
    bf16 = args.bf16

    def draw(options: dict, bf16: bool):
        with bf16_autocast(system.device, bf16):
            return system.sample(args.n, condition=condition, generator=torch.Generator().manual_seed(args.seed),
                                 **options).float()

    try:
        if args.fast:  # the plain samples first (before the fast path compiles anything), then the fast ones
            plain = draw(options, args.bf16)
            told = ", ".join(f"{k} {v}" for k, v in options.items()) or "the recipe's settings"
            options, bf16, said = fast_sampling(system, options, seed=args.seed)
            print(f"fast path: {said}")
        images = draw(options, bf16)
        if args.fast:  # the error of the fast path against the same samples drawn the plain way
            diff = (images - plain).abs()
            print(f"fast path against the plain path ({told}): mean |difference| {diff.mean():.4f}, max "
                  f"{diff.max():.4f} (pixels in [-1, 1])")
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nrow = args.nrow or per_class
    path = save_grid(images, args.out, nrow=nrow, scale=2)
    print(f"wrote {args.n} samples to {path}")
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=to_uint8(images))
        print(f"wrote {args.npz} (arr_0: uint8 {args.n} x H x W x C)")
    if args.pictures:
        for name, p in system.pictures(_heldout(system), args.pictures, torch.Generator().manual_seed(args.seed)).items():
            print(f"wrote {name}: {p}")
    return 0


def cmd_evaluate(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.eval import evaluate_system
    from difflineage.systems import load
    from difflineage.train.distributed import cleanup, init_distributed

    if args.n < 0:
        print("error: --n must be 0 or more", file=sys.stderr)
        return 2
    info = init_distributed(args.device)
    try:
        device = str(info.device) if info.enabled else args.device
        path = resolve_checkpoint(args.checkpoint)
        system = load(path, use_ema=not args.no_ema, device=device)
        options = sampling_options(args)
        if args.fast and args.n > 0:
            options, args.bf16 = fast_evaluation(args, system, options, info.is_main)
        if args.reference is not None:
            return _evaluate_adm(args, system, path, options, info)
        out = args.out or path / "metrics.json"
        try:
            metrics = evaluate_system(system, split=args.split, n=args.n, features=args.features,
                                      inception_weights=args.inception_weights, seed=args.seed,
                                      inception_resize=args.inception_resize,
                                      progress=not args.no_progress, out=out, npz=args.npz, batch_size=args.batch_size,
                                      sample_options=options, k=args.k, bpd_images=args.bpd_images,
                                      bpd_steps=args.bpd_steps, bf16=args.bf16, clip=args.clip, checkpoint=path)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    finally:
        cleanup(info)
    if info.is_main:
        print(format_metrics(metrics))
        if args.n > 0 and system.caption_conditioned and "clip_score" not in metrics:
            print("note: no CLIP score without a CLIP: add --clip CKPT (a DALL-E clip-stage checkpoint, e.g. "
                  "runs/quickstart-dalle/clip from `difflineage quickstart --system dalle`)")
        print(f"wrote {out}")
    return 0


def fast_evaluation(args, system, options: dict, say: bool) -> tuple[dict, bool]:
    """``evaluate --fast``: the fast path's sampling options and bf16 choice (eval.sampling.fast_sampling), with
    FID-50K's guidance kept under --reference (its sampler and step count are what --fast replaces)."""
    from difflineage.eval.sampling import fast_sampling, fid_sampling_defaults

    if args.reference is not None:
        options = {**{k: v for k, v in fid_sampling_defaults(system).items() if k == "guidance"}, **options}
    options, bf16, said = fast_sampling(system, options, seed=args.seed)
    if say:
        print(f"fast path: {said}")
    return options, bf16 or args.bf16


def _evaluate_adm(args, system, path: Path, options: dict, info) -> int:
    """``evaluate --reference``: FID-50K in ADM's convention (eval.evaluate_adm)."""
    from difflineage.errors import CheckpointError, DataError
    from difflineage.eval import evaluate_adm

    if args.inception_weights is None:
        print("error: --reference needs --inception-weights FILE (pt_inception-2015-12-05-6726825d.pth, the FID "
              "graph's weights; nothing is downloaded)", file=sys.stderr)
        return 2
    if args.n == 0:
        print("error: --reference scores samples: give --num-samples (50000 for FID-50K)", file=sys.stderr)
        return 2
    out = args.out or path / f"metrics_adm_{args.n}.json"
    try:
        metrics = evaluate_adm(system, args.reference, args.inception_weights, n=args.n,
                               npz=args.npz or path / f"samples_{args.n}.npz", batch_size=args.batch_size,
                               seed=args.seed, sample_options=options, bf16=args.bf16, checkpoint=path,
                               inception_resize=args.inception_resize, out=out, keep_parts=args.keep_parts,
                               progress=not args.no_progress)
    except (FileNotFoundError, ValueError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.is_main:
        opts = ", ".join(f"{k} {v}" for k, v in metrics["sample_options"].items())
        print(f"{metrics['samples']} samples ({opts}; {metrics['processes']} processes) scored against "
              f"{metrics['reference']} with the ADM evaluator's conventions:")
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            print(f"  {key:<16}{metrics[key]:>10.4f}")
        print(f"wrote {metrics['npz']} and {out}")
    return 0


def sampling_options(args) -> dict:
    """The sampling options given on the command line (those a sub-command has), by System.sample's names."""
    names = ("temperature", "guidance", "steps", "sampler", "mode", "rerank", "top_k", "top_p")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


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


def cmd_extract(args) -> int:
    from difflineage.config import data_config
    from difflineage.extract import extract

    data = data_config({"source": args.data, "image_size": args.image_size, "channels": args.channels}, args.overrides)
    extract(args.first_stage, data, args.out, shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
            device=args.device, workers=args.workers, progress=not args.no_progress, vae_norm_groups=args.vae_norm_groups)
    return 0


def cmd_score(args) -> int:
    from difflineage.eval import adm
    from difflineage.eval.inception import load_fid_inception

    try:
        net = load_fid_inception(args.inception_weights, resize=args.inception_resize).to(args.device)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = adm.score(args.samples, args.reference, net, device=args.device, progress=not args.no_progress,
                       batch=args.batch_size)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        print(f"{key:>16}: {result[key]:.4f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_reference(args) -> int:
    from difflineage.config import data_config
    from difflineage.data import load_dataset
    from difflineage.eval import write_reference_batch

    data = data_config({"source": args.data, "image_size": args.image_size, "channels": args.channels})
    try:
        made = write_reference_batch(load_dataset(data, args.split), args.out, args.inception_weights, n=args.n,
                                     inception_resize=args.inception_resize, device=args.device,
                                     batch_size=args.batch_size, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {made['reference']}: {made['images']} of the {made['of']} {args.split} images, "
          f"{made['size'][0]}x{made['size'][1]}, statistics on {made['feature_network']}")
    return 0


def cmd_convert(args) -> int:
    from difflineage.convert import read_any_dit, save_as_checkpoint
    from difflineage.interop.dit import save_diffusers_dit, save_official_dit

    model, layout = read_any_dit(args.source, heads=args.heads)
    try:
        if args.to == "official":
            out = save_official_dit(model, args.dest)
        elif args.to == "diffusers":
            out = save_diffusers_dit(model, args.dest)
        else:
            out = save_as_checkpoint(model, args.dest, vae=args.vae, data_source=args.data,
                                     vae_norm_groups=args.vae_norm_groups)
    except ValueError as exc:  # a DiT that has no such layout (other blocks, captions)
        print(f"error: {args.source}: {exc}", file=sys.stderr)
        return 2
    depth, hidden, heads, patch = model.cfg.resolved()
    print(f"read a {layout} DiT ({model.cfg.name if model.cfg.name != 'custom' else f'depth {depth}, hidden {hidden}'}, "
          f"patch {patch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) from {args.source}")
    print(f"wrote the {args.to} layout to {out}")
    return 0


def cmd_info(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.eval.flops import count_flops
    from difflineage.systems import load
    from difflineage.systems.base import DynamicCompute

    path = resolve_checkpoint(args.checkpoint)
    system = load(path)
    step = _checkpoint_step(path)

    n_params = sum(p.numel() for p in system.parameters())
    flops = {name: count_flops(fn).as_dict() for name, fn in system.forward_passes().items()}
    info = {"checkpoint": str(path), "system": system.config.system, "steps_trained": step,
            "parameters": n_params, "forward_passes": flops, "config": system.config.to_dict()}
    if isinstance(system, DynamicCompute):  # arithmetic that changes with the timestep (DyDiT): per step
        info["sampling_flops"] = _dynamic_flops(system)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint:    {path}\nsystem:        {info['system']}\nsteps trained: {step}\n"
          f"parameters:    {n_params:,} ({n_params / 1e6:.2f}M)")
    print("arithmetic per forward (MACs = multiply-accumulates, the DiT paper's 'Gflops'; FLOPs = 2 x MACs):")
    for name, f in flops.items():
        print(f"  {name:<42} {f['macs'] / 1e6:>10.3f} M MACs  {f['flops'] / 1e6:>10.3f} M FLOPs")
    if "sampling_flops" in info:
        sf = info["sampling_flops"]
        print(f"network arithmetic per image on the sampling path ({sf['images']} images, {sf['sampler']}, "
              f"guidance {sf['guidance']}), counted:")
        for row in sf["per_step"]:
            print(f"  t={row['t']:>4}  {row['macs'] / 1e6:>10.3f} M MACs  {row['ratio']:.3f} of the full network")
        print(f"  average {sf['mean_macs'] / 1e6:.3f} M MACs per step: {sf['ratio']:.3f} of the full network's "
              f"{sf['full_macs'] / 1e6:.3f} M")
    print("config:")
    print("  " + system.config.to_yaml().replace("\n", "\n  ").rstrip())
    return 0


def cmd_demo(args) -> int:
    from difflineage.demo import DemoError, check_run, find_runs, serve

    runs = list(args.runs) or find_runs(args.runs_dir)
    if not runs:
        print(f"error: no runs under {args.runs_dir}/ (a run directory holds checkpoints/step_*): train one, e.g. "
              "`make quickstart`, or name a run directory: difflineage demo RUN", file=sys.stderr)
        return 2
    try:
        for run in args.runs:
            check_run(run)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.runs:
        print(f"runs found under {args.runs_dir}/: " + ", ".join(r.name for r in runs))
    print(f"serving the demo of {len(runs)} run{'s' if len(runs) > 1 else ''} on http://{args.host}:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    try:
        serve(runs, host=args.host, port=args.port, device=args.device)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port} ({exc}); give another --port or --host", file=sys.stderr)
        return 2
    return 0


def _dynamic_flops(system, images: int = 4) -> dict:
    """Counted network MACs per image at each step of a real sampling run, against the full network's."""
    from difflineage.eval.flops import sampling_macs

    dc = system.config.model.diffusion
    dynamic, complete = system.compute_modes
    counts = {mode: sampling_macs(system, images, mode=mode) for mode in system.compute_modes}
    full = sum(m for _, m in counts[complete]) / len(counts[complete])
    per_step = [{"t": t, "macs": int(m), "ratio": round(m / full, 4)} for t, m in counts[dynamic]]
    mean = sum(r["macs"] for r in per_step) / len(per_step)
    return {"images": images, "sampler": f"{dc.sampler} {dc.sample_steps} steps", "guidance": dc.guidance,
            "per_step": per_step, "mean_macs": int(mean), "full_macs": int(full), "ratio": round(mean / full, 4)}


# --------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> Optional[int]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        step = (fh.metadata() or {}).get("step")
    return int(step) if step and step.isdigit() else None


def _heldout(system):
    from difflineage.data import load_dataset

    return load_dataset(system.config.data, "heldout")


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
