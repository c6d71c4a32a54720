"""Evaluation: scores of a trained system on a held-out split, written as metrics.json.

Likelihood-based systems (the VAE) report their held-out bounds through ``System.evaluate``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from difflineage.data import load_dataset


def evaluate_system(system, split: str = "heldout", seed: int = 0, progress: bool = True,
                    out: Optional[Path] = None, **options: Any) -> dict[str, Any]:
    """Score ``system`` on ``split`` of its own data source; optionally write ``out`` (JSON)."""
    cfg = system.config
    dataset = load_dataset(cfg.data, split)
    start = time.perf_counter()
    scores = system.evaluate(dataset, generator=torch.Generator().manual_seed(seed), progress=progress, **options)
    result = {
        "system": cfg.system,
        "checkpoint": str(getattr(system, "checkpoint_path", "")),
        "data": cfg.data.source,
        "split": split,
        "images": len(dataset),
        "seed": seed,
        **scores,
        "seconds": round(time.perf_counter() - start, 2),
        "machine": machine_description(),
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def machine_description() -> str:
    """One line naming the machine a number came from."""
    import os

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
