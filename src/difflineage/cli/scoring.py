"""``difflineage evaluate`` (a checkpoint's samples and held-out scores; FID-50K in ADM's convention with
--reference), ``difflineage score`` (an ADM-layout npz against a reference batch) and ``difflineage reference``
(a reference batch of one's own data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from difflineage.eval.features import FEATURE_KINDS
from difflineage.cli.common import (
    add_data_overrides,
    add_device_option,
    add_inception_options,
    add_sampling_options,
    format_metrics,
    sampling_options,
)


def add_parsers(sub) -> None:
    e = sub.add_parser("evaluate", help="score a checkpoint: FID/KID/IS/precision/recall, class accuracy, likelihood",
                       description="Draw --n samples (in batches; spread over processes under torchrun), score them "
                                   "against the held-out split with FID, KID, Inception Score and precision/recall on a "
                                   "feature network, each beside its real-vs-real value at the same count; add the class "
                                   "accuracy of conditional samples and the system's own held-out scores (VAE: ELBO and "
                                   "importance-weighted NLL). Writes metrics.json.")
    e.add_argument("checkpoint", type=Path, help="checkpoint directory or run directory")
    e.add_argument("--n", "--num-samples", dest="n", type=int, default=1000,
                   help="samples to draw and score (default 1000; 0 skips sample metrics). Under torchrun write "
                        "--num-samples: torchrun reads --n as one of its own options")
    e.add_argument("--features", default="auto", choices=list(FEATURE_KINDS),
                   help="feature network: auto picks the shipped OpenMoji classifier for openmoji, the MNIST classifier "
                        "for other 1-channel data, InceptionV3 otherwise")
    add_inception_options(e, standalone=False)
    add_sampling_options(e)
    e.add_argument("--clip", type=Path, default=None, metavar="CKPT",
                   help="caption-conditioned systems: the CLIP for the CLIP score (a DALL-E clip-stage checkpoint); "
                        "default: on openmoji the shipped scoring CLIP (CLIP score and caption retrieval), elsewhere "
                        "the CLIP the system carries, if any")
    e.add_argument("--reference", type=Path, default=None, metavar="NPZ",
                   help="FID-50K as the papers: score against this ADM reference batch (e.g. "
                        "VIRTUAL_imagenet256_labeled.npz) with the ADM evaluator's conventions; the samples are drawn "
                        "into NPZ.parts/ over the torchrun processes (run the command again to continue an interrupted "
                        "run), labels uniform, DiT/DyDiT at 250 DDPM steps and guidance 1.5 unless told otherwise, then "
                        "merged into --npz. Needs --inception-weights")
    e.add_argument("--keep-parts", action="store_true", help="with --reference: keep NPZ.parts/ after the merge")
    e.add_argument("--batch-size", type=int, default=250, help="samples per sampling batch (default 250)")
    e.add_argument("--npz", type=Path, default=None,
                   help="also save the samples as ADM's samples.npz (arr_0, uint8 NHWC); with --reference, where the "
                        "merged samples go (default CHECKPOINT/samples_N.npz)")
    e.add_argument("--split", default="heldout", choices=["heldout", "train"], help="reference split (default heldout)")
    e.add_argument("--k", type=int, default=1000, help="VAE: importance samples per image for the NLL bound (default 1000)")
    e.add_argument("--bpd-images", type=int, default=100,
                   help="diffusion: held-out images for the bits/dim bound (default 100; 0 skips it)")
    e.add_argument("--bpd-steps", type=int, default=None,
                   help="diffusion: steps of the chain for the bound (default: all T; fewer gives that chain's bound)")
    e.add_argument("--out", type=Path, default=None, help="metrics JSON to write (default: CHECKPOINT/metrics.json)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    e.add_argument("--bf16", action="store_true",
                   help="draw the samples under bfloat16 autocast (the held-out likelihood stays fp32); docs/dit.md "
                        "compares the scores with and without")
    e.add_argument("--fast", action="store_true",
                   help="draw the samples the fastest way here (as sample --fast: DPM-Solver++ at 20 steps unless "
                        "--steps, a step cache for DiT and DyDiT calibrated on the model, bf16 autocast where native); "
                        "metrics.json records the choices (docs/sampling.md measures what they cost in FID)")
    add_device_option(e, per_process=True)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("score", help="score an ADM-layout sample npz against an ADM reference batch (FID-50K etc.)",
                       description="FID, sFID, Inception Score and precision/recall of samples (uint8 N x H x W x 3 in "
                                   "arr_0, as 'sample --npz' and 'evaluate --npz' write them) against an ADM reference "
                                   "batch (e.g. VIRTUAL_imagenet256_labeled.npz), computed as ADM's evaluator does: the "
                                   "numbers the DiT and DyDiT papers report.")
    r.add_argument("samples", type=Path, help="sample batch .npz (arr_0)")
    r.add_argument("--reference", type=Path, required=True, help="ADM reference batch .npz (arr_0, mu, sigma, mu_s, sigma_s)")
    r.add_argument("--out", type=Path, default=None, help="also write the scores as JSON")
    add_inception_options(r, standalone=True)
    r.set_defaults(func=cmd_score)

    f = sub.add_parser("reference", help="write an ADM reference batch of a data source's held-out images",
                       description="Write a reference batch in ADM's layout (arr_0 images, mu/sigma pool statistics, "
                                   "mu_s/sigma_s spatial statistics) from --n images spread over a split of a data "
                                   "source, cropped as training crops them, for `evaluate --reference` and `score`. "
                                   "For data of one's own; ImageNet-256 FID-50K is scored against ADM's "
                                   "VIRTUAL_imagenet256_labeled.npz, as the papers are.")
    f.add_argument("--data", required=True, metavar="SOURCE", help="the data source (imagenet:PATH, folder:PATH, ...)")
    f.add_argument("--image-size", type=int, required=True, help="the side the images are cropped to")
    f.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    f.add_argument("--split", default="heldout", choices=["heldout", "train"], help="the split (default heldout)")
    f.add_argument("--n", "--num-samples", dest="n", type=int, default=10000,
                   help="images (default 10000, the ADM batches' count)")
    f.add_argument("--out", type=Path, required=True, help="the reference batch .npz to write")
    add_data_overrides(f)
    add_inception_options(f, standalone=True)
    f.set_defaults(func=cmd_reference)


def cmd_evaluate(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.eval import evaluate_system
    from difflineage.systems import load
    from difflineage.train.distributed import cleanup, init_distributed

    if args.n < 0:
        print("error: --n must be 0 or more", file=sys.stderr)
        return 2
    info = init_distributed(args.device)
    try:
        device = str(info.device)  # auto resolved, per process under torchrun
        path = resolve_checkpoint(args.checkpoint)
        system = load(path, use_ema=not args.no_ema, device=device)
        options = sampling_options(args)
        if args.fast and args.n > 0:
            options, args.bf16 = fast_evaluation(args, system, options, info.is_main)
        if args.reference is not None:
            return _evaluate_adm(args, system, path, options, info)
        out = args.out or path / "metrics.json"
        try:
            metrics = evaluate_system(system, split=args.split, n=args.n, features=args.features,
                                      inception_weights=args.inception_weights, seed=args.seed,
                                      inception_resize=args.inception_resize,
                                      progress=not args.no_progress, out=out, npz=args.npz, batch_size=args.batch_size,
                                      sample_options=options, k=args.k, bpd_images=args.bpd_images,
                                      bpd_steps=args.bpd_steps, bf16=args.bf16, clip=args.clip, checkpoint=path)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    finally:
        cleanup(info)
    if info.is_main:
        print(format_metrics(metrics))
        if args.n > 0 and system.caption_conditioned and "clip_score" not in metrics:
            print("note: no CLIP score without a CLIP: add --clip CKPT (a DALL-E clip-stage checkpoint, e.g. "
                  "runs/quickstart-dalle/clip from `difflineage quickstart --system dalle`)")
        print(f"wrote {out}")
    return 0


def fast_evaluation(args, system, options: dict, say: bool) -> tuple[dict, bool]:
    """``evaluate --fast``: the fast path's sampling options and bf16 choice (eval.sampling.fast_sampling), with
    FID-50K's guidance kept under --reference (its sampler and step count are what --fast replaces)."""
    from difflineage.eval.sampling import fast_sampling, fid_sampling_defaults

    if args.reference is not None:
        options = {**{k: v for k, v in fid_sampling_defaults(system).items() if k == "guidance"}, **options}
    options, bf16, said = fast_sampling(system, options, seed=args.seed)
    if say:
        print(f"fast path: {said}")
    return options, bf16 or args.bf16


def _evaluate_adm(args, system, path: Path, options: dict, info) -> int:
    """``evaluate --reference``: FID-50K in ADM's convention (eval.evaluate_adm)."""
    from difflineage.errors import CheckpointError, DataError
    from difflineage.eval import evaluate_adm

    if args.inception_weights is None:
        print("error: --reference needs --inception-weights FILE (pt_inception-2015-12-05-6726825d.pth, the FID "
              "graph's weights; nothing is downloaded)", file=sys.stderr)
        return 2
    if args.n == 0:
        print("error: --reference scores samples: give --num-samples (50000 for FID-50K)", file=sys.stderr)
        return 2
    out = args.out or path / f"metrics_adm_{args.n}.json"
    try:
        metrics = evaluate_adm(system, args.reference, args.inception_weights, n=args.n,
                               npz=args.npz or path / f"samples_{args.n}.npz", batch_size=args.batch_size,
                               seed=args.seed, sample_options=options, bf16=args.bf16, checkpoint=path,
                               inception_resize=args.inception_resize, out=out, keep_parts=args.keep_parts,
                               progress=not args.no_progress)
    except (FileNotFoundError, ValueError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.is_main:
        opts = ", ".join(f"{k} {v}" for k, v in metrics["sample_options"].items())
        print(f"{metrics['samples']} samples ({opts}; {metrics['processes']} processes) scored against "
              f"{metrics['reference']} with the ADM evaluator's conventions:")
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            print(f"  {key:<16}{metrics[key]:>10.4f}")
        print(f"wrote {metrics['npz']} and {out}")
    return 0


def cmd_score(args) -> int:
    from difflineage.eval import adm
    from difflineage.eval.inception import load_fid_inception

    try:
        net = load_fid_inception(args.inception_weights, resize=args.inception_resize).to(args.device)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = adm.score(args.samples, args.reference, net, device=args.device, progress=not args.no_progress,
                       batch=args.batch_size)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        print(f"{key:>16}: {result[key]:.4f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_reference(args) -> int:
    from difflineage.config import data_config
    from difflineage.data import load_dataset
    from difflineage.eval import write_reference_batch

    data = data_config({"source": args.data, "image_size": args.image_size, "channels": args.channels}, args.overrides)
    try:
        made = write_reference_batch(load_dataset(data, args.split), args.out, args.inception_weights, n=args.n,
                                     inception_resize=args.inception_resize, device=args.device,
                                     batch_size=args.batch_size, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {made['reference']}: {made['images']} of the {made['of']} {args.split} images, "
          f"{made['size'][0]}x{made['size'][1]}, statistics on {made['feature_network']}")
    return 0
