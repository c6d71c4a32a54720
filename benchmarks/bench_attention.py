"""Attention on the CPU in bf16: PyTorch's fused kernel (scaled_dot_product_attention) against the explicit
product that nn/attention.py uses for small score tensors, side by side, forward and forward + backward.

    python benchmarks/bench_attention.py

Shapes: the flagship quickstart's DiT at patch 1 and 2 (batch 128), DiT-S/2 and DiT-B/2 at 256x256 (batch 8),
and DiT-XL/2 at batch 32, where the score tensor is past the threshold and the fused kernel is kept.
"""

import torch
import torch.nn.functional as F

from harness import record, side_by_side

from difflineage.nn.attention import SMALL_SCORES


def explicit(q, k, v):
    return torch.matmul(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).softmax(-1), v)


SHAPES = {"quickstart DiT, patch 1 (64 tokens)": (128, 4, 64, 64), "quickstart DiT, patch 2 (16 tokens)": (128, 4, 16, 64),
          "DiT-S/2 at 256px, batch 8": (8, 6, 256, 64), "DiT-B/2 at 256px, batch 8": (8, 12, 256, 64),
          "DiT-XL/2 at 256px, batch 32": (32, 16, 256, 72)}


def main() -> None:
    rows = []
    for name, (b, h, t, d) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16().requires_grad_() for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def both(fn):
            return lambda: fn(q, k, v).float().sum().backward()

        fwd = side_by_side({"fused": lambda: F.scaled_dot_product_attention(q, k, v).detach(),
                            "explicit": lambda: explicit(q, k, v).detach()}, warmup=2, repeats=10)
        train = side_by_side({"fused": both(F.scaled_dot_product_attention), "explicit": both(explicit)}, warmup=2, repeats=10)
        with torch.no_grad():
            err_f = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
            err_e = (explicit(q, k, v).float() - ref).abs().max().item()
        rows.append({"shape": name, "batch x heads x tokens x dim": f"{b}x{h}x{t}x{d}",
                     "used by difflineage": "explicit" if b * h * t * t <= SMALL_SCORES else "fused",
                     "fused fwd (ms)": round(fwd["fused"].median_s * 1e3, 2),
                     "explicit fwd (ms)": round(fwd["explicit"].median_s * 1e3, 2),
                     "fused fwd+bwd (ms)": round(train["fused"].median_s * 1e3, 2),
                     "explicit fwd+bwd (ms)": round(train["explicit"].median_s * 1e3, 2),
                     "fwd+bwd speed-up": f"{train['fused'].median_s / train['explicit'].median_s:.2f}x",
                     "max err fused / explicit (vs fp32)": f"{err_f:.1e} / {err_e:.1e}"})
    notes = ("bf16 inputs on the CPU. The explicit product is used while batch x heads x tokens^2 <= "
             f"{SMALL_SCORES:,} elements (nn/attention.py SMALL_SCORES); beyond, the fused kernel is kept.")
    record("attention_cpu_bf16", "Attention in bf16 on the CPU: fused kernel against the explicit product", rows,
           notes, command="python benchmarks/bench_attention.py")


if __name__ == "__main__":
    main()
