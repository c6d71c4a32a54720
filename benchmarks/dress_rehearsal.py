"""The ImageNet-256 dress rehearsal on a machine without ImageNet or GPUs: what a user with both will run, end to end.

    python benchmarks/dress_rehearsal.py [--work /tmp/rehearsal] [--inception-weights FILE] [--skip-full-size]

1. ``full size``: the XL recipes (configs/dit-xl2-imagenet256.yaml and dydit-xl2-imagenet256.yaml) built at full
   size and trained two steps at batch 2 by ``difflineage train``, from a latent store of random latents, over an
   SD-VAE-shaped first stage of random weights (83.7M parameters, saved as an SD VAE file); DyDiT fine-tunes an
   official-layout ``DiT-XL-2-256x256.pt`` of random weights (written with torch.save, read weights-only). Reported:
   the peak resident memory of the process, the wall time (start-up, two steps, the final sample grid, of two images
   at two sampler steps here, and the final checkpoint: model, EMA, AdamW state), the loss of each step, and the
   checkpoint's size on disk.
2. ``chain``: the whole chain at small scale on a synthetic ImageNet-layout set (benchmarks/bench_data.py's: JPEGs
   of mixed sizes in train/<wnid>/ and val/<wnid>/), each step the command docs/imagenet.md gives: ``extract`` with a
   small SD-VAE-layout first stage of random weights, ``train dit-s2-imagenet256`` (a small custom DiT in its
   place) from the store, ``reference`` from the held-out images, ``evaluate --reference`` over two torchrun
   processes with the paper's FID-50K sampling (250 DDPM steps, guidance 1.5) and ADM's npz, scored with ADM's
   conventions. Each step's wall time and peak memory, and the scores. Without --inception-weights the scores come
   from an InceptionV3 of random weights: they prove the plumbing, not sample quality.

Writes benchmarks/results/dress_rehearsal_*.json and their sections of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# benchmarks/ is not a package: run as a script, this file's folder is on sys.path, so its neighbours import
from bench_data import make_imagenet, peak_rss, sd_vae_sized
from gpu_suite import make_store
from harness import record

from difflineage.eval.adm import check_npz
from difflineage.interop.dit import save_official_dit
from difflineage.interop.sd_vae import save_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.models.dit import DiT, DiTConfig

GIB = 2.0 ** 30
CLI = [sys.executable, "-m", "difflineage"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def losses(run: Path) -> list[float]:
    return [round(json.loads(line)["loss"], 4) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def full_size_rows(work: Path, images: Path) -> list[dict]:
    vae = sd_vae_sized(work / "sd-vae-sized.safetensors")
    store = work / "store-full"
    if not (store / "store.json").exists():
        make_store(store, f"sd-vae:{vae}", 32, f"imagenet:{images}", 256, 32, count=64)
    base = work / "DiT-XL-2-256x256.pt"
    if not base.exists():
        torch.manual_seed(0)
        save_official_dit(DiT(DiTConfig(name="DiT-XL/2"), in_channels=4, input_size=32, num_classes=1000), base)
    rows = []
    for recipe, extra in (("dit-xl2-imagenet256", []), ("dydit-xl2-imagenet256", [f"model.base={base}"])):
        run = work / f"run-{recipe}"
        cmd = [*CLI, "train", recipe, "--out", str(run), "--overwrite", "--no-progress", "--set",
               f"data.source=imagenet:{images}", f"data.latents={store}", f"model.first_stage=sd-vae:{vae}",
               "train.steps=2", "train.batch_size=2", "train.log_every=1", "train.sample_every=0",
               "train.checkpoint_every=0", "train.sample_n=2", "model.diffusion.sample_steps=2", *extra]
        print(f"full size: {recipe}", flush=True)
        peak, seconds = peak_rss(cmd)
        info = json.loads(subprocess.run([*CLI, "info", str(run), "--json"], capture_output=True, text=True,
                                         check=True).stdout)
        rows.append({"recipe": recipe, "parameters incl. the SD VAE (M)": round(info["parameters"] / 1e6, 1), "batch": 2, "steps": 2,
                     "loss per step": losses(run), "peak memory (GiB)": round(peak / GIB, 2),
                     "wall time incl. start-up and checkpoint (s)": round(seconds, 1),
                     "checkpoint on disk (GiB)": round(folder_bytes(run / "checkpoints") / GIB, 2)})
        shutil.rmtree(run)  # an XL run's checkpoint is ~11 GB
        print(json.dumps(rows[-1]), flush=True)
    return rows


def chain_rows(work: Path, images: Path, inception: Path | None, n: int, steps: int) -> tuple[list[dict], dict]:
    vae = work / "vae-small.safetensors"
    if not vae.exists():
        torch.manual_seed(0)
        save_sd_vae(AutoencoderKL(AutoencoderKLConfig(channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                                                      norm_groups=32), image_channels=3), vae)
    if inception is None:
        from difflineage.eval.inception import random_fid_inception

        inception = work / "inception-random.safetensors"
        random_fid_inception(seed=0, path=inception)
    store, run, ref, npz = work / "store-64", work / "run-small", work / "reference-64.npz", work / "samples.npz"
    for stale in (store, run):
        shutil.rmtree(stale, ignore_errors=True)
    source = f"imagenet:{images}"
    stages = [
        ("extract", [*CLI, "extract", "--first-stage", f"sd-vae:{vae}", "--data", source, "--image-size", "64",
                     "--out", str(store), "--no-progress"]),
        ("train", [*CLI, "train", "dit-s2-imagenet256", "--out", str(run), "--no-progress", "--set",
                   f"data.source={source}", f"data.latents={store}", "data.image_size=64",
                   f"model.first_stage=sd-vae:{vae}", "model.dit.name=custom", "model.dit.depth=4",
                   "model.dit.hidden=128", "model.dit.heads=4", f"train.steps={steps}", "train.batch_size=32",
                   "train.lr=3e-4", "train.log_every=50", "train.sample_every=0", f"train.checkpoint_every={steps}"]),
        ("reference", [*CLI, "reference", "--data", source, "--image-size", "64", "--inception-weights",
                       str(inception), "--out", str(ref), "--no-progress"]),
        ("evaluate --reference (2 processes)", [*TORCHRUN, "-m", "difflineage", "evaluate", str(run), "--reference",
                                                str(ref), "--inception-weights", str(inception), "--num-samples",
                                                str(n), "--batch-size", "50", "--npz", str(npz), "--out",
                                                str(work / "fid.json"), "--no-progress"]),
    ]
    rows = []
    for name, cmd in stages:
        print(f"chain: {name}", flush=True)
        peak, seconds = peak_rss(cmd)
        rows.append({"step": name, "wall time (s)": round(seconds, 1), "peak memory of the process tree (GiB)":
                     round(peak / GIB, 2)})
    scores = json.loads((work / "fid.json").read_text())
    rows[0]["what"] = f"{json.loads((store / 'store.json').read_text())['count']} images and mirrors, 64 px -> 8x8x4"
    rows[1]["what"] = f"{steps} steps at batch 32, final loss {losses(run)[-1]}"
    rows[2]["what"] = f"{check_npz(ref)[0]} held-out images"
    rows[3]["what"] = (f"{scores['samples']} samples, {scores['sample_options']}; FID {scores['fid']:.2f}, sFID "
                       f"{scores['sfid']:.2f}, IS {scores['inception_score']:.2f}, precision {scores['precision']:.3f}, "
                       f"recall {scores['recall']:.3f}")
    return rows, scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/dress-rehearsal"))
    p.add_argument("--inception-weights", type=Path, default=None, help="the real FID weights file, if at hand")
    p.add_argument("--images", type=int, default=2000, help="training images of the synthetic set (50 classes)")
    p.add_argument("--samples", type=int, default=200, help="samples drawn for the chain's FID")
    p.add_argument("--steps", type=int, default=300, help="training steps of the chain's small DiT")
    p.add_argument("--skip-full-size", action="store_true")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    images = make_imagenet(args.work / "imagenet", args.images, classes=50)
    command = "python benchmarks/dress_rehearsal.py" + (" --skip-full-size" if args.skip_full_size else "")
    if not args.skip_full_size:
        record("dress_rehearsal_full_size", "Dress rehearsal: the XL recipes at full size, two steps at batch 2",
               full_size_rows(args.work, images), command=command,
               notes="From a store of random latents over an SD-VAE-shaped first stage of random weights; DyDiT "
                     "fine-tunes an official-layout DiT-XL/2 file of random weights. fp32 (the recipes' setting), "
                     "on the CPU. Peak memory is the resident set of the training process; the wall time includes "
                     "start-up, reading the base and the first stage, and writing the final checkpoint.")
    rows, scores = chain_rows(args.work, images, args.inception_weights, args.samples, args.steps)
    weights = "the real FID weights" if args.inception_weights else \
        "an InceptionV3 of random weights (the plumbing, not sample quality)"
    record("dress_rehearsal_chain", "Dress rehearsal: the ImageNet chain at small scale", rows, command=command,
           notes=f"A synthetic ImageNet-layout set of {args.images} training JPEGs in 50 classes (and 100 held out), "
                 "an SD-VAE-layout first stage of random weights (f = 8), a custom DiT (depth 4, width 128) trained "
                 f"by the dit-s2-imagenet256 recipe at 64 px; scores on {weights}.")


if __name__ == "__main__":
    main()
