"""Training: the trainer (single process or torchrun DDP), checkpoints and EMA."""

from difflineage.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    resolve_checkpoint,
    save_checkpoint,
)
from difflineage.train.trainer import Trainer, TrainingDiverged, TrainResult, build_system, lr_at, resolve_data

__all__ = ["Checkpoint", "CheckpointError", "Trainer", "TrainingDiverged", "TrainResult", "build_system",
           "load_checkpoint", "load_state_dict_strict", "lr_at", "resolve_checkpoint", "resolve_data", "save_checkpoint"]
