"""The seed's third DiT finding, measured: "more sampling steps do not make up for a smaller model". Three latent DiT
sizes (small 4 x 128, base 6 x 256 = the quickstart's, large 8 x 384; adaLN-Zero, patch 2) trained on mnist5k with
the flagship recipe for the same steps (bf16 only where it is native), then sampled with DDIM at 5 to 250 steps; FID (MNIST features) and class
accuracy of each, with the sampling Gflops spent per image (network Gflops x steps x 2 for guidance).

    python benchmarks/dit_steps_vs_size.py --run base=runs/quickstart-dit   # the quickstart's DiT as the base size

About four hours on two CPU cores (the large model's training and the 250-step rows dominate); each row is kept as
it is measured, so an interrupted run continues where it stopped.

Each model's run is reused when complete. Writes docs/images/dit_steps_vs_size.png and a table in
docs/benchmarks.md, and says plainly whether the small model at its most steps reaches the large one at its fewest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from difflineage import load
from harness import REPO, KeptRows, record, trained_run

from difflineage.checkpoint import latest_checkpoint
from difflineage.eval import evaluate_system
from difflineage.eval.flops import count_flops
from difflineage.machine import machine_description

SIZES = {"small": (4, 128, 2), "base": (6, 256, 4), "large": (8, 384, 6)}  # depth, hidden, heads
STEPS = (5, 10, 25, 50, 100, 250)


def first_stage() -> Path:
    ae = REPO / "runs" / "quickstart-dit" / "autoencoder"
    if latest_checkpoint(ae) is None:
        sys.exit(f"no first stage in {ae}: run `difflineage quickstart` first (this study reuses its autoencoder)")
    return ae


def trained(size: str, out: Path, ae: Path, steps: int, given: dict[str, Path]) -> Path:
    depth, hidden, heads = SIZES[size]
    run_dir = given.get(size, out / size)
    # a run trained elsewhere with the same recipe may stand in (the quickstart's DiT is the base size)
    return trained_run("dit-mnist", [f"model.first_stage={ae}", f"model.dit.depth={depth}",
                                     f"model.dit.hidden={hidden}", f"model.dit.heads={heads}", "train.sample_every=0"],
                       run_dir, steps,
                       same=("model.first_stage", "model.dit.depth", "model.dit.hidden", "model.dit.heads",
                             "model.dit.patch", "model.dit.block"))


def verdicts(rows: list[dict], sizes: list[str], steps: list[int]) -> list[str]:
    """For each pair of sizes, smaller first: whether the smaller one at its best over the sampling steps reaches the
    larger one at its fewest steps (the seed's claim is that it does not); and, said as plainly, any larger size whose
    best FID is worse than a smaller one's (then the pair does not test the claim at this budget and guidance)."""
    best = {s: min(r["FID"] for r in rows if r["size"] == s) for s in sizes}
    fewest = {s: next(r["FID"] for r in rows if r["size"] == s and r["sampling steps"] == min(steps)) for s in sizes}
    out = []
    for i, small in enumerate(sizes):
        for large in sizes[i + 1:]:
            if best[large] > best[small]:
                out.append(f"The {large} model's best FID ({best[large]:.1f}) is worse than the {small} one's "
                           f"({best[small]:.1f}), so this pair does not test the claim at this budget and guidance.")
            elif best[small] <= fewest[large]:
                out.append(f"More steps **did** let the {small} model (best {best[small]:.1f}) catch the {large} one "
                           f"at {min(steps)} steps ({fewest[large]:.1f}), against the seed's claim.")
            else:
                out.append(f"More steps **did not** let the {small} model (best FID {best[small]:.1f} over "
                           f"{min(steps)}-{max(steps)} steps) catch the {large} one at {min(steps)} steps "
                           f"({fewest[large]:.1f}), as the seed claims.")
    return out


def plot(rows: list[dict], path: Path, real: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for size in SIZES:
        mine = [r for r in rows if r["size"] == size]
        a.plot([r["sampling steps"] for r in mine], [r["FID"] for r in mine], marker="o", label=size)
        b.plot([r["sampling Gflops per image"] for r in mine], [r["FID"] for r in mine], marker="o", label=size)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.axhline(real, color="grey", linestyle=":", label=f"real vs real ({real:.1f})")
        ax.set_ylabel("FID (MNIST features)")
        ax.legend()
    a.set_xlabel("DDIM sampling steps")
    b.set_xlabel("sampling Gflops per image (MACs; network x steps x 2)")
    a.set_title("FID against sampling steps")
    b.set_title("FID against sampling compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-steps", type=int, default=1000, help="training steps of every size (the quickstart's)")
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="DDIM sampling steps to score")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--n", type=int, default=500, help="samples scored per (size, steps)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dit-steps-vs-size")
    ap.add_argument("--run", nargs="+", default=[], metavar="SIZE=DIR",
                    help="use a run trained with the same recipe for a size, e.g. base=runs/quickstart-dit")
    args = ap.parse_args(argv)
    given = {}
    for item in args.run:
        size, _, path = item.partition("=")
        if size not in SIZES or not path:
            sys.exit(f"--run {item!r}: give SIZE=DIR with SIZE one of {', '.join(SIZES)}")
        given[size] = Path(path)
    ae = first_stage()
    # Each (size, steps) row is kept as it is measured (hours in all on two cores); a rerun on this machine with the
    # same settings reuses them, and the trained models are reused wherever they are complete.
    kept = KeptRows(args.out / "rows.jsonl", {"machine": machine_description(), "n": args.n,
                                              "train_steps": args.train_steps, "runs": sorted(args.run)})
    rows = []
    for size in args.sizes:
        system = load(trained(size, args.out, ae, args.train_steps, given))
        x = torch.zeros(1, system.channels, system.side, system.side)
        gmacs = count_flops(system.dit, x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).gmacs
        for steps in args.steps:
            if kept.get(f"{size}-{steps}") is not None:
                rows.append(kept.get(f"{size}-{steps}"))
                continue
            print(f"== {size}, {steps} steps", file=sys.stderr)
            m = evaluate_system(system, n=args.n, bpd_images=0, progress=False, features="mnist",
                                sample_options={"sampler": "ddim", "steps": steps})
            rows.append({"size": size, "depth x hidden": "{} x {}".format(*SIZES[size][:2]),
                         "params (M)": round(sum(p.numel() for p in system.dit.parameters()) / 1e6, 2),
                         "sampling steps": steps, "sampling Gflops per image": round(gmacs * steps * 2, 3),
                         "FID": round(m["fid"], 1), "class accuracy": f"{100 * m['class_accuracy']:.1f}%",
                         "sampling (s)": round(m["sampling_seconds"], 1), "_real": m["fid_real"]})
            kept.keep(f"{size}-{steps}", rows[-1])
    real = rows[0]["_real"]
    verdict = " ".join(verdicts(rows, args.sizes, args.steps))
    notes = (f"Three latent DiTs (adaLN-Zero, patch 2, the quickstart's first stage), each trained {args.train_steps} "
             f"steps with the flagship recipe; {args.n} samples per row, DDIM, guidance 3, scored on MNIST "
             f"features (real-vs-real FID at this count: {real:.1f}). {verdict} "
             "![FID against sampling steps for three DiT sizes](images/dit_steps_vs_size.png)")
    plot(rows, REPO / "docs" / "images" / "dit_steps_vs_size.png", real)
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    cmd = "python benchmarks/dit_steps_vs_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record("dit_steps_vs_size", "DiT: do more sampling steps make up for a smaller model?", table, notes,
           command=cmd.strip())


if __name__ == "__main__":
    main()
