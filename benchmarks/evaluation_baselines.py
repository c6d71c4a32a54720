"""Real-vs-real baselines of the sample metrics on mnist5k, and a checkpoint scored beside them.

    python benchmarks/evaluation_baselines.py [--checkpoint runs/quickstart-vae] [--counts 500 4500]

For each sample count n: n samples from the checkpoint and n real training images, each scored against the
500 held-out images on MNIST features (FID, KID, Inception Score, precision, recall, class accuracy).
"""

import argparse
from pathlib import Path

import difflineage
from difflineage.bench import record
from difflineage.eval import evaluate_system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/quickstart-vae"))
    p.add_argument("--counts", type=int, nargs="+", default=[500, 4500])
    args = p.parse_args()

    system = difflineage.load(args.checkpoint)
    rows = []
    for n in args.counts:
        m = evaluate_system(system, n=n, k=1, progress=False)
        rows.append({"n": n, "images": "real (train)", "FID": m["fid_real"], "KID": m["kid_real"],
                     "IS": m["inception_score_real"], "precision": m["precision_real"], "recall": m["recall_real"]})
        rows.append({"n": n, "images": f"{system.config.system} samples", "FID": m["fid"], "KID": m["kid"],
                     "IS": m["inception_score"], "precision": m["precision"], "recall": m["recall"]})
        print(rows[-2], rows[-1], sep="\n")
    notes = (f"Reference: the 500 held-out mnist5k images. Feature network: {m['feature_network']} (difflineage's "
             "MNIST classifier, 128-d penultimate layer; its logits give IS). 'real (train)' rows score n training "
             f"images (all 4,500 at n = 4,500) as if they were samples. Checkpoint: `{args.checkpoint}` (EMA weights).")
    record("evaluation_baselines", "Sample metrics on mnist5k: real-vs-real baselines and the VAE", rows, notes,
           command="python benchmarks/evaluation_baselines.py --checkpoint " + str(args.checkpoint))


if __name__ == "__main__":
    main()
