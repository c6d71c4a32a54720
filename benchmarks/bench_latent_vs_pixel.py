"""Latent diffusion against pixel-space diffusion: a training step and sampling, side by side in one run.

    python benchmarks/bench_latent_vs_pixel.py [--batch 32] [--samples 16] [--steps 50] [--repeats 5]

Both systems are built from their quickstart recipes (configs/ddpm-mnist.yaml: UNet on 28x28x1 pixels;
configs/ldm-mnist.yaml: UNet on the 8x8x4 latents of configs/autoencoder-mnist.yaml) with random weights
(speed does not depend on the weights). The latent training step draws z from cached posterior moments, as
LDM training does here; latent sampling includes decoding the latents to images. Each system runs in the
precision its recipe trains in (train.bf16), and the pixel model is also timed in the other precision.
"""

import argparse
from dataclasses import replace

import torch

from harness import record, side_by_side

from difflineage.data import load_dataset
from difflineage.eval.flops import count_flops
from difflineage.nn.precision import resolve_bf16
from difflineage.systems import load_config
from difflineage.train import build_system, resolve_data


def build(recipe: str, overrides=()):
    cfg = load_config(recipe, list(overrides))
    data = load_dataset(cfg.data, "train")
    cfg = resolve_data(cfg, data)
    if cfg.system == "ldm":
        ae = load_config("autoencoder-mnist").model
        cfg = replace(cfg, model=replace(cfg.model, autoencoder=ae))
    torch.manual_seed(0)
    system = build_system(cfg)
    if cfg.system == "ldm":  # cache the posterior moments as prepare() does, without a trained first stage
        system.space.cache(data, measure_scale=False)
    return cfg, system, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    systems = {"pixel (DDPM)": build("ddpm-mnist"), "latent (LDM)": build("ldm-mnist")}
    precisions = {"as trained": None, "fp32": False, "bf16": True}
    cases, macs = {}, {}
    for name, (cfg, system, data) in systems.items():
        batch = data.batch(range(args.batch))
        opt = torch.optim.AdamW([q for q in system.parameters() if q.requires_grad], lr=1e-4)
        for label, forced in precisions.items():
            bf16 = resolve_bf16(cfg.train.bf16, "cpu") if forced is None else forced

            def step(system=system, batch=batch, opt=opt, bf16=bf16):
                system.train()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, _ = system.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def sample(system=system, bf16=bf16):
                system.eval()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    system.sample(args.samples, generator=torch.Generator().manual_seed(0), steps=args.steps)

            cases[f"{name} train {label}"], cases[f"{name} sample {label}"] = step, sample
        passes = system.forward_passes()
        macs[name] = sum(count_flops(fn).macs for key, fn in passes.items() if "unet" in key)
    t = side_by_side(cases, warmup=1, repeats=args.repeats)
    rows = []
    for label in precisions:
        for what in ("train", "sample"):
            px, lt = t[f"pixel (DDPM) {what} {label}"], t[f"latent (LDM) {what} {label}"]
            unit = f"batch {args.batch}" if what == "train" else f"{args.samples} images, {args.steps} DDIM steps, guided"
            rows.append({"what": f"{'training step' if what == 'train' else 'sampling'} ({unit})", "precision": label,
                         "pixel ms": px.median_s * 1e3, "latent ms": lt.median_s * 1e3,
                         "latent speed-up": px.median_s / lt.median_s})
    notes = (f"Median of {args.repeats} interleaved repeats after warm-up. UNet MACs per image and step: pixel "
             f"{macs['pixel (DDPM)'] / 1e6:.1f} M on 28x28x1, latent {macs['latent (LDM)'] / 1e6:.1f} M on 8x8x4 "
             f"(ratio {macs['pixel (DDPM)'] / macs['latent (LDM)']:.2f}; the latent recipe is wider and has text "
             "cross-attention). 'as trained': each recipe's own train.bf16 (pixel bf16 autocast, latent fp32).")
    path = record("latent_vs_pixel", "Latent vs pixel-space diffusion on mnist5k (quickstart recipes)", rows, notes,
                  command="python benchmarks/bench_latent_vs_pixel.py")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
