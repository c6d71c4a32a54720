"""VQ-VAE codebook usage with and without EMA updates and dead-code restarts, at equal steps on mnist5k.

    python benchmarks/vqvae_codebook.py                  # four autoencoders of configs/vqvae-mnist.yaml, 800 steps

Each variant trains the stage-1 recipe with only the quantiser's options changed, then is scored on the held-out
digits: reconstruction error, codebook perplexity and codes used (of 256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import difflineage
from harness import record

from difflineage.data import load_dataset
from difflineage.systems import load_config
from difflineage.train import Trainer

VARIANTS = {"codebook loss": ["model.vq.ema=false", "model.vq.restart_after=0"],
            "codebook loss + restarts": ["model.vq.ema=false", "model.vq.restart_after=100"],
            "EMA": ["model.vq.ema=true", "model.vq.restart_after=0"],
            "EMA + restarts (the recipe)": ["model.vq.ema=true", "model.vq.restart_after=100"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", default="runs/vqvae-codebook")
    args = ap.parse_args(argv)
    rows = []
    for name, overrides in VARIANTS.items():
        print(f"training: {name}", file=sys.stderr)
        run = Path(args.out) / name.split(" (")[0].replace(" + ", "-").replace(" ", "-")
        cfg = load_config("vqvae-mnist", overrides + [f"train.steps={args.steps}", "train.checkpoint_every=0"])
        Trainer(cfg, run, progress=False).fit()
        system = difflineage.load(run)
        s = system.evaluate(load_dataset(system.config.data, "heldout"))
        rows.append({"quantiser": name, "held-out MSE": f"{s['recon_mse']:.4f}", "PSNR (dB)": round(s["recon_psnr_db"], 2),
                     "codebook perplexity": round(s["codebook_perplexity"], 1), "codes used (of 256)": s["codes_used"]})
    notes = (f"configs/vqvae-mnist.yaml (256 codes x 32, 8x8 code maps of 32x32 digits), {args.steps} steps at batch 128 "
             "for every variant; scored on the 500 held-out digits (MSE on [0, 1] pixels; perplexity of the codes chosen).")
    cmd = "python benchmarks/vqvae_codebook.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record("vqvae_codebook", "VQ-VAE codebook usage: EMA and dead-code restarts", rows, notes, command=cmd.strip())
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
