"""Real-vs-real baselines of the sample metrics on mnist5k, and a checkpoint scored beside them.

    python benchmarks/evaluation_baselines.py [--checkpoint runs/quickstart-vae] [--counts 500 4500]
    python benchmarks/evaluation_baselines.py --real-only --counts 300 500 1000 4500    # no checkpoint needed

For each sample count n: n samples from the checkpoint and n real training images, each scored against the
500 held-out images on MNIST features (FID, KID, Inception Score, precision, recall, class accuracy). The real
rows are the ``_real`` values every evaluation at that n (seed 0) reports beside its own; ``--real-only`` scores
them alone.
"""

import argparse
from pathlib import Path

import difflineage
from harness import record

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.eval import evaluate_system, feature_network, score_samples


def real_row(m: dict, n: int) -> dict:
    return {"n": n, "images": "real (train)", "FID": m["fid_real"], "KID": m["kid_real"],
            "IS": m["inception_score_real"], "precision": m["precision_real"], "recall": m["recall_real"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/quickstart-vae"))
    p.add_argument("--counts", type=int, nargs="+", default=[500, 4500])
    p.add_argument("--real-only", action="store_true", help="only the real-vs-real rows (no checkpoint)")
    args = p.parse_args()

    rows = []
    if args.real_only:
        data = DataConfig(source="mnist5k")
        train, heldout = load_dataset(data, "train"), load_dataset(data, "heldout")
        net = feature_network("mnist", progress=False)
        for n in args.counts:  # the real images as the "samples" too: only the _real values are kept
            m = score_samples(train.images[:n], None, heldout, train, net, seed=0, progress=False)
            rows.append(real_row(m, n))
            print(rows[-1])
        notes = (f"Reference: the 500 held-out mnist5k images. Feature network: {m['feature_network']} (difflineage's "
                 "shipped MNIST classifier, 128-d penultimate layer; its logits give IS). 'real (train)' rows score n "
                 "training images (seed 0's pick; all 4,500 at n = 4,500) as if they were samples: the `_real` "
                 "values of any evaluation at that n.")
        command = "python benchmarks/evaluation_baselines.py --real-only --counts " + " ".join(map(str, args.counts))
    else:
        system = difflineage.load(args.checkpoint)
        for n in args.counts:
            m = evaluate_system(system, n=n, k=1, progress=False)
            rows.append(real_row(m, n))
            rows.append({"n": n, "images": f"{system.config.system} samples", "FID": m["fid"], "KID": m["kid"],
                         "IS": m["inception_score"], "precision": m["precision"], "recall": m["recall"]})
            print(rows[-2], rows[-1], sep="\n")
        notes = (f"Reference: the 500 held-out mnist5k images. Feature network: {m['feature_network']} (difflineage's "
                 "shipped MNIST classifier, 128-d penultimate layer; its logits give IS). 'real (train)' rows score n "
                 "training images (all 4,500 at n = 4,500) as if they were samples. Checkpoint: "
                 f"`{args.checkpoint}` (EMA weights).")
        command = ("python benchmarks/evaluation_baselines.py --checkpoint " + str(args.checkpoint) + " --counts "
                   + " ".join(map(str, args.counts)))
    record("evaluation_baselines", "Sample metrics on mnist5k: real-vs-real baselines and the VAE", rows, notes,
           command=command)


if __name__ == "__main__":
    main()
