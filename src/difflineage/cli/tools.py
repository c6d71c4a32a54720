"""``difflineage extract`` (a latent store), ``convert`` (DiT layouts), ``info`` (a checkpoint's size, arithmetic
and config) and ``demo`` (the browser page)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from difflineage.cli.common import add_data_overrides, add_device_option


def add_parsers(sub) -> None:
    x = sub.add_parser("extract", help="encode a training set once with a frozen first stage into a latent store",
                       description="Encode every training image, and its mirror image, with a frozen first stage into "
                                   "a sharded latent store (posterior mean and std, or code maps) that two-stage "
                                   "systems train from with data.latents=STORE. Runs under torchrun (each process "
                                   "encodes its share of the shards); run again to finish an interrupted extraction.")
    x.add_argument("--first-stage", required=True, metavar="RUN_OR_FILE",
                   help="an autoencoder_kl run, a Stable Diffusion VAE file (sd-vae:PATH or the path), a VQ-VAE / "
                        "VQ-VAE-2 autoencoder run or a DALL-E dVAE run")
    x.add_argument("--data", required=True, metavar="SOURCE", help="the data source (imagenet:PATH, folder:PATH, mnist5k, ...)")
    x.add_argument("--out", required=True, type=Path, metavar="STORE", help="the store's folder")
    x.add_argument("--image-size", type=int, required=True, help="the side the images are cropped to (data.image_size)")
    x.add_argument("--channels", type=int, default=None, help="image channels (default: the first stage's)")
    add_data_overrides(x)
    x.add_argument("--shard-size", type=int, default=16384, help="images per shard (default 16384)")
    x.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    x.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage type of the moments")
    x.add_argument("--workers", type=int, default=None, help="decoding worker processes (streamed sources)")
    add_device_option(x, per_process=True)
    x.add_argument("--vae-norm-groups", type=int, default=32,
                   help="GroupNorm groups of a Stable Diffusion VAE file given as --first-stage (32 in Stable Diffusion)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_extract)

    c = sub.add_parser("convert", help="convert DiT, Stable Diffusion and DDPM weights between the official, diffusers "
                                       "and difflineage layouts",
                       description="Read a model and write it in another layout. DiT: an official checkpoint "
                                   "(DiT-XL-2-256x256.pt style), a diffusers DiTTransformer2DModel folder or file, or a "
                                   "difflineage checkpoint. Stable Diffusion 1.x/2.x: a diffusers folder <-> the "
                                   "original single file (--to official). DDPM: a diffusers UNet2DModel folder "
                                   "(google/ddpm-cifar10-32) <-> a runnable difflineage checkpoint. Keys are checked "
                                   "strictly; nothing is downloaded or unpickled.")
    c.add_argument("source", type=Path, help="official .pt/.safetensors/.ckpt file, diffusers folder/file, or "
                                             "difflineage checkpoint")
    c.add_argument("dest", type=Path, help="output: a file (official), a folder (diffusers) or a checkpoint directory")
    c.add_argument("--to", required=True, choices=["official", "diffusers", "difflineage"], help="layout to write")
    c.add_argument("--vae", type=Path, default=None, metavar="FILE",
                   help="--to difflineage: the Stable Diffusion VAE the DiT works over (latents scaled by 0.18215); "
                        "without it the checkpoint is a pixel-space DiT")
    c.add_argument("--vae-norm-groups", type=int, default=32, help="GroupNorm groups of the VAE (32 in Stable Diffusion)")
    c.add_argument("--data", default="folder:data", metavar="SOURCE",
                   help="--to difflineage: data.source to record (the dataset evaluate compares against)")
    c.add_argument("--heads", type=int, default=None, help="attention heads, when not the paper's for this width")
    c.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="Stable Diffusion single file -> diffusers: the tokenizer/ folder to put in the output")
    c.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="Stable Diffusion 2.x single file: what its UNet predicts (v: the 768-px models; eps: the 512-px "
                        "base)")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="show a checkpoint's config, parameter count and steps trained",
                       description="Show what a checkpoint holds: its system and config, the parameters, the steps "
                                   "trained, the arithmetic of each forward pass (MACs, the DiT paper's 'Gflops', and "
                                   "FLOPs) and, for a dynamic model, what sampling computes per step.")
    i.add_argument("checkpoint", type=Path, help="checkpoint directory or run directory")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    w = sub.add_parser("demo", help="serve a page on localhost that samples trained runs in the browser",
                       description="Start the browser demo (Gradio, an optional extra: pip install -e \".[demo]\") on "
                                   "http://HOST:PORT: a class or caption, the number of images, a seed and the options of "
                                   "the run's family; a gallery with the time and counted FLOPs per image; a DyDiT beside "
                                   "its base DiT, with its active heads, MLP groups and tokens per sample "
                                   "(docs/demo.md). Works offline.")
    w.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                   help="run (or checkpoint) directories to offer, the first shown first (default: every run under "
                        "--runs-dir)")
    w.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="where to look for runs when none is named (default runs/)")
    w.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_device_option(w)
    w.add_argument("--any-run", action="store_true",
                   help="let the page's run box load any path on this machine (default: only the runs given, or "
                        "found under --runs-dir, and what lies beneath them)")
    w.set_defaults(func=cmd_demo)


def cmd_extract(args) -> int:
    from difflineage.config import data_config
    from difflineage.extract import extract

    data = data_config({"source": args.data, "image_size": args.image_size, "channels": args.channels}, args.overrides)
    extract(args.first_stage, data, args.out, shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
            device=args.device, workers=args.workers, progress=not args.no_progress, vae_norm_groups=args.vae_norm_groups)
    return 0

def cmd_convert(args) -> int:
    from difflineage.convert import model_kind

    kind = model_kind(args.source)
    if kind in ("stable-diffusion", "stable-diffusion-run"):
        return _convert_sd(args, fine_tune=kind == "stable-diffusion-run")
    if kind in ("ddpm-diffusers", "ddpm-difflineage"):
        return _convert_ddpm(args, kind)
    return _convert_dit(args)


def _convert_sd(args, fine_tune: bool = False) -> int:
    from difflineage.convert import fine_tuned_weights
    from difflineage.interop.stable_diffusion import read_stable_diffusion, write_diffusers_folder, write_single_file

    if args.to == "difflineage":
        print("error: Stable Diffusion runs from its own files (difflineage sample sd:PATH); convert it --to diffusers "
              "or --to official (the single file)", file=sys.stderr)
        return 2
    weights = fine_tuned_weights(args.source) if fine_tune else \
        read_stable_diffusion(args.source, prediction=args.prediction, tokenizer=args.tokenizer)
    out = write_diffusers_folder(weights, args.dest) if args.to == "diffusers" else write_single_file(weights, args.dest)
    print(f"read Stable Diffusion {weights.version} ({weights.prediction} prediction) from {args.source}")
    print(f"wrote the {'diffusers folder' if args.to == 'diffusers' else 'original single file'} to {out}"
          + ("" if args.to != "diffusers" or weights.tokenizer else "; it has no tokenizer/: give --tokenizer DIR"))
    return 0


def _convert_ddpm(args, kind: str) -> int:
    from difflineage.convert import checkpoint_as_ddpm_folder, ddpm_as_checkpoint

    if kind == "ddpm-diffusers" and args.to == "difflineage":
        out = ddpm_as_checkpoint(args.source, args.dest, data_source=args.data)
    elif kind == "ddpm-difflineage" and args.to == "diffusers":
        out = checkpoint_as_ddpm_folder(args.source, args.dest)
    else:
        have = "a diffusers DDPM folder" if kind == "ddpm-diffusers" else "a difflineage DDPM checkpoint"
        print(f"error: {args.source} is {have}; convert it --to "
              f"{'difflineage' if kind == 'ddpm-diffusers' else 'diffusers'}", file=sys.stderr)
        return 2
    print(f"wrote the {args.to} DDPM to {out}")
    return 0


def _convert_dit(args) -> int:
    from difflineage.convert import read_any_dit, save_as_checkpoint
    from difflineage.errors import CheckpointError
    from difflineage.interop.dit import save_diffusers_dit, save_official_dit

    model, layout = read_any_dit(args.source, heads=args.heads)
    try:
        if args.to == "official":
            out = save_official_dit(model, args.dest)
        elif args.to == "diffusers":
            out = save_diffusers_dit(model, args.dest)
        else:
            out = save_as_checkpoint(model, args.dest, vae=args.vae, data_source=args.data,
                                     vae_norm_groups=args.vae_norm_groups)
    except CheckpointError:  # names its own file (the VAE's, say): reported as it is
        raise
    except ValueError as exc:  # a DiT that has no such layout (other blocks, captions)
        print(f"error: {args.source}: {exc}", file=sys.stderr)
        return 2
    depth, hidden, heads, patch = model.cfg.resolved()
    print(f"read a {layout} DiT ({model.cfg.name if model.cfg.name != 'custom' else f'depth {depth}, hidden {hidden}'}, "
          f"patch {patch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) from {args.source}")
    print(f"wrote the {args.to} layout to {out}")
    return 0


def cmd_info(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.eval.flops import count_flops
    from difflineage.systems import load
    from difflineage.systems.base import DynamicCompute

    path = resolve_checkpoint(args.checkpoint)
    system = load(path)
    step = _checkpoint_step(path)

    n_params = sum(p.numel() for p in system.parameters())
    flops = {name: count_flops(fn).as_dict() for name, fn in system.forward_passes().items()}
    info = {"checkpoint": str(path), "system": system.config.system, "steps_trained": step,
            "parameters": n_params, "forward_passes": flops, "config": system.config.to_dict()}
    if isinstance(system, DynamicCompute):  # arithmetic that changes with the timestep (DyDiT): per step
        info["sampling_flops"] = _dynamic_flops(system)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint:    {path}\nsystem:        {info['system']}\nsteps trained: {step}\n"
          f"parameters:    {n_params:,} ({n_params / 1e6:.2f}M)")
    print("arithmetic per forward (MACs = multiply-accumulates, the DiT paper's 'Gflops'; FLOPs = 2 x MACs):")
    for name, f in flops.items():
        print(f"  {name:<42} {f['macs'] / 1e6:>10.3f} M MACs  {f['flops'] / 1e6:>10.3f} M FLOPs")
    if "sampling_flops" in info:
        sf = info["sampling_flops"]
        print(f"network arithmetic per image on the sampling path ({sf['images']} images, {sf['sampler']}, "
              f"guidance {sf['guidance']}), counted:")
        for row in sf["per_step"]:
            print(f"  t={row['t']:>4}  {row['macs'] / 1e6:>10.3f} M MACs  {row['ratio']:.3f} of the full network")
        print(f"  average {sf['mean_macs'] / 1e6:.3f} M MACs per step: {sf['ratio']:.3f} of the full network's "
              f"{sf['full_macs'] / 1e6:.3f} M")
    print("config:")
    print("  " + system.config.to_yaml().replace("\n", "\n  ").rstrip())
    return 0


def cmd_demo(args) -> int:
    from difflineage.demo import DemoError, check_run, find_runs, serve

    runs = list(args.runs) or find_runs(args.runs_dir)
    if not runs:
        print(f"error: no runs under {args.runs_dir}/ (a run directory holds checkpoints/step_*): train one, e.g. "
              "`make quickstart`, or name a run directory: difflineage demo RUN", file=sys.stderr)
        return 2
    try:
        for run in args.runs:
            check_run(run)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.runs:
        print(f"runs found under {args.runs_dir}/: " + ", ".join(r.name for r in runs))
    print(f"serving the demo of {len(runs)} run{'s' if len(runs) > 1 else ''} on http://{args.host}:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    try:
        serve(runs, host=args.host, port=args.port, device=args.device,
              roots=list(args.runs) or [args.runs_dir], any_run=args.any_run)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port} ({exc}); give another --port or --host", file=sys.stderr)
        return 2
    return 0


def _dynamic_flops(system, images: int = 4) -> dict:
    """Counted network MACs per image at each step of a real sampling run, against the full network's."""
    from difflineage.eval.flops import sampling_macs

    dc = system.config.model.diffusion
    dynamic, complete = system.compute_modes
    counts = {mode: sampling_macs(system, images, mode=mode) for mode in system.compute_modes}
    full = sum(m for _, m in counts[complete]) / len(counts[complete])
    per_step = [{"t": t, "macs": int(m), "ratio": round(m / full, 4)} for t, m in counts[dynamic]]
    mean = sum(r["macs"] for r in per_step) / len(per_step)
    return {"images": images, "sampler": f"{dc.sampler} {dc.sample_steps} steps", "guidance": dc.guidance,
            "per_step": per_step, "mean_macs": int(mean), "full_macs": int(full), "ratio": round(mean / full, 4)}


def _checkpoint_step(path: Path) -> Optional[int]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        step = (fh.metadata() or {}).get("step")
    return int(step) if step and step.isdigit() else None
