"""Training: the trainer (single process or torchrun DDP), EMA, distributed set-up and plots."""

from difflineage.checkpoint import Checkpoint, latest_checkpoint, resolve_checkpoint, save_checkpoint
from difflineage.errors import CheckpointError, TrainingDiverged
from difflineage.systems import build_system, load_checkpoint
from difflineage.train.trainer import Trainer, TrainResult, lr_at, resolve_data
from difflineage.weights import load_state_dict_strict

__all__ = ["Checkpoint", "CheckpointError", "Trainer", "TrainingDiverged", "TrainResult", "build_system",
           "latest_checkpoint", "load_checkpoint", "load_state_dict_strict", "lr_at", "resolve_checkpoint",
           "resolve_data", "save_checkpoint"]
