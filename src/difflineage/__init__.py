"""difflineage: the lineage of image generators (VAE, VQ-VAE, VQ-VAE-2, DALL-E, DDPM, latent diffusion,
DiT, DyDiT) on one trainer, one checkpoint format and one command.

The Python API (docs/python.md walks a session):

- ``train(config, out, data=..., steps=...)`` trains a recipe, a YAML file, a ``Config`` or a whole system (its
  stages in order), optionally fitted to your own images, and returns the run (``TrainResult``; ``.load()``).
- ``load(path)`` rebuilds a trained system from a checkpoint or run directory; ``system.sample(n, condition,
  generator, steps=..., guidance=...)`` draws images in [-1, 1] (``system.sample_options()`` lists what it takes;
  diffusers' ``num_inference_steps`` and ``guidance_scale`` are accepted too).
- ``save_grid(images, path)`` writes them as one PNG; ``flops(system)`` counts each forward pass's arithmetic.
- ``load_config(name, overrides)`` reads a recipe; ``fit_recipe(recipe, "folder:PATH")`` fits one to your data.

The layers, and which may import which: docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from difflineage.config import Config
from difflineage.eval.flops import FlopCount, count_flops
from difflineage.images import save_grid
from difflineage.systems.registry import load, load_config
from difflineage.train import Trainer, TrainResult
from difflineage.train.recipes import QUICKSTART_RECIPES, Fitted, fit_recipe, train_stages

__version__ = "0.1.0"


def train(config: Union[str, Path, Config], out: Union[str, Path, None] = None, *,
          data: Union[str, Path, None] = None, steps: Optional[int] = None, overrides: Sequence[str] = (),
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``config`` into ``out`` and return the run (``result.load()`` gives the trained system).

    :param config: a recipe name (``"ddpm-mnist"``), a YAML file, a ``Config``, or a system name (``"dit"``: its
        stages in order, a first stage before the model that reads it, as ``difflineage quickstart`` trains them).
    :param out: the run directory (default ``runs/NAME``).
    :param data: your own data: a folder (a path, or ``"folder:PATH"``) or any source string; the recipe is then
        fitted to it (size, channels, classes or captions; see ``fit_recipe``) and each change printed.
    :param steps: training steps (``train.steps``; for a system, of its final stage).
    :param overrides: ``KEY=VALUE`` settings, as ``--set`` takes them.
    :param resume: go on exactly from ``out``'s latest checkpoint (a system's stages always resume).
    """
    overrides = [*overrides, *([f"train.steps={steps}"] if steps is not None else [])]
    source = None if data is None else str(data) if ":" in str(data) and not Path(data).exists() else f"folder:{data}"
    if isinstance(config, str) and config in QUICKSTART_RECIPES and not Path(config).is_file():
        return train_stages(config, Path(out or Path("runs") / config), data=source, overrides=overrides,
                            progress=progress)
    if isinstance(config, Config):
        if source is not None or overrides:
            raise ValueError("data=, steps= and overrides= apply to a recipe's name or file; change a Config itself "
                             "(dataclasses.replace)")
        cfg, name = config, config.system
    elif source is not None:
        fitted = fit_recipe(config, source, overrides)
        for line in fitted.notes:
            print(f"fitted {Path(config).stem}: {line}")
        cfg, name = fitted.config, Path(config).stem
    else:
        cfg, name = load_config(config, overrides), Path(config).stem
    return Trainer(None if resume else cfg, Path(out or Path("runs") / name), resume=resume or None,
                   progress=progress).fit()


def flops(system) -> dict[str, FlopCount]:
    """The arithmetic of each of ``system``'s named one-image forward passes (``system.forward_passes()``), as
    ``difflineage info`` prints it: ``.macs`` (the DiT paper's "Gflops" unit), ``.flops`` (2 per MAC)."""
    return {name: count_flops(fn) for name, fn in system.forward_passes().items()}


__all__ = ["Config", "FlopCount", "Fitted", "TrainResult", "__version__", "count_flops", "fit_recipe", "flops",
           "load", "load_config", "save_grid", "train"]
