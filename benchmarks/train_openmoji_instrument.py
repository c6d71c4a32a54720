"""Train the OpenMoji instrument once and write the files the package ships: the subgroup classifier (FID features,
subgroup accuracy) and the scoring CLIP (CLIP score, caption retrieval).

    python benchmarks/train_openmoji_instrument.py [--only classifier|clip] [--out-dir src/difflineage/eval]

Both train on OpenMoji's training split at 32 px with the fixed recipes and seeds of
``difflineage.eval.openmoji_instrument`` (the CLIP with its own seed, apart from every recipe's text encoder), are
scored on the held-out split, and are written atomically as fp32 safetensors with their held-out scores, the recipe,
the torch version and the machine in the file's metadata. The script prints each file's sha256: a new shipped file
means a new ``CLASSIFIER_SHA256`` / ``CLIP_SHA256`` in openmoji_instrument.py and new scores in
docs/text-to-image.md. The held-out scores also go to benchmarks/results/openmoji_instrument.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.data.openmoji import compositional
from difflineage.eval import openmoji_instrument as oi
from difflineage.eval.sampling import to_unit
from difflineage.machine import machine_description
from difflineage.storage import sha256_of, writing

RESULTS = Path(__file__).resolve().parent / "results" / "openmoji_instrument.json"


def write(model: torch.nn.Module, out: Path, metadata: dict) -> str:
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with writing(out):
        save_file(state, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, out)
    out.chmod(0o644)
    return sha256_of(out)


@torch.no_grad()
def classifier_scores(model: oi.OpenMojiClassifier, held) -> dict:
    logits = model(to_unit(held.images))
    top = logits.topk(5, dim=1).indices
    return {"heldout_accuracy": (top[:, 0] == held.labels).double().mean().item(),
            "heldout_top5": (top == held.labels[:, None]).any(1).double().mean().item(),
            "heldout_images": len(held), "classes": int(logits.shape[1])}


@torch.no_grad()
def clip_scores(model, train, held) -> dict:
    """Caption retrieval and CLIP score of the held-out images against their own captions, of the compositional ones
    apart, and of the same images against shuffled captions (chance: 1% top-1, 5% top-5)."""
    images = to_unit(held.images)
    ids = torch.arange(len(held))
    comp = torch.zeros(len(held), dtype=torch.bool)
    comp[compositional(train.captions, held.captions)] = True
    real = oi.caption_scores(model, images, ids, held.captions, {"compositional": comp})
    shuffled = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    wrong = oi.caption_scores(model, images, shuffled, held.captions)
    return {**real, "shuffled_top1": wrong["retrieval_top1"], "shuffled_top5": wrong["retrieval_top5"],
            "shuffled_clip_score": wrong["clip_score"], "compositional_images": int(comp.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("classifier", "clip"))
    p.add_argument("--out-dir", type=Path, default=oi.CLASSIFIER_PATH.parent)
    args = p.parse_args()

    data = DataConfig(source="openmoji", image_size=oi.INPUT_SIZE, channels=3)
    train, held = load_dataset(data, "train"), load_dataset(data, "heldout")
    common = {"torch": torch.__version__, "machine": machine_description(), "data": "openmoji train split, 32 px",
              "command": "python benchmarks/train_openmoji_instrument.py"}
    jobs = {"classifier": (oi.train_classifier, oi.CLASSIFIER_ARCH, oi.CLASSIFIER_RECIPE, oi.CLASSIFIER_PATH.name,
                           lambda m: classifier_scores(m, held)),
            "clip": (oi.train_clip, oi.CLIP_ARCH, oi.CLIP_RECIPE, oi.CLIP_PATH.name, lambda m: clip_scores(m, train, held))}
    for name, (train_fn, arch, recipe, filename, score) in jobs.items():
        if args.only and args.only != name:
            continue
        start = time.perf_counter()
        model = train_fn(train, progress=True)  # fp32: under bf16 autocast the CLIP did not start learning
        seconds = time.perf_counter() - start
        scores = score(model.float())
        out = args.out_dir / filename
        digest = write(model, out, {**common, "arch": arch, "recipe": recipe, "scores": scores,
                                    "train_seconds": f"{seconds:.0f}"})
        print(f"{name}: trained in {seconds:.0f} s on {common['machine']}")
        print(json.dumps(scores, indent=2))
        print(f"wrote {out}\nsha256 {digest}")
    if args.out_dir.resolve() == oi.CLASSIFIER_PATH.parent:  # the shipped files: their record, from the files
        results = {}
        for name, (_, _, _, filename, _) in jobs.items():
            path = args.out_dir / filename
            if path.is_file():
                results[name] = {"file": filename, "sha256": sha256_of(path), **oi.shipped_metadata(path)}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
