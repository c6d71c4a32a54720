"""A picture of the OpenMoji source as the models see it: one emoji from each of 48 subgroups at 32 px with its
caption, held-out and compositional ones marked, credited to OpenMoji (CC BY-SA 4.0). Writes
docs/images/openmoji_examples.png and prints how many emoji the font drew and how the split falls.

    python benchmarks/openmoji_preview.py
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.data.openmoji import compositional, kept_report

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    cfg = DataConfig(source="openmoji", image_size=32, channels=None)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    drawn = time.perf_counter() - start
    novel = set(compositional(train.captions, held.captions))
    # one held-out emoji from each of the first subgroups that have one, compositional ones first where they exist
    order = sorted(range(len(held)), key=lambda i: (i not in novel, i))
    picked, seen = [], set()
    for i in order:
        label = int(held.labels[i])
        if label not in seen:
            seen.add(label)
            picked.append(i)
        if len(picked) == 48:
            break
    picked.sort()
    fig, axes = plt.subplots(6, 8, figsize=(13, 11.5))
    for ax, i in zip(axes.flat, picked):
        ax.imshow(np.asarray(held.images[i]).transpose(1, 2, 0), interpolation="nearest")
        mark = " *" if i in novel else ""
        ax.set_title(textwrap.fill(held.captions[i] + mark, 24, max_lines=2, placeholder=" ..."), fontsize=7)
        ax.axis("off")
    fig.suptitle("OpenMoji at 32 px, held-out split: caption (CLDR name); *: a compositional caption, its parts "
                 "seen in training apart\nEmoji artwork: OpenMoji (openmoji.org), CC BY-SA 4.0", fontsize=9)
    fig.tight_layout()
    out = REPO / "docs" / "images" / "openmoji_examples.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"{kept_report(32)}; drawn and split in {drawn:.1f} s; {len(train)} train, {len(held)} held out, of which "
          f"{len(novel)} compositional; {train.num_classes} subgroups; wrote {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
