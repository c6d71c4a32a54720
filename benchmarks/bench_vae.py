"""VAE speed: a training step and sampling, fp32 against bf16 autocast, side by side in one run.

    python benchmarks/bench_vae.py [--batch 128] [--repeats 20]

Also checks that bf16 keeps the numbers right: the -ELBO of one fixed batch under both precisions.
"""

import argparse

import torch

from harness import record, side_by_side

from difflineage.data import load_dataset
from difflineage.systems import load_config
from difflineage.train import build_system, resolve_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    cfg = load_config("vae-mnist")
    data = load_dataset(cfg.data, "train")
    cfg = resolve_data(cfg, data)
    torch.manual_seed(0)
    system = build_system(cfg)
    opt = torch.optim.AdamW(system.parameters(), lr=1e-4)
    batch = data.batch(range(args.batch))

    def train_step(bf16: bool):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = system.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def sample(bf16: bool):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                system.sample(1000, generator=torch.Generator().manual_seed(0))
        return run

    t = side_by_side({"train fp32": train_step(False), "train bf16": train_step(True),
                      "sample fp32": sample(False), "sample bf16": sample(True)}, repeats=args.repeats)

    # Same weights, same noise: how far does bf16 move the loss?
    x = system.observe(batch["image"], torch.Generator().manual_seed(1))
    eps = torch.randn(args.batch, cfg.model.latent_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rec32, kl32 = system.elbo_terms(x, None, eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec16, kl16 = system.elbo_terms(x, None, eps)
    l32, l16 = -(rec32 - kl32).mean().item(), -(rec16 - kl16).mean().item()

    rows = []
    for what, unit, n in (("training step", f"batch {args.batch}", args.batch), ("sampling", "1000 images", 1000)):
        key = "train" if what.startswith("training") else "sample"
        a, b = t[f"{key} fp32"], t[f"{key} bf16"]
        rows.append({"what": f"{what} ({unit})", "fp32 ms": a.median_s * 1e3, "bf16 ms": b.median_s * 1e3,
                     "bf16 speed-up": a.median_s / b.median_s, "fp32 images/s": n / a.median_s,
                     "bf16 images/s": n / b.median_s})
    notes = (f"Median of {args.repeats} interleaved repeats after warm-up. bf16 check on one fixed batch and noise: "
             f"-ELBO {l32:.3f} nats (fp32) vs {l16:.3f} (bf16 autocast), relative difference {abs(l16 - l32) / l32:.2e}.")
    path = record("vae", "VAE: training step and sampling, fp32 vs bf16 autocast", rows, notes,
                  command="python benchmarks/bench_vae.py")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
