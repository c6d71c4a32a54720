"""``difflineage sample``: samples of a checkpoint into a grid PNG (and ADM's npz), plain or on the fast path
beside the plain samples."""

from __future__ import annotations

import sys
from pathlib import Path

from difflineage.cli.common import add_device_option, add_sampling_options, heldout, sampling_options

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype: torch's names


def add_parsers(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a checkpoint into a grid PNG",
                       description="Draw samples from a checkpoint (or a run directory's latest one), or from Stable "
                                   "Diffusion's released weights: sd:PATH, a diffusers folder or an original single "
                                   "file (docs/stable-diffusion.md).")
    s.add_argument("checkpoint", type=Path,
                   help="checkpoint directory, run directory, or sd:PATH (a Stable Diffusion 1.x/2.x diffusers folder or "
                        ".safetensors/.ckpt file)")
    s.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="number of samples (default 64, Stable Diffusion 1; without --label, a whole number per "
                        "class, one row each)")
    s.add_argument("--label", "--class", dest="label", default=None, metavar="CLASS",
                   help="class to draw, by name (seven) or number (class-conditional systems); default: all classes "
                        "in turn")
    s.add_argument("--out", type=Path, default=Path("samples.png"), help="grid PNG to write (default samples.png)")
    s.add_argument("--npz", type=Path, default=None,
                   help="also write the samples in ADM's layout (arr_0: uint8 N x H x W x 3; arr_1: the labels)")
    s.add_argument("--nrow", type=int, default=None, help="images per grid row (default: one row per class, or square)")
    s.add_argument("--scale", type=int, default=None,
                   help="enlarge the grid this many times, pixel by pixel (default 2; Stable Diffusion 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_sampling_options(s)
    s.add_argument("--caption", default=None, help="caption to draw (caption-conditioned systems)")
    s.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    s.add_argument("--pictures", type=Path, default=None, metavar="DIR",
                   help="also write the system's own pictures into DIR (VAE: reconstructions of held-out images, "
                        "interpolations, and the latent manifold when the latent is 2-D)")
    s.add_argument("--bf16", action="store_true", help="sample under bfloat16 autocast (faster on AVX-512 bf16 CPUs and GPUs)")
    s.add_argument("--fast", action="store_true",
                   help="the fastest sampling here: DPM-Solver++ (20 steps unless --steps), a step cache for DiT and "
                        "DyDiT calibrated on the model, bf16 autocast where native; also draws the plain samples and "
                        "prints the difference")
    sd = s.add_argument_group("Stable Diffusion (sd:PATH)")
    sd.add_argument("--negative", default=None, help="negative caption (default: the empty one, SD's unconditional)")
    sd.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                    help="image side, or height and width, divisible by 8 (default: the model's, 512 or 768)")
    sd.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                    help="the model's tokenizer/ folder (vocab.json, merges.txt): needed with a single file")
    sd.add_argument("--prediction", choices=["eps", "v"], default=None,
                    help="what the UNet predicts, where the files do not say (a 2.x single file: v for the 768-px "
                         "models, eps for the 512-px base)")
    sd.add_argument("--sd-version", choices=["1.x", "2.x"], default=None,
                    help="refuse the files unless they are this version")
    sd.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="the networks' weight type (diffusers' torch_dtype): fp16 on a GPU, bf16 on a CPU or GPU "
                         "with native bf16 (default fp32; the sampler's arithmetic stays fp32)")
    sd.add_argument("--compile", action="store_true",
                    help="compile the UNet with torch.compile first (minutes; then faster per step; not with --fast)")
    add_device_option(s)
    s.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from difflineage.eval import bf16_autocast
    from difflineage.eval.adm import as_rgb
    from difflineage.eval.sampling import fast_sampling
    from difflineage.images import save_grid, to_uint8
    from difflineage.systems import load

    if str(args.checkpoint).startswith("sd:"):
        return cmd_sample_sd(args)
    if args.dtype is not None:
        print("error: --dtype applies to Stable Diffusion (sd:PATH); for a difflineage run, --bf16 samples under "
              "bf16 autocast", file=sys.stderr)
        return 2
    args.n = 64 if args.n is None else args.n
    args.scale = 2 if args.scale is None else args.scale
    system = load(args.checkpoint, use_ema=not args.no_ema, device=args.device)
    options = sampling_options(args)
    if args.label is not None and not system.num_classes:
        print(f"error: --label needs a class-conditional checkpoint; {args.checkpoint} is unconditional "
              "(train with model.conditional=true)", file=sys.stderr)
        return 2
    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    if args.label is not None:
        try:
            args.label = system.class_index(args.label)
        except ValueError as exc:
            print(f"error: --label: {exc}", file=sys.stderr)
            return 2
    condition = [args.caption] * args.n if args.caption is not None else args.label
    per_class = None
    if condition is None and system.num_classes and args.n >= system.num_classes:
        condition, per_class = system.grid_labels(args.n)  # one row per class
        args.n = len(condition)
    bf16 = args.bf16

    def draw(options: dict, bf16: bool):
        with bf16_autocast(system.device, bf16):
            return system.sample(args.n, condition=condition, generator=torch.Generator().manual_seed(args.seed),
                                 **options).float()

    try:
        if args.fast:  # the plain samples first (before the fast path compiles anything), then the fast ones
            plain = draw(options, args.bf16)
            told = ", ".join(f"{k} {v}" for k, v in options.items()) or "the recipe's settings"
            options, bf16, said = fast_sampling(system, options, seed=args.seed)
            print(f"fast path: {said}")
        images = draw(options, bf16)
        if args.fast:  # the error of the fast path against the same samples drawn the plain way
            diff = (images - plain).abs()
            print(f"fast path against the plain path ({told}): mean |difference| {diff.mean():.4f}, max "
                  f"{diff.max():.4f} (pixels in [-1, 1])")
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nrow = args.nrow or per_class
    if args.scale < 1:
        print("error: --scale must be 1 or more", file=sys.stderr)
        return 2
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {args.n} samples to {path}")
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        labels = condition if isinstance(condition, torch.Tensor) else \
            torch.full((args.n,), condition) if isinstance(condition, int) else None
        extra = {} if labels is None else {"arr_1": labels.cpu().numpy().astype(np.int64)}
        np.savez(args.npz, arr_0=as_rgb(to_uint8(images)), **extra)  # ADM's layout: what `score` reads
        print(f"wrote {args.npz} (arr_0: uint8 {args.n} x H x W x 3{'; arr_1: the labels' if extra else ''})")
    if args.pictures:
        for name, p in system.pictures(heldout(system), args.pictures, torch.Generator().manual_seed(args.seed)).items():
            print(f"wrote {name}: {p}")
    return 0


def cmd_sample_sd(args) -> int:
    """``difflineage sample sd:PATH --caption ...``: Stable Diffusion from its released files."""
    import torch

    from difflineage.images import save_grid
    from difflineage.systems.stable_diffusion import StableDiffusion

    path = Path(str(args.checkpoint)[3:])
    if args.caption is None:
        print("error: Stable Diffusion draws from a caption: give --caption \"...\"", file=sys.stderr)
        return 2
    n = 1 if args.n is None else args.n
    if n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    unused = [f"--{k}" for k in ("label", "npz", "pictures") if getattr(args, k) is not None] + \
        (["--no-ema"] if args.no_ema else [])
    if unused:
        print(f"error: {', '.join(unused)} do not apply to Stable Diffusion", file=sys.stderr)
        return 2
    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size[:2]))
    model = StableDiffusion.from_pretrained(path, args.sd_version, args.prediction, args.tokenizer,
                                            dtype=getattr(torch, DTYPES[args.dtype or "fp32"])).to(args.device)
    options = sampling_options(args)
    try:
        images = model.sample([args.caption] * n, args.negative, steps=options.get("steps"),
                              guidance=options.get("guidance", 7.5), sampler=options.get("sampler"), seed=args.seed,
                              size=size, fast=args.fast, bf16=True if args.bf16 else None, progress=True,
                              compile=args.compile)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Stable Diffusion {model.version} from {path}" + (" on the fast path (DPM-Solver++ 20 steps unless --steps, "
                                                              "the UNet's feature cache, bf16 where native)"
                                                              if args.fast else ""))
    out = save_grid(images.float(), args.out, nrow=args.nrow, scale=1 if args.scale is None else args.scale)
    print(f"wrote {n} image{'s' if n > 1 else ''} to {out}")
    return 0
