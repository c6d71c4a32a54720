"""DyDiT's two pictures: the attention heads and MLP channel groups its width routers switch on, per layer and
timestep (the paper's Figure 5), and where its token routers send tokens through the MLP, over the final samples.

One copy for both users: ``benchmarks/dydit_mnist.py`` draws them for docs/dydit.md (``width_picture`` over every
fifth timestep, ``token_picture`` over eight samples), and the demo draws them live for one sample of a request
(``sample_width_picture`` at the timesteps its sampler visited, ``sample_token_picture`` from a ``TokenTrace``
recorded while it was drawn).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def width_usage(net, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads and MLP groups on in every layer at each timestep: two (layers, len(timesteps)) count tensors. The
    width routers read only the timestep embedding, so this is what every sample computes at those steps."""
    t_emb = net.t_embedder(timesteps.to(next(net.parameters()).device))
    masks = [blk.width_masks(t_emb, train=False) for blk in net.blocks]
    return torch.stack([m[0].sum(1) for m in masks]).cpu(), torch.stack([m[1].sum(1) for m in masks]).cpu()


def draw_width(heads: torch.Tensor, groups: torch.Tensor, units: int, title: str, path: Path,
               extent: Optional[tuple[float, float]] = None, timesteps: Optional[Sequence[int]] = None) -> Path:
    """The two heat maps (layer x timestep) of ``width_usage``, colour 0..``units``. ``extent``: the timestep range
    the columns span evenly; ``timesteps``: one column per listed timestep (a sampler's visits), labelled."""
    plt = _pyplot()
    depth = heads.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, data, what in zip(axes, (heads.numpy(), groups.numpy()), ("attention heads on", "MLP channel groups on")):
        if extent is not None:
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=units,
                           extent=(extent[0], extent[1], depth - 0.5, -0.5), interpolation="nearest")
            ax.set_xlabel("timestep t (0 = clean image)")
        else:
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=units, interpolation="nearest")
            ticks = torch.linspace(0, len(timesteps) - 1, min(6, len(timesteps))).round().long().tolist()
            ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks])
            ax.set_xlabel(f"timestep t of the {len(timesteps)} sampler steps (0 = clean image)")
        ax.set_title(what)
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def width_picture(system, path: Path) -> Path:
    """Heads and MLP groups on, per layer, against the timestep (the paper's Figure 5 style)."""
    net = system.net
    heads, groups = width_usage(net, torch.arange(0, 1000, 5))
    return draw_width(heads, groups, net.blocks[0].heads, f"DyDiT lambda={system.config.model.target}: width per "
                      "layer and timestep", path, extent=(0, 1000))


@dataclass
class TokenTrace:
    """What a DyDiT's token routers decided while it sampled: one entry per call of the denoiser (a sampler step),
    its timestep and, per block, the (batch, tokens) decisions. A block the step cache reused at a step decided
    nothing new: its residual, and so its decisions, are those of the step before (kept as such here)."""

    timesteps: list[int] = field(default_factory=list)
    decisions: list[list[torch.Tensor]] = field(default_factory=list)  # [call][block] -> (batch, tokens) bool

    def share(self, call: int, samples: slice | torch.Tensor) -> torch.Tensor:
        """(samples, tokens): the share of layers whose MLP each token went through at ``call``."""
        return torch.stack(self.decisions[call])[:, samples].float().mean(0)


@contextmanager
def trace_tokens(net) -> Iterator[TokenTrace]:
    """Record the token decisions of a DyDiT's fast path (the sampling path) while the context is open."""
    trace = TokenTrace()
    lists: list[list[torch.Tensor]] = [[] for _ in net.blocks]
    seen: list[list[int]] = []

    def before(mod, args):
        seen.append([len(x) for x in lists])

    def after(mod, args, out):
        counts = seen.pop()
        last = trace.decisions[-1] if trace.decisions else None
        row = []
        for b, (made, count) in enumerate(zip(lists, counts)):
            if len(made) > count:
                row.append(made[-1])
            elif last is not None:  # reused by the step cache
                row.append(last[b])
            else:
                raise RuntimeError("a DyDiT block decided no tokens at the first step: sample on the fast path "
                                   "(mode=fast) to trace its token routers")
        trace.timesteps.append(int(args[1].flatten()[0]))
        trace.decisions.append(row)

    for blk, made in zip(net.blocks, lists):
        blk.token_record = made
    handles = [net.register_forward_pre_hook(before), net.register_forward_hook(after)]
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()
        for blk in net.blocks:
            blk.token_record = None


def draw_tokens(images: torch.Tensor, maps: list[tuple[int, torch.Tensor]], grid: int, title: str, path: Path) -> Path:
    """A rows x columns figure: row r is ``maps[r] = (t, (columns, tokens) shares)`` over ``images`` (columns,
    each (C, H, W) in [-1, 1], the first channel shown), brighter where more layers computed a token's MLP."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(len(maps), n, figsize=(1.3 * max(n, 2), 1.4 * len(maps)), squeeze=False)
    side = images.shape[-1]
    for r, (t, share) in enumerate(maps):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.imshow(share[c].view(grid, grid).numpy(), cmap="magma", alpha=0.55, vmin=0, vmax=1,
                      extent=(-0.5, side - 0.5, side - 0.5, -0.5), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"t={t}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def picked_steps(trace: TokenTrace, shown: int) -> list[int]:
    """``shown`` calls spread evenly over the trace, first and last included."""
    return torch.linspace(0, len(trace.timesteps) - 1, min(shown, len(trace.timesteps))).round().long().tolist()


def token_picture(system, path: Path, n: int = 8, shown_steps: int = 6) -> Path:
    """Where the token routers send tokens through the MLP (share of layers), over the final samples,
    at several timesteps of the sampling run."""
    net = system.net
    with trace_tokens(net) as trace:
        images = system.sample(n, condition=torch.arange(n) % 10, generator=torch.Generator().manual_seed(3))
    maps = [(trace.timesteps[i], trace.share(i, slice(0, n))) for i in picked_steps(trace, shown_steps)]
    return draw_tokens(images, maps, net.grid, f"DyDiT lambda={system.config.model.target}: share of layers whose "
                       f"MLP each token goes through (bright = more), over the final samples; {len(net.blocks)} layers",
                       path)


def sample_width_picture(system, trace: TokenTrace, path: Path) -> Path:
    """Heads and MLP groups on per layer at each timestep one sampling run visited (in the order visited)."""
    net = system.net
    heads, groups = width_usage(net, torch.tensor(trace.timesteps))
    return draw_width(heads, groups, net.blocks[0].heads, "active heads and MLP groups per layer at each of this "
                      "sample's steps", path, timesteps=trace.timesteps)


def sample_token_picture(system, trace: TokenTrace, image: torch.Tensor, index: int, path: Path,
                         shown_steps: int = 8) -> Path:
    """The token maps of sample ``index`` (its final ``image``, (C, H, W)): one panel per shown sampler step,
    the share of layers whose MLP each token went through (of the conditional half under guidance, which comes
    first in the batch)."""
    net = system.net
    maps = [(trace.timesteps[i], trace.share(i, slice(index, index + 1))[0]) for i in picked_steps(trace, shown_steps)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(1.5 * max(len(maps), 2), 1.9), squeeze=False)
    side = image.shape[-1]
    for c, (t, share) in enumerate(maps):
        ax = axes[0, c]
        ax.imshow(image[0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.imshow(share.view(net.grid, net.grid).numpy(), cmap="magma", alpha=0.55, vmin=0, vmax=1,
                  extent=(-0.5, side - 0.5, side - 0.5, -0.5), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t={t}", fontsize=8)
    fig.suptitle(f"sample {index}: share of the {len(net.blocks)} layers whose MLP each token went through "
                 "(bright = more)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
