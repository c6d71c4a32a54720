"""Text-to-image on OpenMoji: the four text-to-image recipes trained once and scored with the shipped instrument, the
frozen CLIP text tower against a byte-level encoder trained with the denoiser, and a grid of captions a reader would try.

    python benchmarks/text_to_image.py [--root runs/text-to-image] [--n 690] [--only dit,ldm,...]

1. Trains the shared earlier stages once: the CLIP stage (dalle-clip-openmoji, whose text tower the diffusion recipes
   freeze and with which DALL-E reranks), the KL autoencoder (autoencoder-openmoji) and DALL-E's dVAE.
2. Trains each text-to-image recipe at its own settings: the latent DiT (dit-openmoji), the same DiT with a byte-level
   text encoder trained jointly instead of the frozen tower (``dit-joint``), the LDM UNet (ldm-openmoji), pixel DDPM
   (ddpm-openmoji) and DALL-E's prior (dalle-openmoji). A complete run is reused, a cut one resumed.
3. Scores each with ``evaluate``: ``--n`` samples drawn for the held-out captions in turn (each caption twice by
   default), FID / precision / recall on the shipped subgroup classifier's features, subgroup accuracy, and the shipped
   scoring CLIP's CLIP score and caption retrieval (top-1 and top-5 among 100), all beside the real held-out images'
   values; compositional captions apart.
4. Writes the table to docs/benchmarks.md and benchmarks/results/text_to_image.json, and the grid of samples
   (docs/images/text_to_image_grid.png; real images in the first panel).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from harness import REPO, record, train_seconds, trained_run

import difflineage
from difflineage.data import load_dataset
from difflineage.data.openmoji import compositional
from difflineage.eval import evaluate_system
from difflineage.eval.sampling import to_unit
from difflineage.images import save_captioned_panels

# caption -> where it lies: train, held out, or held out and compositional (its parts seen apart in training)
GRID_CAPTIONS = ["red heart", "cat face", "flag: Japan", "rocket", "red apple", "panda", "house",
                 "woman: dark skin tone", "vampire: medium skin tone"]
JOINT_TEXT = ["model.text_encoder=", "model.text.width=128", "model.text.depth=2", "model.text.heads=4",
              "model.text.max_length=81"]


def stages(root: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (recipe, overrides, what it is)."""
    clip, ae, dvae = str(root / "clip"), str(root / "autoencoder"), str(root / "dvae")
    frozen = [f"model.text_encoder={clip}"]
    return {
        "dit": ("dit-openmoji", [f"model.first_stage={ae}", *frozen], "latent DiT, cross-attention; frozen CLIP text"),
        "dit-joint": ("dit-openmoji", [f"model.first_stage={ae}", *JOINT_TEXT],
                      "latent DiT, cross-attention; byte-level text encoder trained with it"),
        "ldm": ("ldm-openmoji", [f"model.first_stage={ae}", *frozen], "LDM UNet, cross-attention; frozen CLIP text"),
        "ddpm": ("ddpm-openmoji", frozen, "pixel DDPM UNet, cross-attention; frozen CLIP text"),
        "dalle": ("dalle-openmoji", [f"model.first_stage={dvae}", f"model.clip_stage={clip}"],
                  "DALL-E: dVAE tokens, transformer prior (its own BPE text tokens)"),
    }


def trained(root: Path, name: str, recipe: str, overrides: list[str]) -> Path:
    steps = difflineage.systems.load_config(recipe).train.steps
    return trained_run(recipe, overrides, root / name, steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("runs/text-to-image"))
    ap.add_argument("--n", type=int, default=690, help="samples scored per system (the held-out captions in turn)")
    ap.add_argument("--only", default="", help="comma-separated systems (default: all)")
    ap.add_argument("--grid-per-caption", type=int, default=2)
    args = ap.parse_args(argv)
    root = args.root
    for name, recipe in (("clip", "dalle-clip-openmoji"), ("autoencoder", "autoencoder-openmoji"),
                         ("dvae", "dalle-dvae-openmoji")):
        print(f"stage {name}: {recipe}", file=sys.stderr)
        trained(root, name, recipe, [])
    chosen = [s for s in args.only.split(",") if s] or list(stages(root))
    rows, panels = [], {}
    train = held = None
    for name in chosen:
        recipe, overrides, what = stages(root)[name]
        print(f"{name}: {recipe}", file=sys.stderr)
        run = trained(root, name, recipe, overrides)
        system = difflineage.load(run)
        data = system.config.data
        if held is None:
            train, held = load_dataset(data, "train"), load_dataset(data, "heldout")
        start = time.perf_counter()
        m = evaluate_system(system, n=args.n, progress=False, bpd_images=0, out=run / "metrics.json", checkpoint=run)
        print(f"  scored in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
        rows.append({
            "system": name, "recipe": recipe, "what": what, "trained parameters (M)": round(trainable / 1e6, 2),
            "steps": system.config.train.steps, "training (min)": round(train_seconds(run) / 60, 1),
            "sampling (s / image)": round(m["sampling_seconds"] / m["samples"], 3),
            "FID": round(m["fid"], 1), "FID real": round(m["fid_real"], 1),
            "precision": round(m["precision"], 3), "recall": round(m["recall"], 3),
            "subgroup accuracy": round(m["class_accuracy"], 3), "subgroup accuracy real": round(m["class_accuracy_real"], 3),
            "CLIP score": round(m["clip_score"], 2), "CLIP score real": round(m["clip_score_real"], 2),
            "retrieval top-1": round(m["retrieval_top1"], 3), "retrieval top-1 real": round(m["retrieval_top1_real"], 3),
            "retrieval top-5": round(m["retrieval_top5"], 3), "retrieval top-5 real": round(m["retrieval_top5_real"], 3),
            "compositional top-5": round(m["retrieval_compositional_top5"], 3),
            "compositional top-5 real": round(m["retrieval_compositional_top5_real"], 3),
            "sampler": f"{system.config.model.diffusion.sampler}-{system.config.model.diffusion.sample_steps}"
                       if hasattr(system.config.model, "diffusion") else "ancestral",
        })
        g = torch.Generator().manual_seed(0)
        captions = [c for c in GRID_CAPTIONS for _ in range(args.grid_per_caption)]
        with torch.no_grad():
            panels[name] = system.sample(len(captions), condition=captions, generator=g).float().cpu()
    if held is not None:
        where = {c: "train" for c in train.captions}
        comp = set(compositional(list(train.captions), list(held.captions)))
        where.update({c: "held out, compositional" if i in comp else "held out" for i, c in enumerate(held.captions)})
        every = {c: i for i, c in enumerate(train.captions)}
        every.update({c: len(train) + i for i, c in enumerate(held.captions)})
        images = torch.cat([train.images, held.images])
        real = torch.stack([to_unit(images[every[c]: every[c] + 1])[0] for c in GRID_CAPTIONS
                            for _ in range(args.grid_per_caption)])
        labels = [f"{c} ({where.get(c, 'not in the data')})" for c in GRID_CAPTIONS]
        grid = save_captioned_panels({"real (OpenMoji, CC BY-SA 4.0)": real, **panels}, labels,
                                     REPO / "docs" / "images" / "text_to_image_grid.png", per_row=args.grid_per_caption)
        print(f"wrote {grid}", file=sys.stderr)
    record("text_to_image", "Text-to-image on OpenMoji: four recipes, frozen versus joint text encoder", rows,
           notes=f"{args.n} samples per system, drawn for OpenMoji's held-out captions in turn with each recipe's "
                 "sampler and guidance; scored with the shipped instrument (subgroup classifier features, scoring "
                 "CLIP: retrieval ranks each image's own caption among 100 held-out captions, chance 1% top-1 and 5% "
                 "top-5). 'real' columns: the held-out images themselves under the same instrument (FID real: "
                 "training images against the held-out ones). Training time: the steps' own time from the logged "
                 "throughput, on this machine, shared with other work.",
           command="python benchmarks/text_to_image.py")


if __name__ == "__main__":
    main()
