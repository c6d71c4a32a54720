"""DiT's design space at small scale on mnist5k, at equal training steps: the four conditioning blocks, each at its
best of two learning rates, with their learning curves; and three model sizes x two patch sizes of adaLN-Zero; FID
(MNIST features) and class accuracy against Gflops.

    python benchmarks/dit_design_space.py --steps 600 --lrs 2e-3        # the first study's budget (~30 min, 2 cores)
    python benchmarks/dit_design_space.py                               # 3,000 steps, blocks at 2e-3 and 5e-4 (~2.5 h, Zen 5)

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
from harness import REPO, finished, record

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
    return score(load(res.checkpoint), steps, n, args.guidance, done)


def score(system, steps: int, n: int, guidance: float, done: Path) -> dict:
    """Score ``n`` samples of ``system`` at ``guidance`` and keep the result in ``done``."""
    x = torch.zeros(1, system.channels, system.side, system.side)
    gflops = count_flops(system.dit, x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).gmacs
    m = evaluate_system(system, n=n, bpd_images=0, progress=True, sample_options={"guidance": guidance})
    result = {"steps": steps, "Gflops": gflops, "params (M)": sum(p.numel() for p in system.dit.parameters()) / 1e6,
              "FID": m["fid"], "FID real-vs-real": m["fid_real"], "class accuracy": m["class_accuracy"]}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def score_checkpoint(run_dir: Path, steps: int, n: int, guidance: float, name: str) -> dict:
    """Score ``n`` samples of the run's checkpoint at ``steps`` (kept in ``run_dir/name``)."""
    done = run_dir / name
    if done.exists():
        return json.loads(done.read_text())
    ckpt = run_dir / "checkpoints" / f"step_{steps:07d}"
    if not ckpt.is_dir():
        sys.exit(f"{run_dir} has no checkpoint at step {steps} to score; remove the run to train it again")
    print(f"== {run_dir.name}: {n} samples at step {steps}, guidance {guidance:g}", flush=True)
    return score(load(ckpt), steps, n, guidance, done)


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
                    help="guidance scale of the scored samples (1: none, the paper's protocol, which --unguided "
                         "adds beside the guided scores of the final models)")
    ap.add_argument("--unguided", action=argparse.BooleanOptionalAction, default=True,
                    help="also score each final model without guidance (the paper's protocol)")
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
        # the paper's protocol: no guidance (scale 1, the conditional model)
        plain = (score_checkpoint(run_dir, args.steps, args.n, 1.0, f"scores-{args.steps}-{args.n}-unguided.json")
                 if args.unguided else None)
        if r["study"] == "block":  # the curve's last point at the curve's sample count (FID is biased by the count)
            curves[tag(r)].append(result if args.track_n == args.n else score_checkpoint(
                run_dir, args.steps, args.track_n, args.guidance, f"scores-{args.steps}-{args.track_n}.json"))
        real = result["FID real-vs-real"]
        rows.append({"study": r["study"], "block": r["block"], "lr": r["lr"], "size": r["size"],
                     "depth x hidden": f"{r['depth']} x {r['hidden']}", "patch": r["patch"],
                     "tokens": (8 // r["patch"]) ** 2, "params (M)": round(result["params (M)"], 2),
                     "Gflops (MACs)": round(result["Gflops"], 4), "FID": round(result["FID"], 1),
                     "class accuracy": round(result["class accuracy"], 3), "_tag": tag(r)})
        if plain is not None:
            rows[-1].update({"FID unguided": round(plain["FID"], 1),
                             "accuracy unguided": round(plain["class accuracy"], 3)})
    # each block's best learning rate by FID: unguided where scored (the paper's protocol; guided samples lose
    # diversity as a model trains on, so their FID can favour the less trained model)
    key = "FID unguided" if args.unguided else "FID"
    for b in BLOCKS:
        mine = [x for x in rows if x["study"] == "block" and x["block"] == b]
        best = min(mine, key=lambda x: x[key])
        for x in mine:
            x["best lr"] = "yes" if x is best and len(mine) > 1 else ""
    plot(rows, curves, REPO / "docs" / "images" / "dit_design_space.png", args)
    notes = (f"Latent DiT over the quickstart's first stage (8x8x4), flagship recipe, {args.steps} steps at batch "
             f"{args.batch} for every model; {args.n} samples at guidance {args.guidance} scored on MNIST features "
             f"against the held-out digits (real-vs-real FID at this count: {real:.1f}). Block comparison at "
             f"{args.blocks_size} size, patch 2, each block at learning rates {', '.join(f'{x:g}' for x in args.lrs)} "
             f"(best lr: its lower FID{' unguided' if args.unguided else ''}); its learning curves ({args.track_n} samples at steps "
             f"{', '.join(map(str, track))}) are in the plot. "
             + (f"FID and accuracy unguided: {args.n} samples of the same final models without guidance (scale 1, "
                "the paper's protocol). " if args.unguided else "")
             + "Gflops: one forward pass of one latent. "
             "Plot: docs/images/dit_design_space.png.")
    table = [{k: v for k, v in x.items() if not k.startswith("_")} for x in rows]
    defaults = {k: ap.get_default(k) for k in ("steps", "batch", "n", "guidance", "track_n", "blocks_size")}
    given = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    if not args.unguided:
        given += " --no-unguided"
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

    fig, ((a, b), (c, f)) = plt.subplots(2, 2, figsize=(13, 9))
    for patch, marker in zip(PATCHES, ("o", "s")):
        mine = sorted((r for r in rows if r["patch"] == patch and r["study"] == "size"), key=lambda r: r["Gflops (MACs)"])
        g = [r["Gflops (MACs)"] for r in mine]
        a.plot(g, [r["FID"] for r in mine], marker=marker, color=f"C{patch // 2 - 1}",
               label=f"patch {patch} ({(8 // patch) ** 2} tokens), guidance {args.guidance:g}")
        if args.unguided:
            a.plot(g, [r["FID unguided"] for r in mine], marker=marker, color=f"C{patch // 2 - 1}", linestyle=":",
                   label=f"patch {patch}, unguided")
        for r in mine:
            a.annotate(r["size"], (r["Gflops (MACs)"], r["FID"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel("Gflops per forward pass (MACs)")
    a.set_ylabel("FID (MNIST features, lower is better)")
    a.set_title("adaLN-Zero: size and patch")
    a.legend()
    blocks = [r for r in rows if r["study"] == "block" and (r.get("best lr") or len(args.lrs) == 1)]
    bars = [("FID", "class accuracy", f"guidance {args.guidance:g}")]
    if args.unguided:
        bars.append(("FID unguided", "accuracy unguided", "unguided"))
    width = 0.8 / len(bars)
    for j, (fid, acc, label) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(blocks))]
        b.bar(xs, [r[fid] for r in blocks], width, label=label, color=f"C{j + 2}", alpha=1 if j == 0 else 0.6)
        for x, r in zip(xs, blocks):
            b.annotate(f"{100 * r[acc]:.0f}%", (x, r[fid]), ha="center", textcoords="offset points", xytext=(0, 3),
                       fontsize=8)
    b.set_xticks(range(len(blocks)), [f"{r['block']}\nlr {r['lr']:g}" for r in blocks])
    b.set_ylim(0, 1.2 * max((r[f] for r in blocks for f, _, _ in bars), default=1))  # room for the labels
    b.legend(fontsize=8)
    b.set_ylabel("FID")
    b.set_title(f"conditioning block ({args.blocks_size}, patch 2), at its best lr; labels: accuracy")
    for k, block in enumerate(BLOCKS):
        for r in (r for r in rows if r["study"] == "block" and r["block"] == block):
            pts = curves[r["_tag"]]
            style = dict(color=f"C{k}", marker="o", label=f"{block}, lr {r['lr']:g}",
                         linestyle="-" if r.get("best lr") or len(args.lrs) == 1 else ":")
            c.plot([p["steps"] for p in pts], [100 * p["class accuracy"] for p in pts], **style)
            f.plot([p["steps"] for p in pts], [p["FID"] for p in pts], **style)
    c.axhline(10, color="grey", linestyle=":", linewidth=1)
    c.set_xlabel("training steps")
    c.set_ylabel("class accuracy of guided samples (%)")
    c.set_title("learning curves (dotted: the other lr; grey: chance)")
    c.legend(fontsize=7)
    f.set_yscale("log")
    f.set_xlabel("training steps")
    f.set_ylabel("FID of guided samples")
    f.set_title(f"learning curves: FID ({args.track_n} samples each)")
    fig.suptitle(f"DiT design space on mnist5k: {args.steps} steps at batch {args.batch}, {args.n} samples at "
                 f"guidance {args.guidance}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
