"""The tanh GELU of DiT's MLP on the CPU in bf16: eager ``F.gelu``, inductor's kernel for it, and the form the
project compiles (``nn.activations.gelu_tanh``: ``x * sigmoid(2u)``, the same function), side by side, forward
and forward + backward.

    python benchmarks/bench_gelu.py

Shapes: the MLP hidden activations (batch x tokens x 4 D) of DiT-S/2 and DiT-B/2 at 256x256, batch 8.
"""

import torch
import torch.nn.functional as F

from harness import record, side_by_side

from difflineage.nn.activations import gelu_tanh

SHAPES = {"DiT-S/2 at 256px, batch 8": (8, 256, 1536), "DiT-B/2 at 256px, batch 8": (8, 256, 3072)}


def tanh_gelu(x):
    return F.gelu(x, approximate="tanh")


def main() -> None:
    rows = []
    for name, shape in SHAPES.items():
        torch._dynamo.reset()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).mul(3).bfloat16().requires_grad_()
        ref = tanh_gelu(x.detach().double())
        fns = {"eager F.gelu(tanh)": tanh_gelu, "compiled F.gelu(tanh)": torch.compile(tanh_gelu, dynamic=False),
               "compiled gelu_tanh (sigmoid form)": torch.compile(gelu_tanh, dynamic=False)}
        fwd = side_by_side({k: (lambda f=f: f(x.detach())) for k, f in fns.items()}, warmup=2, repeats=20)
        train = side_by_side({k: (lambda f=f: f(x).float().sum().backward()) for k, f in fns.items()},
                             warmup=2, repeats=20)
        base_f, base_t = fwd["compiled F.gelu(tanh)"].median_s, train["compiled F.gelu(tanh)"].median_s
        for k, f in fns.items():
            with torch.no_grad():
                err = (f(x.detach()).double() - ref).abs().max().item()
            rows.append({"shape": name, "elements": x.numel(), "candidate": k,
                         "forward (ms)": round(fwd[k].median_s * 1e3, 2),
                         "forward + backward (ms)": round(train[k].median_s * 1e3, 2),
                         "forward speed vs compiled tanh": f"{base_f / fwd[k].median_s:.2f}x",
                         "forward + backward speed vs compiled tanh": f"{base_t / train[k].median_s:.2f}x",
                         "max |out - fp64 tanh GELU|": f"{err:.1e}"})
    record("gelu_cpu_bf16", "The tanh GELU in bf16 on the CPU: three ways", rows,
           "bf16 inputs (x ~ N(0, 9)), median of 20 interleaved repeats; the backward pass is taken through a "
           "sum. The error is against the fp64 tanh GELU of the same bf16 input, so it includes the bf16 rounding "
           "of the output.", command="python benchmarks/bench_gelu.py")


if __name__ == "__main__":
    main()
