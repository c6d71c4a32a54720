"""DiT speed against diffusers' DiTTransformer2DModel with the same weights, side by side in one run.

    python benchmarks/bench_dit_speed.py                      # DiT-S/2 and DiT-B/2, 32x32x4 latents, batch 8
    python benchmarks/bench_dit_speed.py --configs DiT-XL/2 --batch 32 --device cuda --name dit_speed_gpu

For each config: forward passes and training steps (forward, backward, AdamW) of diffusers in fp32 and under
bf16 autocast, ours in fp32 and bf16, and our fast path: bf16 autocast with the network compiled by
torch.compile; for inference with inductor's freezing (the weights become constants of the compiled graph, cast
to bf16 and packed once), for training as ``train.compile=true`` does. The candidates' repeats are interleaved, so the ratios
hold on a noisy machine. The max difference of each candidate's output from diffusers' fp32 output is reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys

import torch

from harness import one_at_a_time, record, side_by_side

from difflineage.interop.dit import diffusers_dit_config, diffusers_to_dit, dit_to_diffusers, match_paper_numerics
from difflineage.models.dit import DiT, DiTConfig
from difflineage.train.trainer import adamw, compile_for_training

FUSED_DIFFUSERS = "diffusers bf16, fused AdamW"  # a training-only row


def build_pair(name: str | DiTConfig, side: int, device: torch.device):
    """Our DiT with random (non-zero) weights and diffusers' model holding the same weights (``name``: a named
    configuration such as DiT-B/2, or a DiTConfig)."""
    import diffusers

    torch.manual_seed(0)
    cfg = name if isinstance(name, DiTConfig) else DiTConfig(name=name)
    ours = DiT(cfg, in_channels=4, input_size=side, num_classes=1000)
    with torch.no_grad():  # the official init zeroes the adaLN and final layers; give every weight a value
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    theirs = match_paper_numerics(diffusers.DiTTransformer2DModel(**diffusers_dit_config(ours)))
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    back = diffusers_to_dit(theirs.state_dict(), sample_size=side)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    return ours.to(device).eval(), theirs.to(device).eval()  # eval: diffusers drops labels in train mode


def forward_fn(model, diffusers_model: bool, x, t, y, bf16: bool, freeze: bool = False):
    def run():
        # freeze: inductor folds the (no-grad) weights into the compiled graph as constants, so their bf16
        # copies are made and packed once instead of cast on every call under autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16), \
                torch._inductor.config.patch(freezing=freeze):
            if diffusers_model:
                return model(hidden_states=x, timestep=t, class_labels=y).sample
            return model(x, t, y)
    return run


def train_fn(model, diffusers_model: bool, x, t, y, bf16: bool, fused_adamw: bool):
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # ours: the trainer's optimizer (fused AdamW); diffusers: torch's default AdamW, as its training examples use,
    # and in one extra row the fused one too, so the optimizer's share of the difference shows
    opt = adamw(params, lr=1e-4) if fused_adamw else torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn(x.shape[0], 8, *x.shape[2:], device=x.device)

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(hidden_states=x, timestep=t, class_labels=y).sample if diffusers_model else model(x, t, y)
        loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run, model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    ap.add_argument("--side", type=int, default=32, help="latent side (32: 256x256 images)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2,
                    help="training steps are timed in this many rounds, each candidate's copy built anew in each (one "
                         "training copy alive at a time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled fast path")
    ap.add_argument("--name", default="dit_speed", help="results name (benchmarks/results/NAME.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.configs:
        ours, theirs = build_pair(name, args.side, device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 4, args.side, args.side, generator=g).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        fast = copy.deepcopy(ours)
        if not args.no_compile:
            # static shapes, and a fresh compiler cache per config: a recompilation for the second config's
            # sizes would otherwise turn them into symbolic (dynamic-shape) kernels, which run slower
            torch._dynamo.reset()
            fast.compile(dynamic=False)
        candidates = {"diffusers fp32": (theirs, True, False), "diffusers bf16": (theirs, True, True),
                      "ours fp32": (ours, False, False), "ours bf16": (ours, False, True)}
        fast_name = "ours fast (bf16 + compile)"
        if not args.no_compile:
            candidates[fast_name] = (fast, False, True)
        forwards = {k: forward_fn(m, d, x, t, y, b, freeze=k == fast_name) for k, (m, d, b) in candidates.items()}
        reference = forward_fn(theirs, True, x, t, y, False)().float()
        diffs = {k: (run().float() - reference).abs().max().item() for k, run in forwards.items()}
        print(f"{name}: timing forward passes", file=sys.stderr)
        fwd = side_by_side(forwards, warmup=2, repeats=args.repeats)
        print(f"{name}: timing training steps, one training copy alive at a time", file=sys.stderr)
        candidates.pop(fast_name, None)
        del forwards, fast  # the compiled inference copy is not needed any more ...
        torch._dynamo.reset()  # ... and the compiler's caches hold it (and its frozen bf16 weights) until dropped
        gc.collect()
        train_candidates = dict(candidates)
        if not args.no_compile:
            train_candidates[fast_name] = (ours, False, True)  # compiled for training when its copy is made
        train_candidates[FUSED_DIFFUSERS] = (theirs, True, True)

        def build(m, d: bool, b: bool, k: str):
            run, copy_ = train_fn(m, d, x, t, y, b, fused_adamw=k.startswith("ours") or k == FUSED_DIFFUSERS)
            if k == fast_name:
                compile_for_training(copy_, device)
            return run

        step, peaks = one_at_a_time({k: (lambda c=c, k=k: build(*c, k)) for k, c in train_candidates.items()}, device,
                                    warmup=2, repeats=args.repeats, rounds=args.rounds)
        base_f, base_s = fwd["diffusers bf16"].median_s, step["diffusers bf16"].median_s
        for k in train_candidates:
            rows.append({"config": name, "batch": args.batch, "candidate": k,
                         "forward (ms)": round(fwd[k].median_s * 1e3, 1) if k in fwd else "",
                         "train step (ms)": round(step[k].median_s * 1e3, 1),
                         "forward speed vs diffusers bf16": f"{base_f / fwd[k].median_s:.2f}x" if k in fwd else "",
                         "train speed vs diffusers bf16": f"{base_s / step[k].median_s:.2f}x",
                         "max |out - diffusers fp32|": f"{diffs[k]:.1e}" if k in diffs else "",
                         "train peak memory (MiB)": round(peaks[k].mib)})
    notes = (f"{args.side}x{args.side}x4 latents (256x256 images), 1000 classes, random weights shared by both "
             "implementations (converted with difflineage.interop.dit, diffusers patched to the paper's timestep "
             "frequencies). Median of interleaved repeats (training steps: in rounds, one training copy alive at a "
             "time; its peak memory is the process's, with the shared models and the copy's construction); a train "
             "step is forward, backward and AdamW: ours "
             "with the trainer's fused AdamW, diffusers with torch's default AdamW and, in the row so named, the fused one. "
             "'ours fast' is bf16 autocast with the network compiled by torch.compile: for the forward pass (inference) "
             "with inductor's freezing (torch._inductor.config.freezing, weights folded in as constants), for the "
             "training step as train.compile=true does.")
    cmd = "python benchmarks/bench_dit_speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    record(args.name, f"DiT speed against diffusers ({', '.join(args.configs)}, {args.device})", rows, notes,
           command=cmd.strip())


if __name__ == "__main__":
    main()
