"""Checkpoint directories: safetensors for weights, YAML for the config, nothing pickled.

    step_001000/
      config.yaml          the full, resolved config (rebuilds the system without the training code)
      model.safetensors    the trained weights
      ema.safetensors      the EMA weights (what sampling uses by default)
      training_state.pt    optimizer, step, RNG and data-order state (tensors and plain types only,
                           read with torch.load(weights_only=True))
      checksums.sha256     sha256sum-format digests of the four files above

A checkpoint is written under ``.tmp-<name>`` and renamed when complete, so a directory named
``step_*`` is never half-written. Loading verifies the digests and refuses, naming the file, a
checkpoint that is truncated, corrupt or does not fit the model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors.torch import load_file

from difflineage.config import Config
from difflineage.errors import CheckpointError, ConfigError
from difflineage.storage import fsync_dir, remove_tree, save_torch, sha256_of, writing
from difflineage.weights import save_safetensors, strip_prefix, torch_load_safely

FILES = ("config.yaml", "model.safetensors", "ema.safetensors", "training_state.pt")
CHECKSUMS = "checksums.sha256"


@dataclass
class Checkpoint:
    path: Path
    config: Config
    model: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]]
    training_state: Optional[dict[str, Any]]

    @property
    def step(self) -> int:
        return int(self.training_state["step"]) if self.training_state else -1

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weights of one part of the system (keys starting ``prefix``, e.g. ``"vqvae."``), prefix removed;
        from the EMA where the run kept one (what it samples with)."""
        return strip_prefix(self.ema if self.ema is not None else self.model, prefix)


def save_checkpoint(path: Path, config: Config, model: dict[str, torch.Tensor], ema: Optional[dict[str, torch.Tensor]],
                    training_state: dict[str, Any]) -> Path:
    """Write a checkpoint directory atomically (temporary name, then rename). On any failure (a full disk, a
    second Ctrl-C) the temporary directory is removed, so nothing half-written stays behind, and an OS error
    is raised as one StorageError line naming the checkpoint and the cause."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    try:
        with writing(path, "write the checkpoint"):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            meta = {"format": "pt", "producer": "difflineage", "system": config.system,
                    "step": str(training_state.get("step", ""))}
            (tmp / "config.yaml").write_text(config.to_yaml())
            save_safetensors(model, tmp / "model.safetensors", metadata=meta)
            save_safetensors(ema if ema is not None else model, tmp / "ema.safetensors", metadata=meta)
            save_torch(training_state, tmp / "training_state.pt")
            (tmp / CHECKSUMS).write_text("".join(f"{sha256_of(tmp / f)}  {f}\n" for f in FILES))
            for f in tmp.iterdir():  # make the files durable before the rename publishes them
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = path.parent / f".replaced-{path.name}"
            if path.exists():  # the same step written again (a resumed run stopped where it started)
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            remove_tree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint(path: str | Path, parse_config: Callable[[dict], Config], map_location: str | torch.device = "cpu",
                    training_state: bool = True, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (or the latest checkpoint of a run directory). ``parse_config`` turns the
    parsed config.yaml into a :class:`Config` (the registry of systems does: ``systems.load_checkpoint``)."""
    path = resolve_checkpoint(path)
    if verify:
        verify_checksums(path)
    cfg_file = path / "config.yaml"
    try:
        raw = yaml.safe_load(cfg_file.read_text())
        config = parse_config(raw)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise CheckpointError(f"{cfg_file} cannot be read as a difflineage config ({exc})") from None

    def tensors(name: str) -> dict[str, torch.Tensor]:
        f = path / name
        try:
            return load_file(str(f), device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{f} is corrupt or truncated ({exc}); use another checkpoint of the run") from None

    model = tensors("model.safetensors")
    ema = tensors("ema.safetensors") if (path / "ema.safetensors").exists() else None
    state = None
    if training_state:
        f = path / "training_state.pt"
        if not f.exists():
            raise CheckpointError(f"{f} is missing; this checkpoint can be sampled from but not resumed")
        state = torch_load_safely(f, "a checkpoint's training state", map_location=map_location)
    return Checkpoint(path=path, config=config, model=model, ema=ema, training_state=state)


def verify_checksums(path: Path) -> None:
    """Compare each file with the digest written beside it; raise naming the first that differs."""
    listing = path / CHECKSUMS
    if not listing.exists():
        return  # a checkpoint assembled by hand or by another tool: the loaders still check every file
    for line in listing.read_text().splitlines():
        digest, _, name = line.partition("  ")
        f = path / name
        if not f.exists():
            if name == "training_state.pt":
                continue  # allowed: exported checkpoints may drop the training state
            raise CheckpointError(f"{f} is missing from the checkpoint")
        if sha256_of(f) != digest:
            raise CheckpointError(f"{f} is corrupt: its sha256 differs from the one recorded in {listing}; "
                                  "use another checkpoint of the run (checkpoints/step_*)")


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.yaml").exists() and (path / "model.safetensors").exists():
        return path
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise CheckpointError(f"run directory '{path}' holds no complete checkpoint yet (checkpoints/step_*)")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at '{path}'; give a checkpoint directory (…/checkpoints/step_001000) or a run directory")
    if not path.is_dir():
        raise CheckpointError(f"'{path}' is a file, not a checkpoint; give a checkpoint directory "
                              "(…/checkpoints/step_001000) or a run directory")
    present = [f for f in ("config.yaml", "model.safetensors") if (path / f).exists()]
    missing = [f for f in ("config.yaml", "model.safetensors") if f not in present]
    if present:
        raise CheckpointError(f"'{path}' is an incomplete checkpoint: it has {present[0]} but lacks {missing[0]}; "
                              "use another checkpoint of the run (checkpoints/step_*)"
                              + ("" if missing[0] != "config.yaml" else
                                 ", or copy config.yaml from the run directory into it"))
    raise CheckpointError(f"'{path}' is not a checkpoint or run directory: it lacks config.yaml and model.safetensors "
                          "(and has no checkpoints/ folder)")


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (``checkpoints/step_*``), oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    steps = checkpoints_of(run_dir)
    return steps[-1] if steps else None

