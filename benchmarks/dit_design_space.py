"""DiT's design space at small scale on mnist5k, at equal training steps: the four conditioning blocks, and
three model sizes x two patch sizes; FID (MNIST features) and class accuracy against Gflops.

    python benchmarks/dit_design_space.py                       # about 30 minutes on two CPU cores
    python benchmarks/dit_design_space.py --steps 3000 --n 1000 --guidance 1   # the paper's protocol (hours)

Every model is a latent DiT over the flagship quickstart's first stage (8x8x4 latents; the autoencoder is
trained first if runs/quickstart-dit/autoencoder is missing), trained with the flagship recipe for the same
number of steps, then sampled with guidance 3 (the paper's design-space figures use none; at this small training
budget unguided samples of every model are still near chance, so they do not separate the models) and scored
against the held-out digits. Writes docs/images/dit_design_space.png and a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from difflineage import load
from difflineage.bench import REPO, record
from difflineage.eval import evaluate_system
from difflineage.eval.flops import count_flops
from difflineage.systems import load_config
from difflineage.train import Trainer

# (name, depth, hidden, heads); the patch sizes of the study on 8x8 latents
SIZES = [("small", 4, 128, 2), ("base", 6, 256, 4), ("large", 8, 384, 6)]
PATCHES = (2, 4)
BLOCKS = ("adaln_zero", "adaln", "cross_attention", "in_context")


def runs(blocks_size: str = "base", blocks_patch: int = 2) -> list[dict]:
    out = [dict(size=s, depth=d, hidden=h, heads=k, patch=p, block="adaln_zero") for s, d, h, k in SIZES for p in PATCHES]
    base = next(x for x in SIZES if x[0] == blocks_size)
    out += [dict(size=base[0], depth=base[1], hidden=base[2], heads=base[3], patch=blocks_patch, block=b)
            for b in BLOCKS if b != "adaln_zero"]
    return out


def first_stage(root: Path) -> Path:
    ae = REPO / "runs" / "quickstart-dit" / "autoencoder"
    if (ae / "checkpoints").is_dir():
        return ae
    ae = root / "autoencoder"
    if not (ae / "checkpoints").is_dir():
        Trainer(load_config("autoencoder-mnist", ["train.steps=800"]), ae, progress=True).fit()
    return ae


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=300, help="samples scored per model")
    ap.add_argument("--guidance", type=float, default=3.0,
                    help="guidance scale of the scored samples (1: none, the paper's protocol, which needs far longer "
                         "training than the default to separate the models)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dit-design-space")
    args = ap.parse_args(argv)
    ae = first_stage(args.out)
    rows = []
    for r in runs():
        tag = f"{r['size']}-p{r['patch']}-{r['block']}"
        run_dir = args.out / tag
        overrides = [f"model.first_stage={ae}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                     "train.sample_every=0", "train.checkpoint_every=0", f"model.dit.depth={r['depth']}",
                     f"model.dit.hidden={r['hidden']}", f"model.dit.heads={r['heads']}", f"model.dit.patch={r['patch']}",
                     f"model.dit.block={r['block']}"]
        done = run_dir / "design_space.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            print(f"== {tag}", flush=True)
            res = Trainer(load_config("dit-mnist", overrides), run_dir, resume=(run_dir / "checkpoints").is_dir() or None,
                          progress=True).fit()
            system = load(res.checkpoint)
            side = system.side
            x = torch.zeros(1, system.channels, side, side)
            gflops = count_flops(system.dit, x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).gmacs
            m = evaluate_system(system, n=args.n, bpd_images=0, progress=True, sample_options={"guidance": args.guidance})
            result = {"Gflops": gflops, "params (M)": sum(p.numel() for p in system.dit.parameters()) / 1e6,
                      "FID": m["fid"], "FID real-vs-real": m["fid_real"], "class accuracy": m["class_accuracy"]}
            done.write_text(json.dumps(result, indent=2) + "\n")
        rows.append({"block": r["block"], "size": r["size"], "depth x hidden": f"{r['depth']} x {r['hidden']}",
                     "patch": r["patch"], "tokens": (8 // r["patch"]) ** 2,
                     "params (M)": round(result["params (M)"], 2), "Gflops (MACs)": round(result["Gflops"], 4),
                     "FID": round(result["FID"], 1), "class accuracy": round(result["class accuracy"], 3)})
    plot(rows, REPO / "docs" / "images" / "dit_design_space.png", args)
    notes = (f"Latent DiT over the quickstart's first stage (8x8x4), flagship recipe, {args.steps} steps at batch "
             f"{args.batch} for every model; {args.n} samples at guidance {args.guidance} scored on MNIST features against the "
             f"held-out digits (real-vs-real FID at this count: {result['FID real-vs-real']:.1f}). Gflops: one forward "
             "pass of one latent. Plot: docs/images/dit_design_space.png.")
    record("dit_design_space", "DiT design space on mnist5k (equal training steps)", rows, notes,
           command="python benchmarks/dit_design_space.py" + "".join(f" --{k} {v}" for k, v in (("steps", args.steps),
                   ("batch", args.batch), ("n", args.n), ("guidance", args.guidance)) if v != ap.get_default(k)))


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for patch, marker in zip(PATCHES, ("o", "s")):
        pts = sorted((r["Gflops (MACs)"], r["FID"], r["size"]) for r in rows if r["patch"] == patch and r["block"] == "adaln_zero")
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"patch {patch} ({(8 // patch) ** 2} tokens)")
        for g, f, name in pts:
            a.annotate(name, (g, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel("Gflops per forward pass (MACs)")
    a.set_ylabel("FID (MNIST features, lower is better)")
    a.set_title("adaLN-Zero: size and patch")
    a.legend()
    blocks = [r for r in rows if r["size"] == "base" and r["patch"] == 2]
    b.bar([r["block"] for r in blocks], [r["FID"] for r in blocks], color=["C2" if r["block"] == "adaln_zero" else "C7" for r in blocks])
    for i, r in enumerate(blocks):
        b.annotate(f"{r['Gflops (MACs)']:.3f} Gflops", (i, r["FID"]), ha="center", textcoords="offset points", xytext=(0, 3), fontsize=8)
    b.set_ylabel("FID")
    b.set_title("conditioning block (base size, patch 2)")
    fig.suptitle(f"DiT design space on mnist5k: {args.steps} steps at batch {args.batch}, {args.n} samples at guidance {args.guidance}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
