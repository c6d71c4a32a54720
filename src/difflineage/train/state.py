"""What a training run is besides its weights, kept in one place so that a checkpoint saves it and a resume loads
it back symmetrically: the position in the data, the EMA's update count, the optimizer's moments, every process's
random state, the log window so far and the divergence watch's recent values. Also the one health check that
both host-synchronisation modes apply to a step's loss and gradient norm.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from difflineage.train.distributed import DistInfo, all_gather_objects


class DivergenceWatch:
    """Catches a loss or gradient norm that jumps by orders of magnitude while still finite (exploding weights
    show there before any NaN does), and remembers when the trouble began.

    A value is a *jump* above ``factor`` x the median of the last ``window`` values, and *elevated* above
    sqrt(factor) x that median; the trouble began at the first step of the run of elevated values that ends in the
    jump (or NaN), so a checkpoint written during a slow build-up is not called good.
    """

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.history: dict[str, deque] = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
        self.elevated_since: Optional[int] = None
        self._elevated_now = False

    def _median(self, name: str) -> Optional[float]:
        h = self.history[name]
        if not self.factor or len(h) < self.window:
            return None
        return statistics.median(abs(v) for v in h)

    def jump(self, name: str, value: float, step: int) -> str:
        """'' if ``value`` is ordinary; else how far above the recent median it is."""
        med = self._median(name)
        if med is None or med == 0:
            return ""
        ratio = abs(value) / med
        if ratio > math.sqrt(self.factor):
            self._elevated_now = True
        if ratio > self.factor:
            return (f"{ratio:.3g} x its median of {med:.4g} over the last {self.window} steps; the check is "
                    f"train.spike_factor={self.factor:g}, 0 turns it off")
        return ""

    def record(self, step: int, loss: float, grad_norm: float) -> None:
        """Keep a step that passed; track the run of elevated steps."""
        if self._elevated_now:
            if self.elevated_since is None:
                self.elevated_since = step
        else:
            self.elevated_since = None
        self._elevated_now = False
        self.history["loss"].append(loss)
        self.history["grad_norm"].append(grad_norm)

    def state(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "elevated_since": self.elevated_since}

    def load_state(self, state: Optional[dict]) -> None:
        """The recent values a checkpoint kept (None: a checkpoint from before they were kept; the watch starts
        empty, as it did then)."""
        if not state:
            return
        for k, values in state["history"].items():
            self.history[k].extend(float(v) for v in values)
        self.elevated_since = None if state["elevated_since"] is None else int(state["elevated_since"])

    def onset(self, step: int) -> int:
        """Updates done before the first suspicious value (this step's, unless a build-up preceded it)."""
        return self.elevated_since if self.elevated_since is not None else step


# The value names of a step the health check reads, and how a message calls them.
WATCHED = {"loss": "the loss", "grad_norm": "the gradient norm"}


class HealthCheck:
    """The one check of a training step's numbers, whichever synchronisation mode read them: a value that is not
    finite, or that jumps far above its recent median (``DivergenceWatch``), stops the run through ``diverged(what,
    value, step, jump)``, which raises. Step mode checks each value as soon as it exists (the loss before the
    backward pass, the gradient norm before the update); deferred mode checks a whole step when it reads it."""

    def __init__(self, watch: DivergenceWatch, diverged: Callable[[str, float, int, str], None]):
        self.watch, self.diverged = watch, diverged

    def check(self, step: int, name: str, value: float) -> None:
        """Stop on ``value`` (``name``: a key of ``WATCHED``) if it is not finite or jumps."""
        if not math.isfinite(value):
            self.diverged(WATCHED[name], value, step, "")
        jump = self.watch.jump(name, value, step)
        if jump:
            self.diverged(WATCHED[name], value, step, jump)

    def passed(self, step: int, loss: float, grad_norm: float) -> None:
        """Both values of ``step`` passed: the watch keeps them."""
        self.watch.record(step, loss, grad_norm)

    def check_step(self, step: int, loss: float, grad_norm: float) -> None:
        """A whole step read at once (deferred mode)."""
        self.check(step, "loss", loss)
        self.check(step, "grad_norm", grad_norm)
        self.passed(step, loss, grad_norm)


@dataclass
class LogWindow:
    """The sums of each logged value over the steps since the last metrics row, and the seconds those steps took
    (training only: drawing and saving are not throughput)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def row(self, step: int, epoch: int, lr: float, batch_size: int) -> dict[str, float]:
        """The metrics row of the window: each value's mean over its steps, and the throughput."""
        return {"step": step, "epoch": epoch, "lr": lr, **{k: v / max(self.steps, 1) for k, v in self.sums.items()},
                "images_per_s": self.steps * batch_size / max(self.seconds, 1e-9)}

    def clear(self) -> None:
        self.sums, self.steps, self.seconds = {}, 0, 0.0

    def state(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state(self, state: Optional[dict]) -> None:
        state = state or {}  # checkpoints from before the window was kept start an empty one
        self.sums, self.steps = dict(state.get("sums", {})), int(state.get("steps", 0))


class TrainState:
    """Everything a resume restores besides the weights: ``state_dict`` is a checkpoint's ``training_state.pt``
    and ``load_state_dict`` reads it back (step, epoch, position in the epoch, the EMA's update count, the optimizer,
    every process's random state, the log window, the divergence watch). ``state_dict`` is collective under
    torchrun (each process's random state is gathered), so every process calls it."""

    def __init__(self, optimizer: torch.optim.Optimizer, ema, watch: DivergenceWatch, info: DistInfo):
        self.step = self.epoch = self.position = 0  # position: batches of this epoch done
        self.optimizer, self.ema, self.watch, self.info = optimizer, ema, watch, info
        self.log = LogWindow()

    def state_dict(self) -> dict[str, Any]:
        rng = all_gather_objects(rng_state(self.info.device), self.info)
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "world_size": self.info.world_size,
                "ema_n_averaged": self.ema.updates, "optimizer": self.optimizer.state_dict(), "rng": rng,
                "log_window": self.log.state(), "divergence_watch": self.watch.state()}

    def load_state_dict(self, state: dict[str, Any]) -> Optional[str]:
        """Restore ``state``; returns a note when the random streams cannot continue (another process count). The
        optimizer keeps the weight decay and betas it was built with (the config's, as a fresh run would use)."""
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.ema.updates = int(state["ema_n_averaged"])
        configured = [{k: g[k] for k in ("weight_decay", "betas")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)
        self.log.load_state(state.get("log_window"))
        self.watch.load_state(state.get("divergence_watch"))
        rng = state["rng"]
        if len(rng) != self.info.world_size:
            return (f"note: resuming a {len(rng)}-process run with {self.info.world_size} processes; "
                    "random streams restart, so the continuation is not bit-exact")
        set_rng_state(rng[self.info.rank], self.info.device)
        return None


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
