"""DiT's design space at small scale on mnist5k, at equal training steps: the four conditioning blocks, each at its
best of two learning rates, with their learning curves; and three model sizes x two patch sizes of adaLN-Zero; FID
(MNIST features) and class accuracy against Gflops.

    python benchmarks/dit_design_space.py --steps 600 --lrs 2e-3        # the first study's budget (~30 min, 2 cores)
    python benchmarks/dit_design_space.py                               # 3,000 steps, blocks at 2e-3 and 5e-4 (~11 h)

Every model is a latent DiT over the flagship quickstart's first stage (8x8x4 latents; the autoencoder is
trained first if runs/quickstart-dit/autoencoder is missing), trained with the flagship recipe for the same
number of steps. The block comparison (``--blocks-size``, patch 2) trains every block at each of ``--lrs`` and keeps
its best by FID, and scores ``--track-n`` samples at each ``--track`` step on the way (class accuracy and FID against
steps: whether a block is still learning or has stopped). Scored samples use guidance 3 (the paper's design-space
figures use none; at small training budgets unguided samples of every model are still near chance, so they do not
separate the models) against the held-out digits. Completed runs and scores are reused. Writes
docs/images/dit_design_space.png and a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from difflineage import load
from difflineage.bench import REPO, finished, record
from difflineage.checkpoint import latest_checkpoint
from difflineage.eval import evaluate_system
from difflineage.eval.flops import count_flops
from difflineage.systems import load_config
from difflineage.train import Trainer

# (name, depth, hidden, heads); the patch sizes of the study on 8x8 latents
SIZES = [("small", 4, 128, 2), ("base", 6, 256, 4), ("large", 8, 384, 6)]
PATCHES = (2, 4)
BLOCKS = ("adaln_zero", "adaln", "cross_attention", "in_context")
RECIPE_LR = 2e-3  # configs/dit-mnist.yaml


def runs(lrs: list[float], blocks_size: str = "base", blocks_patch: int = 2) -> list[dict]:
    """Every block at each of ``lrs``, then the size x patch grid (adaLN-Zero at the recipe's learning rate). The
    block runs come first: their learning curves stop at earlier steps, and a grid model that is also a block run
    (adaLN-Zero at the recipe's lr) then reuses its final scores."""
    base = next(x for x in SIZES if x[0] == blocks_size)
    out = [dict(size=base[0], depth=base[1], hidden=base[2], heads=base[3], patch=blocks_patch, block=b, lr=lr,
                study="block") for b in BLOCKS for lr in lrs]
    return out + [dict(size=s, depth=d, hidden=h, heads=k, patch=p, block="adaln_zero", lr=RECIPE_LR, study="size")
                  for s, d, h, k in SIZES for p in PATCHES]


def tag(r: dict) -> str:
    return f"{r['size']}-p{r['patch']}-{r['block']}" + ("" if r["lr"] == RECIPE_LR else f"-lr{r['lr']:g}")


def first_stage(root: Path) -> Path:
    ae = REPO / "runs" / "quickstart-dit" / "autoencoder"
    if (ae / "checkpoints").is_dir():
        return ae
    ae = root / "autoencoder"
    if not (ae / "checkpoints").is_dir():
        finished(Trainer(load_config("autoencoder-mnist", ["train.steps=800"]), ae, progress=True).fit())
    return ae


def train_and_score(r: dict, ae: Path, run_dir: Path, steps: int, n: int, args) -> dict:
    """Train ``r`` to ``steps`` (resuming the run) and score ``n`` samples; the scores are kept beside the run."""
    done = run_dir / f"scores-{steps}-{n}.json"
    if done.exists():
        return json.loads(done.read_text())
    last = latest_checkpoint(run_dir)
    if last is not None and int(last.name.split("_")[-1]) > steps:
        sys.exit(f"{run_dir} is already past step {steps} ({last.name}), so its score there cannot be taken; "
                 f"remove the run or leave {steps} out of --track")
    overrides = [f"model.first_stage={ae}", f"train.steps={steps}", f"train.batch_size={args.batch}",
                 f"train.lr={r['lr']}", "train.sample_every=0",
                 # a checkpoint every 250 steps (the last two kept): a study of many hours loses little to a kill
                 f"train.checkpoint_every={min(250, steps)}", "train.keep_checkpoints=2",
                 f"model.dit.depth={r['depth']}", f"model.dit.hidden={r['hidden']}", f"model.dit.heads={r['heads']}",
                 f"model.dit.patch={r['patch']}", f"model.dit.block={r['block']}"]
    print(f"== {tag(r)}: to step {steps}", flush=True)
    res = Trainer(load_config("dit-mnist", overrides), run_dir, resume=(run_dir / "checkpoints").is_dir() or None,
                  progress=True).fit()
    finished(res)
    system = load(res.checkpoint)
    x = torch.zeros(1, system.channels, system.side, system.side)
    gflops = count_flops(system.dit, x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).gmacs
    m = evaluate_system(system, n=n, bpd_images=0, progress=True, sample_options={"guidance": args.guidance})
    result = {"steps": steps, "Gflops": gflops, "params (M)": sum(p.numel() for p in system.dit.parameters()) / 1e6,
              "FID": m["fid"], "FID real-vs-real": m["fid_real"], "class accuracy": m["class_accuracy"]}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=300, help="samples scored per model at the end")
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-4],
                    help="learning rates every block of the block comparison is trained at (its best is kept)")
    ap.add_argument("--blocks-size", choices=[s[0] for s in SIZES], default="base",
                    help="the model size of the block comparison")
    ap.add_argument("--track", type=int, nargs="*", default=None,
                    help="steps at which the block comparison is scored on the way (default: 4 even points)")
    ap.add_argument("--track-n", type=int, default=200, help="samples scored at each tracked step")
    ap.add_argument("--guidance", type=float, default=3.0,
                    help="guidance scale of the scored samples (1: none, the paper's protocol, which needs far longer "
                         "training than the default to separate the models)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dit-design-space")
    args = ap.parse_args(argv)
    track = sorted(set(args.track if args.track is not None else [args.steps * i // 4 for i in (1, 2, 3)]) -
                   {args.steps})
    ae = first_stage(args.out)
    rows, curves, real = [], {}, None
    for r in runs(args.lrs, args.blocks_size):
        run_dir = args.out / tag(r)
        if r["study"] == "block":  # the learning curve first: each tracked step resumes the run where it stopped
            curves[tag(r)] = [train_and_score(r, ae, run_dir, s, args.track_n, args) for s in track if s < args.steps]
        result = train_and_score(r, ae, run_dir, args.steps, args.n, args)
        if r["study"] == "block":
            curves[tag(r)].append(result)
        real = result["FID real-vs-real"]
        rows.append({"study": r["study"], "block": r["block"], "lr": r["lr"], "size": r["size"],
                     "depth x hidden": f"{r['depth']} x {r['hidden']}", "patch": r["patch"],
                     "tokens": (8 // r["patch"]) ** 2, "params (M)": round(result["params (M)"], 2),
                     "Gflops (MACs)": round(result["Gflops"], 4), "FID": round(result["FID"], 1),
                     "class accuracy": round(result["class accuracy"], 3), "_tag": tag(r)})
    for b in BLOCKS:  # each block's best learning rate by FID
        mine = [x for x in rows if x["study"] == "block" and x["block"] == b]
        best = min(mine, key=lambda x: x["FID"])
        for x in mine:
            x["best lr"] = "yes" if x is best and len(mine) > 1 else ""
    plot(rows, curves, REPO / "docs" / "images" / "dit_design_space.png", args)
    notes = (f"Latent DiT over the quickstart's first stage (8x8x4), flagship recipe, {args.steps} steps at batch "
             f"{args.batch} for every model; {args.n} samples at guidance {args.guidance} scored on MNIST features "
             f"against the held-out digits (real-vs-real FID at this count: {real:.1f}). Block comparison at "
             f"{args.blocks_size} size, patch 2, each block at learning rates {', '.join(f'{x:g}' for x in args.lrs)} "
             f"(best lr: its lower FID); its learning curves ({args.track_n} samples at steps "
             f"{', '.join(map(str, track))}) are in the plot. Gflops: one forward pass of one latent. "
             "Plot: docs/images/dit_design_space.png.")
    table = [{k: v for k, v in x.items() if not k.startswith("_")} for x in rows]
    defaults = {k: ap.get_default(k) for k in ("steps", "batch", "n", "guidance", "track_n", "blocks_size")}
    given = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    if args.lrs != ap.get_default("lrs"):
        given += " --lrs " + " ".join(f"{x:g}" for x in args.lrs)
    if args.track is not None:
        given += " --track " + " ".join(map(str, args.track))
    record("dit_design_space", "DiT design space on mnist5k (equal training steps)", table, notes,
           command="python benchmarks/dit_design_space.py" + given)


def plot(rows: list[dict], curves: dict[str, list[dict]], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4))
    for patch, marker in zip(PATCHES, ("o", "s")):
        pts = sorted((r["Gflops (MACs)"], r["FID"], r["size"]) for r in rows if r["patch"] == patch and r["study"] == "size")
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"patch {patch} ({(8 // patch) ** 2} tokens)")
        for g, f, name in pts:
            a.annotate(name, (g, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel("Gflops per forward pass (MACs)")
    a.set_ylabel("FID (MNIST features, lower is better)")
    a.set_title("adaLN-Zero: size and patch")
    a.legend()
    blocks = [r for r in rows if r["study"] == "block" and (r.get("best lr") or len(args.lrs) == 1)]
    b.bar([r["block"] for r in blocks], [r["FID"] for r in blocks],
          color=["C2" if r["block"] == "adaln_zero" else "C7" for r in blocks])
    for i, r in enumerate(blocks):
        b.annotate(f"lr {r['lr']:g}\n{100 * r['class accuracy']:.0f}%", (i, r["FID"]), ha="center",
                   textcoords="offset points", xytext=(0, 3), fontsize=8)
    b.set_ylim(0, 1.2 * max((r["FID"] for r in blocks), default=1))  # room for the labels
    b.set_ylabel("FID")
    b.set_title(f"conditioning block ({args.blocks_size}, patch 2), each at its best lr")
    for k, block in enumerate(BLOCKS):
        for r in (r for r in rows if r["study"] == "block" and r["block"] == block):
            pts = curves[r["_tag"]]
            c.plot([p["steps"] for p in pts], [100 * p["class accuracy"] for p in pts], color=f"C{k}", marker="o",
                   linestyle="-" if r.get("best lr") or len(args.lrs) == 1 else ":", label=f"{block}, lr {r['lr']:g}")
    c.axhline(10, color="grey", linestyle=":", linewidth=1)
    c.set_xlabel("training steps")
    c.set_ylabel("class accuracy of guided samples (%)")
    c.set_title("learning curves (dotted: the other lr; grey: chance)")
    c.legend(fontsize=7)
    fig.suptitle(f"DiT design space on mnist5k: {args.steps} steps at batch {args.batch}, {args.n} samples at "
                 f"guidance {args.guidance}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
