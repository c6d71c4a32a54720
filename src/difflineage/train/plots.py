"""The loss-curve picture written beside metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, out: Path, title: str = "training", keys: tuple[str, ...] = ()) -> Path | None:
    """Plot the loss (and up to three more logged metrics) against the step; returns the PNG path."""
    if not Path(metrics_file).exists():
        return None
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "epoch", "lr", "loss", "images_per_s", "grad_norm"}
    loss = [r.get("loss") for r in rows]
    # Extra panels: the system's own metrics, leaving out any that repeat the loss (the VAE's -ELBO).
    extra = list(keys) or [k for k in rows[-1] if k not in skip and [r.get(k) for r in rows] != loss][:3]
    panels = ["loss", *extra]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes[0], panels):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
