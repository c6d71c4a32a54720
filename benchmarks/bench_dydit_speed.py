"""DyDiT's fast path against DiT at 256x256 images (32x32x4 latents), with router masks of set densities: the
speed depends on which heads, MLP groups and tokens are on, not on trained weights.

    python benchmarks/bench_dydit_speed.py                         # DiT-S/2 batch 8 and DiT-XL/2 batch 2, CPU
    python benchmarks/bench_dydit_speed.py --configs DiT-XL/2 --batch 32 --device cuda --name dydit_speed_gpu

A density "w,k" turns on a share w of the heads and of the MLP groups (width routers set to constant decisions)
and a share k of the tokens (each block's token router calibrated on these inputs so that a share k of its
logits is positive). Candidates, repeats interleaved: DiT; DyDiT's fast path (sliced weights, MLP on the
gathered active tokens); DyDiT masked, as the released code computes (every unit, multiplied by its mask).
The FLOPs ratio is counted (FlopCounterMode) on the fast path against DiT; the max difference between the fast
and the masked outputs is reported.
"""

from __future__ import annotations

import argparse
import sys

import torch

from harness import record, side_by_side

from difflineage.eval.flops import count_flops
from difflineage.models.dit import DiT, DiTConfig
from difflineage.models.dydit import DyDiT


def build(name: str | DiTConfig, side: int, device: torch.device) -> tuple[DiT, DyDiT]:
    """A DiT with random non-zero weights, and a DyDiT holding the same weights (``name``: a named configuration,
    or a DiTConfig)."""
    cfg = name if isinstance(name, DiTConfig) else DiTConfig(name=name)
    torch.manual_seed(0)
    dit = DiT(cfg, in_channels=4, input_size=side, num_classes=1000)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    dy = DyDiT(cfg, in_channels=4, input_size=side, num_classes=1000)
    dy.load_dit_weights(dit.state_dict(), "the benchmark's DiT")
    return dit.to(device).eval(), dy.to(device).eval()


@torch.no_grad()
def set_density(dy: DyDiT, width: float, tokens: float, x, t, y) -> None:
    """Width routers: constant decisions keeping round(width * H) units (at least unit 0). Token routers:
    bias shifted, block by block, so that a share ``tokens`` of each block's logits on these inputs is positive."""
    h = dy.blocks[0].heads
    on = max(1, round(width * h))
    for blk in dy.blocks:
        for router in (blk.attn_rate.router, blk.mlp_rate.router):
            router.weight.zero_()
            router.bias.copy_(torch.where(torch.arange(h - 1, device=router.bias.device) < on - 1, 10.0, -10.0))
        blk.token_selection.mlp_head[2].bias.fill_(1e4)  # every token on while the earlier blocks are calibrated
    e = dy.embed(x, t, y)
    tokens_now, c = e["tokens"], e["c"]
    for blk in dy.blocks:
        heads, groups = blk.active_units(e["t_emb"][:1])
        logits = blk.token_selection.mlp_head[:2](_after_attention(blk, tokens_now, c, heads, groups))
        logits = blk.token_selection.mlp_head[2].weight @ logits.flatten(0, 1).T  # (1, N*T) without bias
        cut = torch.quantile(logits.float().flatten(), 1 - tokens) if tokens < 1 else logits.min() - 1
        blk.token_selection.mlp_head[2].bias.fill_(-float(cut) + (1e-4 if tokens < 1 else 0))
        tokens_now, _ = blk.forward_fast(tokens_now, c, heads, groups)


def _after_attention(blk, x, c, heads, groups):
    """The residual stream at the token router's input (the block's first half, fast path)."""
    saved = blk.dcfg.tokens
    blk.dcfg.tokens = False
    try:
        stream = {}
        hook = blk.norm2.register_forward_hook(lambda mod, args, out: stream.setdefault("x", args[0]))
        blk.forward_fast(x, c, heads, groups)
        hook.remove()
        return stream["x"]
    finally:
        blk.dcfg.tokens = saved


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["DiT-S/2", "DiT-XL/2"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 2], help="batch per config (one value: for all)")
    ap.add_argument("--densities", nargs="+", default=["1,1", "0.5,1", "0.75,0.6", "0.5,0.5"],
                    help="'width,tokens' shares of units and tokens on")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="dydit_speed")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batch * len(args.configs) if len(args.batch) == 1 else args.batch
    rows = []
    for name, batch in zip(args.configs, batches):
        dit, dy = build(name, args.side, device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, args.side, args.side, generator=g).to(device)
        t = torch.full((batch,), 500, device=device)  # one timestep for the batch, as in a sampler step
        y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        base_macs = count_flops(lambda: dit(x, t, y)).macs
        for precision in ("fp32", "bf16"):
            def fn(model, **kw):
                def run():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        return model(x, t, y, **kw)
                return run
            for density in args.densities:
                w, k = (float(v) for v in density.split(","))
                set_density(dy, w, k, x, t, y)
                ratio = count_flops(lambda: dy(x, t, y, mode="fast")).macs / base_macs
                diff = (fn(dy, mode="fast")().float() - fn(dy, mode="masked")().float()).abs().max().item()
                print(f"{name} {precision} density {density}: timing", file=sys.stderr)
                tm = side_by_side({"DiT": fn(dit), "fast": fn(dy, mode="fast"), "masked": fn(dy, mode="masked")},
                                  warmup=1, repeats=args.repeats)
                rows.append({"config": name, "batch": batch, "precision": precision, "density (width, tokens)": density,
                             "FLOPs ratio (counted)": f"{ratio:.3f}", "DiT (ms)": round(tm["DiT"].median_s * 1e3, 1),
                             "DyDiT fast (ms)": round(tm["fast"].median_s * 1e3, 1),
                             "DyDiT masked (ms)": round(tm["masked"].median_s * 1e3, 1),
                             "fast speed-up": f"{tm['DiT'].median_s / tm['fast'].median_s:.2f}x",
                             "masked speed-up": f"{tm['DiT'].median_s / tm['masked'].median_s:.2f}x",
                             "max |fast - masked|": f"{diff:.1e}"})
    notes = (f"{args.side}x{args.side}x4 latents (256x256 images), 1000 classes, random weights; one timestep per batch "
             "(a sampler step). 'masked' is the released code's way: every unit computed and multiplied by its mask. "
             "Median of interleaved repeats; the FLOPs ratio counts the whole network (embedders, adaLN and final "
             "layer included) on the fast path.")
    cmd = "python benchmarks/bench_dydit_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record(args.name, f"DyDiT fast path against DiT at 256x256, set mask densities ({args.device})", rows, notes,
           command=cmd.strip())


if __name__ == "__main__":
    main()
