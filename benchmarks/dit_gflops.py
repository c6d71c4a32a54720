"""DiT's Gflops (multiply-accumulates, the paper's unit) for all twelve configurations at 256 x 256
(latent 32 x 32 x 4), from the FLOPs counter, against the paper's Table 4.

    python benchmarks/dit_gflops.py

Models are built on the meta device: no weights are allocated, so even DiT-XL/2 costs nothing to count.
"""

import torch

from harness import record

from difflineage.eval.flops import count_flops
from difflineage.models.dit import DIT_CONFIGS, DiT, DiTConfig

PAPER = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
         "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}


def main() -> None:
    rows = []
    for name in DIT_CONFIGS:
        with torch.device("meta"):
            model = DiT(DiTConfig(name=name), in_channels=4, input_size=32, num_classes=1000)
            x, t, y = torch.empty(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
            gmacs = count_flops(model, x, t, y).gmacs
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append({"config": name, "params (M)": round(params, 1), "Gflops (ours, MACs)": round(gmacs, 2),
                     "Gflops (paper)": PAPER[name], "difference": f"{(gmacs / PAPER[name] - 1) * 100:+.2f}%"})
    notes = ("One forward pass of one 32x32x4 latent (a 256x256 image), counted with torch.utils.flop_counter under "
             "the math attention backend (matrix products, convolutions and attention; element-wise work is not "
             "counted, as in the paper's fvcore count). Parameters include the fixed positional table.")
    record("dit_gflops", "DiT Gflops at 256x256 against the paper", rows, notes, command="python benchmarks/dit_gflops.py")


if __name__ == "__main__":
    main()
