"""DALL-E on mnist5k: sample quality with and without CLIP reranking, CLIP retrieval, and the key/value cache.

    python benchmarks/dalle_mnist.py                 # trains the quickstart (three parts) if needed, then measures

1. Runs ``difflineage quickstart --system dalle`` in ``--run``, unless it has finished there (metrics.json).
2. Scores ``--n`` samples (the classes in turn, captions from the data's template) drawn plainly and as the
   best of ``--rerank`` candidates by CLIP score, without guidance and at the recipe's guidance: FID and class
   accuracy on the MNIST classifier (independent of the CLIP), and the CLIP score (the reranking CLIP is also the
   scoring one, so that gain is partly by construction).
3. CLIP's retrieval accuracy on the held-out image/caption pairs, and the prior's held-out NLL.
4. Sampling with and without the key/value cache, side by side on one batch, same seed: identical tokens,
   the time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import difflineage
from harness import record, side_by_side

from difflineage.cli import main as cli
from difflineage.data import load_dataset
from difflineage.eval import evaluate_system


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart-dalle")
    ap.add_argument("--n", type=int, default=1000, help="samples scored per setting")
    ap.add_argument("--rerank", type=int, default=8)
    ap.add_argument("--cache-batch", type=int, default=100, help="images per sampling call in the cache timing")
    args = ap.parse_args(argv)
    if not (Path(args.run) / "metrics.json").exists():  # the quickstart writes it when it has finished
        if cli(["quickstart", "--system", "dalle", "--out", args.run, "--no-progress"]) != 0:
            raise SystemExit("the quickstart did not finish")
    system = difflineage.load(args.run)
    heldout = load_dataset(system.config.data, "heldout")
    rows = []
    own = system.evaluate(heldout, progress=False)
    recipe_guidance = system.config.model.guidance
    for guidance in sorted({1.0, recipe_guidance}):
        pair = []
        for r in (1, args.rerank):
            print(f"scoring {args.n} samples, guidance {guidance}, rerank {r}", file=sys.stderr)
            m = evaluate_system(system, n=args.n, progress=False, sample_options={"rerank": r, "guidance": guidance},
                                seed=1)
            pair.append({"guidance": guidance, "samples": f"best of {r} by CLIP" if r > 1 else "plain",
                         "FID": round(m["fid"], 1), "class accuracy": f"{m['class_accuracy']:.1%}",
                         "CLIP score": round(m["clip_score"], 2)})
            real = m
        base, best = pair
        acc_gain = float(best["class accuracy"][:-1]) - float(base["class accuracy"][:-1])
        rows += pair + [{"guidance": guidance, "samples": f"gain of reranking {args.rerank}",
                         "FID": round(best["FID"] - base["FID"], 1), "class accuracy": f"{acc_gain:+.1f} points",
                         "CLIP score": round(best["CLIP score"] - base["CLIP score"], 2)}]

    # the key/value cache: one batch of captions, the same seed, with and without
    labels = torch.arange(args.cache_batch) % (system.num_classes or 1)
    tokens = {}

    def draw(cache: bool):
        def run():
            tokens[cache] = system.sample(args.cache_batch, labels, generator=torch.Generator().manual_seed(0),
                                          use_cache=cache)
        return run
    t = side_by_side({"cache": draw(True), "no cache": draw(False)}, warmup=1, repeats=3)
    same = torch.equal(tokens[True], tokens[False])
    speed = {"images per call": args.cache_batch, "with cache (s)": round(t["cache"].median_s, 2),
             "without cache (s)": round(t["no cache"].median_s, 2),
             "speed-up": f"{t['no cache'].median_s / t['cache'].median_s:.2f}x", "identical samples": same}
    notes = (f"{args.run}: configs/dalle-dvae-mnist.yaml, dalle-clip-mnist.yaml, dalle-mnist.yaml (the quickstart). "
             f"{args.n} samples per row, the classes in turn, captions 'a handwritten digit NAME'; FID and class "
             f"accuracy on the MNIST classifier against the {len(heldout)} held-out digits; CLIP score = 100 x mean "
             f"cosine of the quickstart's own CLIP (the one that reranks; real held-out pairs score "
             f"{real['clip_score_real']:.2f}; real-vs-real FID {real['fid_real']:.1f}, class accuracy "
             f"{real['class_accuracy_real']:.1%}). Held-out: CLIP retrieval image->caption "
             f"{own['clip_retrieval_image_to_caption']:.1%}, caption->image {own['clip_retrieval_caption_to_image']:.1%}; "
             f"prior NLL {own['prior_nll_bits_per_image_token']:.3f} bits per image token; dVAE PSNR "
             f"{own['recon_psnr_db']:.1f} dB, {own['codes_used']} of {system.config.model.dvae.codes} codes used.")
    cmd = "python benchmarks/dalle_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record("dalle_mnist", "DALL-E on mnist5k: samples with and without CLIP reranking", rows, notes, command=cmd.strip())
    record("dalle_kv_cache", "DALL-E sampling with and without the key/value cache", [speed],
           f"The quickstart's transformer ({system.config.model.transformer.depth} layers, width "
           f"{system.config.model.transformer.width}); {args.cache_batch} images of {system.transformer.image_length} "
           f"tokens per call after {system.config.model.transformer.text_length} caption tokens, at the recipe's guidance "
           f"{recipe_guidance} (two streams); median of 3 interleaved calls, the same seed for both (identical samples: "
           "the images are compared).", command=cmd.strip())
    print(own)


if __name__ == "__main__":
    main()
