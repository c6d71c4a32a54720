"""Where the time of a compiled bf16 DiT training step goes on this machine: matrix products, the compiled
element-wise kernels, the optimizer, the rest (torch.profiler, self time per step).

    python benchmarks/profile_dit_step.py                     # DiT-B/2, 32x32x4 latents, batch 8

The step is the fast training path of benchmarks/bench_dit_speed.py: bf16 autocast, the network compiled as
``train.compile=true`` does, the trainer's fused AdamW.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from harness import record

from difflineage.models.dit import DiT, DiTConfig
from difflineage.train.trainer import adamw, compile_for_training

# the eager names, and the ones inductor's C++ wrapper calls
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aoti_torch_cpu_mm_out", "aoti_torch_cpu_addmm_out",
           "aoti_torch_cpu_bmm_out")


def category(name: str) -> str:
    if name in MATMULS:
        return "matrix products (mm, addmm, bmm)"
    if name.startswith("graph_") and "cpp_fused" in name:
        return "compiled element-wise kernels"
    if name == "aten::_fused_adamw_":
        return "optimizer (fused AdamW)"
    return "everything else (framework, copies, loss)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="DiT-B/2")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = DiT(DiTConfig(name=args.config), in_channels=4, input_size=args.side, num_classes=1000).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    opt = adamw(list(model.parameters()), lr=1e-4)
    torch._inductor.config.cpp.enable_kernel_profile = True  # each compiled kernel appears by name
    compile_for_training(model, torch.device("cpu"))
    x, target = torch.randn(args.batch, 4, args.side, args.side), torch.randn(args.batch, 8, args.side, args.side)
    t, y = torch.randint(0, 1000, (args.batch,)), torch.randint(0, 1000, (args.batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_cat: dict[str, float] = collections.defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total
    rows = [{"part": k, "ms per step": round(v / 1e3 / args.steps, 1), "share": f"{100 * v / total:.1f}%"}
            for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    kernels = sorted((e for e in events if category(e.key) == "compiled element-wise kernels"),
                     key=lambda e: -e.self_cpu_time_total)[:5]
    rows += [{"part": f"  kernel {e.key}", "ms per step": round(e.self_cpu_time_total / 1e3 / args.steps, 1),
              "share": f"{100 * e.self_cpu_time_total / total:.1f}%"} for e in kernels]
    for r in rows:
        print(f"{r['part'][:90]:90s} {r['ms per step']:8.1f} ms {r['share']:>6s}")
    record("dit_step_profile", f"Where a compiled bf16 {args.config} training step goes (batch {args.batch})", rows,
           f"Self CPU time from torch.profiler over {args.steps} steps after 3 warm-up steps, {args.side}x{args.side}x4 "
           "latents; the five largest compiled kernels listed under their category. Profiling adds some overhead.",
           command=" ".join(["python benchmarks/profile_dit_step.py", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
