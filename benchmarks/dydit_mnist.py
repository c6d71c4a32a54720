"""DyDiT fine-tuned from the flagship mnist5k DiT at several FLOPs targets: the FLOPs ratio reached, sampling
time against the DiT it came from (side by side in one run), FID (MNIST features) and class accuracy; plus the
pictures of docs/dydit.md (active heads and MLP groups per layer against the timestep; token masks).

    make quickstart                                   # the flagship DiT, in runs/quickstart-dit
    python benchmarks/dydit_mnist.py --base runs/quickstart-dit

Each target's fine-tuning run goes to ``--out``/lambda-X (reused when complete; ``--retrain`` redoes it).
Every model samples with its recipe's sampler (DDIM 50 steps, guidance 3): the same for all. The FLOPs ratio
is counted (torch's FlopCounterMode, whole network) on the sampling path itself, per image and step, against the
DiT's; the speed-up is the DiT's sampling time over the DyDiT's, repeats interleaved, in fp32 and under bf16
autocast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import difflineage
from harness import record, side_by_side, trained_run

from difflineage.eval import bf16_autocast, evaluate_system
from difflineage.eval.dydit_pictures import token_picture, width_picture
from difflineage.eval.flops import sampling_macs
from difflineage.eval.sampling import native_bf16

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
PAPER = {0.7: "DiT-XL: 71% of DiT's FLOPs, FID 2.12 vs 2.27", 0.5: "DiT-S: 52% FLOPs, 1.54x; DiT-XL: 49%, FID 2.07, 1.73x",
         0.3: "-"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="runs/quickstart-dit", help="the flagship DiT run (difflineage quickstart)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps per target")
    ap.add_argument("--out", default="runs/dydit-mnist")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--n", type=int, default=1000, help="samples for FID and class accuracy")
    ap.add_argument("--batch", type=int, default=100, help="images per sampling call in the timing")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs = {t: trained_run("dydit-mnist", [f"model.base={args.base}", f"model.target={t}"], out / f"lambda-{t}",
                           args.steps, retrain=args.retrain, same=("model.base", "model.target")) for t in args.targets}
    dit = difflineage.load(args.base)
    models = {"DiT": dit, **{f"DyDiT lambda={t}": difflineage.load(d) for t, d in runs.items()}}

    print("counting FLOPs on the sampling path", file=sys.stderr)
    macs = {}
    for k, m in models.items():
        per_step = sampling_macs(m, 20)  # (t, MACs per image) per sampler step
        macs[k] = sum(x for _, x in per_step) / len(per_step)
    print("timing sampling side by side", file=sys.stderr)
    labels = torch.arange(args.batch) % 10
    timings = {}
    # bf16 autocast is timed only where the CPU (or GPU) has it natively: emulated, it is about 11x slower than fp32
    # and says nothing about the models
    precisions = ("fp32", "bf16") if native_bf16(dit.device) else ("fp32",)
    if len(precisions) == 1:
        print(f"no native bf16 on {dit.device} here: fp32 only", file=sys.stderr)
    for precision in precisions:
        def job(m, bf16=precision == "bf16"):
            def run():
                with bf16_autocast(m.device, bf16):
                    m.sample(args.batch, condition=labels, generator=torch.Generator().manual_seed(0))
            return run
        timings[precision] = side_by_side({k: job(m) for k, m in models.items()}, warmup=1, repeats=args.repeats)
    scores = {}
    for k, m in models.items():
        print(f"scoring {k}", file=sys.stderr)
        scores[k] = evaluate_system(m, n=args.n, features="mnist", progress=False, bpd_images=0)

    rows = []
    for k in models:
        t = models[k].config.model.target if k != "DiT" else None
        rows.append({"model": k, "FLOPs ratio (counted)": f"{macs[k] / macs['DiT']:.3f}",
                     "MMACs per image-step": round(macs[k] / 1e6, 2),
                     "sampling fp32 (s)": round(timings["fp32"][k].median_s, 2),
                     "speed-up fp32": f"{timings['fp32']['DiT'].median_s / timings['fp32'][k].median_s:.2f}x",
                     "sampling bf16 (s)": round(timings["bf16"][k].median_s, 2) if "bf16" in timings else "no native bf16",
                     "speed-up bf16": f"{timings['bf16']['DiT'].median_s / timings['bf16'][k].median_s:.2f}x"
                     if "bf16" in timings else "-",
                     "FID": round(scores[k]["fid"], 1), "FID / DiT's": f"{scores[k]['fid'] / scores['DiT']['fid']:.2f}",
                     "class accuracy": f"{100 * scores[k]['class_accuracy']:.1f}%",
                     "paper (ImageNet 256)": PAPER.get(t, "") if t is not None else "DiT-XL/2: 118.7 GFLOPs, FID 2.27"})
    real = scores["DiT"]["fid_real"]
    notes = (f"mnist5k, fine-tuned {args.steps} steps from `{args.base}` (configs/dydit-mnist.yaml). Sampling: DDIM 50 "
             f"steps, guidance 3 (both halves in one batch), {args.batch} images per call, median of {args.repeats} "
             f"interleaved repeats. FID and accuracy on {args.n} samples (MNIST-classifier features; real-vs-real FID "
             f"at this count: {real:.1f}).")
    cmd = "python benchmarks/dydit_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record("dydit_mnist", "DyDiT fine-tuned from the mnist5k DiT: FLOPs, sampling speed, FID", rows, notes, command=cmd.strip())
    IMAGES.mkdir(parents=True, exist_ok=True)
    middle = min(runs, key=lambda t: abs(t - 0.5))
    width_picture(models[f"DyDiT lambda={middle}"], IMAGES / "dydit_width.png")
    token_picture(models[f"DyDiT lambda={middle}"], IMAGES / "dydit_tokens.png")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
