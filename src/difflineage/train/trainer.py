"""One trainer for every system: AdamW, clipping, EMA, bf16 autocast, checkpoints, exact resume,
and torchrun DistributedDataParallel.

The same code runs alone or under ``torchrun --nproc_per_node N``: each process takes
``batch_size / N`` images of every global batch through a DistributedSampler, DDP averages the
gradients, and rank 0 logs, draws and writes checkpoints. A global batch is the same set of images
whatever N is, so N processes follow the single-process run (up to the order of floating-point sums).

Run directory::

    config.yaml  metrics.jsonl  loss.png  samples.png  samples/step_*.png  checkpoints/step_*/
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from difflineage.checkpoint import checkpoints_of, latest_checkpoint, resolve_checkpoint, save_checkpoint
from difflineage.config import Config
from difflineage.data import BatchStream, ImageDataset, check_source, load_dataset, stream_workers
from difflineage.data.dataset import to_device
from difflineage.data.sources import own_captions
from difflineage.data.store import open_store_dataset
from difflineage.errors import CheckpointError, ConfigError, StorageError, TrainingDiverged
from difflineage.images import save_grid
from difflineage.nn.precision import resolve_bf16
from difflineage.storage import remove_tree, writing
from difflineage.systems import System, build_system, load, load_checkpoint, reading_stages_once, system_for
from difflineage.systems.base import Denoises
from difflineage.train.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from difflineage.train.plots import plot_metrics
from difflineage.train.rundir import check_run_dir, holds_run, lock_run_dir
from difflineage.train.state import DivergenceWatch, HealthCheck, TrainState
from difflineage.weights import load_state_dict_strict


@dataclass
class TrainResult:
    """What a training run left: its directory, the step it reached and how it ended, its last checkpoint and sample
    grid."""

    run_dir: Path
    step: int
    status: str  # "finished", "interrupted" (signal) or "stopped" (stop_at reached)
    checkpoint: Optional[Path]
    samples: Optional[Path]

    def load(self, use_ema: bool = True, device: str = "cpu") -> System:
        """The trained system of the last checkpoint, ready to sample (``difflineage.load``)."""
        if self.checkpoint is None:
            raise CheckpointError(f"the run in {self.run_dir} stopped before its first checkpoint: nothing to load")
        return load(self.checkpoint, use_ema=use_ema, device=device)


def resolve_data(config: Config, dataset: ImageDataset) -> Config:
    """Fill the data fields that come from the files (size, channels, number of classes, class names, where the
    captions come from) into the config, so that the checkpoint can rebuild the system, and make its captions,
    without the data."""
    data = config.data
    channels = dataset.shape[0]
    if data.num_classes is not None and dataset.num_classes is not None and data.num_classes < dataset.num_classes:
        raise ConfigError(f"data.num_classes={data.num_classes} but {data.source} has {dataset.num_classes} classes; "
                          f"set data.num_classes={dataset.num_classes} or leave it null")
    names = data.class_names if data.class_names is not None else dataset.class_names
    captions = "file" if own_captions(data.source) else "classes" if names is not None else None
    return replace(config, data=replace(data, channels=channels, image_size=dataset.shape[-1], captions=captions,
                                        num_classes=data.num_classes if data.num_classes is not None else dataset.num_classes,
                                        class_names=names))


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """The EMA's decay for its update after ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))`` with
    warm-up (TensorFlow's ExponentialMovingAverage with num_updates; LDM's LitEma), ``decay`` without."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class EMA:
    """The exponential moving average of a system's weights and buffers (what sampling uses).

    The first update copies; then each floating-point tensor moves toward the current one by
    ``1 - ema_decay_at(decay, n)`` (the arithmetic of ``torch.optim.swa_utils.AveragedModel`` with an EMA function,
    bit for bit) and integer buffers (counters, a tokenizer's bytes) are copied, not averaged. The update count is
    kept on the host, so an update costs no host-device synchronisation; ``skip`` (a 0-dim bool tensor on the
    device) leaves the average unchanged without the host reading it.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.module = copy.deepcopy(model)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            for a, b in zip(mine, theirs):
                a.detach().copy_(b) if skip is None else a.detach().copy_(torch.where(skip, a, b))
        else:
            weight = 1.0 - ema_decay_at(self.decay, self.updates, self.warmup)
            groups: dict = {}
            for a, b in zip(mine, theirs):
                groups.setdefault((a.device, a.dtype), ([], []))
                groups[(a.device, a.dtype)][0].append(a.detach())
                groups[(a.device, a.dtype)][1].append(b)
            for (device, dtype), (a, b) in groups.items():
                if dtype.is_floating_point:
                    if skip is not None:  # a skipped step moves toward the average itself: a NaN never enters
                        b = [torch.where(skip.to(device), x, y) for x, y in zip(a, b)]
                    torch._foreach_lerp_(a, b, weight)
                elif skip is None:
                    torch._foreach_copy_(a, b)
                else:
                    for x, y in zip(a, b):
                        x.copy_(torch.where(skip.to(device), x, y))
        self.updates += 1


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW in its fused form (one kernel over all parameters; on this project's 2-core CPU 3-6x faster than
    the default multi-tensor form on DiT-B/2's 130M parameters) where the parameters allow it, else the default."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def compile_for_training(net: torch.nn.Module, device: torch.device) -> None:
    """Compile ``net`` in place, as ``train.compile=true`` does (parameter names, and so checkpoints, stay as they
    are): static shapes, since every training batch has one shape; on the CPU with inductor's C++ wrapper, which
    calls the compiled kernels from generated C++ instead of Python (a small gain per step for a longer first
    compile; docs/dit.md)."""
    net.compile(dynamic=False, options={"cpp_wrapper": True} if device.type == "cpu" else None)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr


class Trainer:
    """Train ``config`` into ``run_dir``; ``resume`` is True (latest checkpoint of run_dir) or a path.

    ``overwrite``: replace a run already in ``run_dir`` (without it, or ``resume``, such a directory is refused).
    ``resume_command``: the command that continues this run, printed after a stop (default: the ``train`` command;
    the quickstart gives its own).
    """

    def __init__(self, config: Optional[Config], run_dir: str | Path, resume: bool | str | Path | None = None,
                 stop_at: Optional[int] = None, progress: bool = True, overwrite: bool = False,
                 resume_command: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop_at = stop_at
        self.resume = resume
        self.resume_from: Optional[Path] = None
        if config is None and not resume:
            raise ConfigError("give a config to train, or --resume a checkpoint")
        if resume and overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them")
        self.overwrite = overwrite
        self.config = config
        self._resume_command = resume_command
        self._stop_signal: Optional[str] = None

    # ------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        info = init_distributed(self.config.train.device if self.config else self._resumed_device())
        old_handlers = self._install_signal_handlers()
        lock = None
        try:
            lock = self._open_run_dir(info)
            return self._fit(info)
        finally:
            if lock is not None:
                lock.release()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            cleanup(info)

    def resume_command(self, info: Optional[DistInfo] = None, checkpoint: Optional[Path] = None, extra: str = "") -> str:
        """The command that continues this run, as it can be pasted into a shell."""
        if self._resume_command and checkpoint is None and not extra:
            return self._resume_command
        launcher = "difflineage"
        if info is not None and info.enabled:
            launcher = f"torchrun --nproc_per_node {info.world_size} -m difflineage"
        resume = f"--resume {shlex.quote(str(checkpoint))}" if checkpoint is not None else "--resume"
        return f"{launcher} train {resume} --out {shlex.quote(str(self.run_dir))}{extra}"

    def _open_run_dir(self, info: DistInfo):
        """Rank 0 creates, locks and checks the run directory and finds the checkpoint to resume; every process
        learns the outcome (a refusal is raised on all of them, so none waits for the others in vain)."""
        lock, outcome = None, None
        if info.is_main:
            try:
                lock, notes = lock_run_dir(self.run_dir)
                resume_from = None
                if self.resume:
                    resume_from = self._resolve_resume()
                notes += check_run_dir(self.run_dir, resume_from, self.overwrite, self.resume_command(info))
                for note in notes:
                    print(note, file=sys.stderr)
                outcome = ("ok", str(resume_from) if resume_from else None)
            except Exception as exc:
                if lock is not None:
                    lock.release()
                    lock = None
                outcome = ("error", exc)
        outcome = all_gather_objects(outcome, info)[0]
        if outcome[0] == "error":
            raise outcome[1]
        self.resume_from = Path(outcome[1]) if outcome[1] else None
        return lock

    def _resumed_device(self) -> str:
        """The ``train.device`` of the run that ``--resume`` continues without a config (read before the processes
        pick their device; the checkpoint itself is found and checked again afterwards, with its errors)."""
        try:
            raw = yaml.safe_load((self._resolve_resume() / "config.yaml").read_text())
            return str(raw["train"].get("device", "auto"))
        except Exception:  # reported, by name, when the checkpoint is opened for real
            return "auto"

    def _resolve_resume(self) -> Path:
        target = self.run_dir if self.resume is True else Path(self.resume)
        try:
            return resolve_checkpoint(target)
        except CheckpointError as exc:
            if self.resume is True and holds_run(self.run_dir) and not checkpoints_of(self.run_dir):
                raise CheckpointError(f"{exc}: the run stopped before its first checkpoint, so there is nothing to "
                                      "resume; start it again with --overwrite") from None
            raise

    def _fit(self, info: DistInfo) -> TrainResult:
        ckpt = load_checkpoint(self.resume_from, map_location="cpu") if self.resume_from else None
        run = self._start(info, ckpt)
        state, tc = run.state, run.config.train
        batches = iter(BatchStream(run.dataset, tc.batch_size // info.world_size, info.world_size, info.rank,
                                   seed=tc.seed, epoch=state.epoch, position=state.position, device=info.device,
                                   workers=stream_workers(run.config.data.workers)))
        bar = tqdm(total=tc.steps, initial=state.step, desc=f"train {run.config.system}",
                   disable=not (self.progress and info.is_main), dynamic_ncols=True)
        last_ckpt, status = latest_checkpoint(self.run_dir), "finished"
        try:
            while state.step < tc.steps:
                started = time.perf_counter()
                state.epoch, state.position, batch = next(batches)  # position: this batch's place in its epoch
                stop = run.update(batch, state.step)  # step: the optimizer steps done before this one
                state.step, state.position = state.step + 1, state.position + 1

                due = _Due.after(state.step, tc, self.stop_at)
                if not run.deferred or due.any or (self._stop_signal and not info.enabled):
                    stop = run.read_pending() or stop
                state.log.seconds += time.perf_counter() - started
                bar.update(1)
                try:
                    if due.log:
                        run.log(bar)
                    if due.draw:
                        run.draw(state.step)
                    if stop or due.stop_at:
                        status, last_ckpt = "interrupted" if stop else "stopped", run.checkpoint()
                        why = f"stopped by {self._stop_signal}" if stop else f"stopped at --stop-at {self.stop_at}"
                        if info.is_main:
                            bar.write(f"{why}: step {state.step} of {tc.steps}, checkpoint saved to {last_ckpt}. "
                                      f"Continue with: {self.resume_command(info)}")
                        break
                    if due.save:
                        last_ckpt = run.checkpoint()
                except StorageError as exc:
                    kept = (f"the last complete checkpoint, {last_ckpt}, is intact; once that is fixed, continue with: "
                            f"{self.resume_command(info)}") if last_ckpt else \
                        "no checkpoint had been written yet; once that is fixed, start again with --overwrite"
                    raise StorageError(exc.errno, f"{exc.strerror or exc}; training stopped at step {state.step}: "
                                       f"{kept}") from None
        finally:
            bar.close()
            del batches  # stops the DataLoader's workers
        samples = self.run_dir / "samples.png"
        return TrainResult(run_dir=self.run_dir, step=state.step, status=status, checkpoint=last_ckpt,
                           samples=samples if samples.exists() else None)

    def _start(self, info: DistInfo, ckpt) -> "TrainingRun":
        """Everything the loop needs, made in one direction: the data; the config resolved against it; the system
        with a resumed run's weights loaded *before* it is prepared (preparing builds on them and replaces
        nothing); the optimizer, the EMA and the train state restored from the checkpoint."""
        config = self.config or ckpt.config
        tc = config.train
        if tc.batch_size % info.world_size:
            raise ConfigError(f"train.batch_size={tc.batch_size} does not split over {info.world_size} processes; "
                              f"use a multiple of {info.world_size}")
        if config.data.latents:  # the training set as a first stage encoded it once (difflineage extract)
            dataset = open_store_dataset(config.data, seed=tc.seed, verify=info.is_main, progress=self.progress)
        else:
            check_source(config.data)  # every file of both splits, before any time is spent
            dataset = load_dataset(config.data, "train", seed=tc.seed)
        with reading_stages_once():  # an earlier stage's checkpoint read to resolve the config is not read again
            config = system_for(config).resolve_config(resolve_data(config, dataset))
            if ckpt is not None and self.config is not None:  # compare once both are resolved (first stage filled in)
                # what the given config leaves to be filled in (null) keeps what the checkpoint's run filled in
                config = replace(config, model=_filled_as_before(self.config.model, config.model, ckpt.config.model))
                _check_same_model(config, ckpt.config, self.resume_from)
            if len(dataset) < tc.batch_size:
                raise ConfigError(f"train.batch_size={tc.batch_size} exceeds the {len(dataset)} training images of "
                                  f"{config.data.source}; lower train.batch_size")
            device = info.device
            bf16 = _precision(tc, device, info)
            torch.manual_seed(tc.seed)  # the same initial weights on every rank
            system = build_system(config).to(device)
            if ckpt is not None:
                load_state_dict_strict(system, ckpt.model, f"{ckpt.path}/model.safetensors")
                if ckpt.ema is None:
                    raise CheckpointError(f"{ckpt.path} has no ema.safetensors, which resuming needs (the EMA weights "
                                          "go on from it); restore the file, or resume from another checkpoint")
            system.prepare(dataset, restored=ckpt is not None)
        groups = system.param_groups()
        opt = adamw(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        ema = EMA(system, tc.ema_decay, tc.ema_warmup)
        if ckpt is not None:
            load_state_dict_strict(ema.module, ckpt.ema, f"{ckpt.path}/ema.safetensors")
        if tc.compile:
            compile_for_training(system.net if isinstance(system, Denoises) else system, device)
        torch.manual_seed(tc.seed + 1 + info.rank)  # the noise each process draws during training
        watch = DivergenceWatch(tc.spike_factor, tc.spike_window)
        state = TrainState(opt, ema, watch, info)
        if ckpt is not None:
            note = state.load_state_dict(ckpt.training_state)
            if note and info.is_main:
                print(note)
        if self.stop_at is not None and self.stop_at <= state.step:
            raise ConfigError(f"--stop-at {self.stop_at} is not after the step this run resumes from ({state.step}); "
                              f"give a later step, or leave --stop-at out to train to train.steps={tc.steps}")
        model = system
        if info.enabled:
            model = DistributedDataParallel(system, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=tc.find_unused_parameters)
        if info.is_main:
            with writing(self.run_dir / "config.yaml", "write the run's config"):
                (self.run_dir / "config.yaml").write_text(config.to_yaml())
                _truncate_metrics(self.run_dir / "metrics.jsonl", state.step)
        self.system, self.ema, self.optimizer, self.config = system, ema, opt, config  # for callers and tests
        health = HealthCheck(watch, lambda what, value, step, jump: self._diverged(what, value, step, jump, watch, info))
        return TrainingRun(info=info, config=config, dataset=dataset, system=system, model=model, ema=ema, opt=opt,
                           state=state, health=health, bf16=bf16, deferred=_deferred_sync(tc.sync, device, opt),
                           stopping=lambda: self._stop_signal is not None, run_dir=self.run_dir)

    def _diverged(self, what: str, value: float, step: int, jump: str, watch: "DivergenceWatch", info: DistInfo):
        """Stop with a message that names the newest checkpoint whose weights predate the trouble, and the command
        that continues from it with a lower learning rate (or, with none, the command that starts again)."""
        tc = self.config.train
        onset = watch.onset(step)  # updates done before the first suspicious value
        good = [p for p in checkpoints_of(self.run_dir) if _step_number(p) is not None and _step_number(p) < onset]
        lower = f" --set train.lr={tc.lr / 10:g}"
        became = f"{what} became {value:.4g} at step {step + 1}" + (f" ({jump})" if jump else "")
        if good:
            after = [p.name for p in checkpoints_of(self.run_dir) if p not in good]
            where = (f"the newest checkpoint written before the trouble began (at step {onset + 1}) is {good[-1]}"
                     + (f"; later ones ({', '.join(after)}) may hold wrecked weights" if after else ""))
            todo = f"Continue from it with a lower learning rate: {self.resume_command(info, good[-1], lower)}"
        else:
            where = "no checkpoint was written before the trouble began"
            config_file = self.run_dir / "config.yaml"
            todo = ("Start again with a lower learning rate: "
                    f"difflineage train {shlex.quote(str(config_file))} --out {shlex.quote(str(self.run_dir))} "
                    f"--overwrite{lower}")
        raise TrainingDiverged(f"{became}; training stopped and nothing was saved for this step: {where}. {todo} "
                               "(or keep train.grad_clip on, e.g. 1.0, or turn off train.bf16)")

    # ------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        """SIGINT / SIGTERM: finish the current step, write a checkpoint, stop. A second signal stops at once."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return old


@dataclass
class _Due:
    """What falls due once a step is done: a metrics row, a sample grid, a checkpoint, the end of --stop-at."""

    log: bool
    draw: bool
    save: bool
    stop_at: bool

    @classmethod
    def after(cls, step: int, tc, stop_at: Optional[int]) -> "_Due":
        done = step == tc.steps
        return cls(log=step % tc.log_every == 0 or done,
                   draw=bool(tc.sample_every and step % tc.sample_every == 0) or done,
                   save=bool(tc.checkpoint_every and step % tc.checkpoint_every == 0) or done,
                   stop_at=stop_at is not None and step >= stop_at)

    @property
    def any(self) -> bool:
        return self.log or self.draw or self.save or self.stop_at


@dataclass
class TrainingRun:
    """A run in progress: the one optimizer step, reading its numbers, logging, drawing and checkpointing.

    Host synchronisation: in step mode (``deferred`` False) each step reads the loss and gradient norm and checks
    them before the weights change; in deferred mode (CUDA by default) they are read only at log, sample and
    checkpoint steps, while the fused optimizer skips, on the device, any step whose loss or gradient norm is not
    finite (its found_inf input) and the EMA skips it too; the health check then runs over the steps since the
    last read, and nothing is written before it passes."""

    info: DistInfo
    config: Config
    dataset: Any
    system: System
    model: torch.nn.Module  # the system, or its DistributedDataParallel wrapper
    ema: EMA
    opt: torch.optim.Optimizer
    state: TrainState
    health: HealthCheck
    bf16: bool
    deferred: bool
    stopping: Callable[[], bool]  # whether this process was asked to stop (a signal)
    run_dir: Path
    lr: float = 0.0
    pending: list = field(default_factory=list)  # (step, loss, grad norm, metrics) on the device, not yet read

    def __post_init__(self) -> None:
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.started = time.perf_counter()
        self.drawing_s = 0.0  # time spent drawing grids, which is not training time

    def update(self, batch, step: int) -> bool:
        """One optimizer step on ``batch``: the loss, its gradient, clipping, the learning rate of ``step``, AdamW and
        the EMA. Returns whether (step mode) any process was asked to stop."""
        tc, info, device = self.config.train, self.info, self.info.device
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, metrics = self.model(batch, step)
        loss_value, stop = loss.detach().float(), False
        if not self.deferred:
            # One small all-reduce per step: the mean loss, and whether any process was asked to stop, so that every
            # process takes the same branch (a non-finite loss anywhere makes the mean non-finite everywhere).
            flags = torch.tensor([loss_value.item(), 1.0 if self.stopping() else 0.0], device=device)
            if info.enabled:
                dist.all_reduce(flags)
            mean_loss, stop = flags[0].item() / info.world_size, bool(flags[1].item())
            self.health.check(step, "loss", mean_loss)
            loss_value = torch.tensor(mean_loss)
        elif info.enabled:
            dist.all_reduce(loss_value)  # queued on the device; read with the others later
            loss_value = loss_value / info.world_size

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        skip = None
        if not self.deferred:
            norm = grad_norm.item()
            self.health.check(step, "grad_norm", norm)
            self.health.passed(step, mean_loss, norm)
        else:
            skip = ~(torch.isfinite(loss_value) & torch.isfinite(grad_norm))
            self.opt.found_inf = skip.float()  # the fused AdamW leaves every weight and moment as it was
        self.lr = lr_at(step, tc)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.opt.step()
        self.ema.update(self.system, skip)
        self.pending.append((step, loss_value.to(device), grad_norm.detach().float(),
                             _mean_over_processes({k: _on_device(v, device) for k, v in metrics.items()}, info)))
        return stop

    def read_pending(self) -> bool:
        """Read the pending steps (one synchronisation), check them (deferred mode), fold them into the log window;
        return whether any process was asked to stop (deferred mode; step mode agrees on that every step)."""
        stop_flag = torch.tensor([1.0 if (self.stopping() and self.deferred) else 0.0], device=self.info.device)
        if self.info.enabled and self.deferred:
            dist.all_reduce(stop_flag)
        if self.pending:
            keys = list(self.pending[0][3])
            rows = torch.stack([torch.stack([lo, gn, *[m[k].float() for k in keys]])
                                for _, lo, gn, m in self.pending]).cpu()
            for (step, *_), row in zip(self.pending, rows.tolist()):
                if self.deferred:  # step mode checked these before the weights changed
                    self.health.check_step(step, row[0], row[1])
                self.state.log.add({"loss": row[0], "grad_norm": row[1], **dict(zip(keys, row[2:]))})
            self.pending.clear()
        return bool(stop_flag.item())

    def log(self, bar) -> None:
        """A metrics row of the window so far (rank 0 writes it, and prints it as a line when the progress bar is
        off), and a new window (every rank)."""
        state = self.state
        if self.info.is_main:
            row = state.log.row(state.step, state.epoch, self.lr, self.config.train.batch_size)
            with writing(self.run_dir / "metrics.jsonl", "append to"):
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4g}", img_s=f"{row['images_per_s']:.0f}")
            if bar.disable:
                print(f"{self.config.system} step {row['step']}/{self.config.train.steps}: loss {row['loss']:.4g}, "
                      f"{row['images_per_s']:.0f} images/s", flush=True)
        state.log.clear()

    def checkpoint(self) -> Path:
        """A checkpoint of this step (collective: every process's random state goes in); older ones beyond
        ``train.keep_checkpoints`` removed."""
        training_state = self.state.state_dict()
        path = self.run_dir / "checkpoints" / f"step_{self.state.step:07d}"
        if self.info.is_main:
            save_checkpoint(path, self.config, self.system.state_dict(), self.ema.module.state_dict(), training_state)
            keep = self.config.train.keep_checkpoints
            if keep:
                for old in checkpoints_of(self.run_dir)[:-keep]:
                    remove_tree(old)
        barrier(self.info)
        return path

    def draw(self, step: int) -> None:
        """Sample grid from the EMA weights (a fixed seed, so grids of different steps compare) and loss curve."""
        if not self.info.is_main:
            return
        tc = self.config.train
        model = self.ema.module
        was_training = model.training
        model.eval()
        cond, per_class = model.grid_labels(tc.sample_n)  # one row per class
        if model.captions_from_file:  # captions of the training set, spread over it: the only ones it has seen
            cond, per_class = preview_captions(self.dataset, tc.sample_n), 0
        start = time.perf_counter()
        budget = max(GRID_MIN_SECONDS, GRID_SHARE * (start - self.started - self.drawing_s))
        images, per_class = draw_within(model, cond, per_class, tc.sample_n, tc.seed, budget)
        self.drawing_s += time.perf_counter() - start
        model.train(was_training)
        with writing(self.run_dir / "samples", "write the sample grid into"):
            grid = save_grid(images, self.run_dir / "samples" / f"step_{step:07d}.png", nrow=per_class or None, scale=2)
            (self.run_dir / "samples.png").write_bytes(grid.read_bytes())
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=f"{self.config.system} training")


# A sample grid may take GRID_SHARE of the training time before it (at least GRID_MIN_SECONDS): a short run's grid
# is smaller than train.sample_n, so that drawing it never takes longer than the run it shows.
GRID_SHARE = 0.25
GRID_MIN_SECONDS = 10.0


def draw_within(model: System, cond, per_class: int, n: int, seed: int, budget: float):
    """The sample grid of ``model`` (``cond``: class labels one row per class, ``per_class`` wide, or captions, or
    None), drawn a column (one image per class; for captions or none, 8 images) at a time with a generator seeded
    ``seed``, as many columns as ``budget`` seconds allow after the first. Returns (images, row length)."""
    generator = torch.Generator().manual_seed(seed)
    if cond is not None and per_class:  # rows of classes: draw column by column
        k = len(cond) // per_class
        column, count = cond[::per_class], per_class
    else:
        total = len(cond) if cond is not None else n
        k, count = min(8, total), -(-total // min(8, total))
        column = None
    columns, start = [], time.perf_counter()
    for j in range(count):
        if j and (time.perf_counter() - start) / j * (j + 1) > budget:
            break
        if column is not None:
            columns.append(model.sample(k, condition=column, generator=generator))
        else:
            part = cond[j * k:(j + 1) * k] if cond is not None else None
            m = len(part) if part is not None else min(k, n - j * k)
            columns.append(model.sample(m, condition=part, generator=generator))
    if column is not None:  # class-major order: each class's images side by side in its row
        images = torch.stack(columns, 1).flatten(0, 1)
        return images, len(columns)
    return torch.cat(columns), 0


def preview_captions(dataset, n: int) -> list[str]:
    """``n`` captions spread evenly over ``dataset``'s (for the sample grid of a run trained on a captions file)."""
    captions = list(dataset.captions)
    return [captions[i] for i in torch.linspace(0, len(captions) - 1, min(n, len(captions))).long().tolist()]


def _precision(tc, device: torch.device, info: DistInfo) -> bool:
    """Whether this run trains under bf16 autocast (``train.bf16``; said once on ``auto``); TF32 on CUDA with
    ``train.tf32``, as the official DiT train.py (fp32 products in TF32: a speed lever)."""
    bf16 = resolve_bf16(tc.bf16, device)
    if tc.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tc.bf16 == "auto" and info.is_main:
        print(f"train.bf16=auto: {'bf16 autocast' if bf16 else 'fp32'} on {device} "
              f"({'native' if bf16 else 'no native'} bf16 here)", file=sys.stderr)
    return bf16


def _mean_over_processes(metrics: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """A step's metrics averaged over the processes, as the loss is (one small all-reduce, queued on the device),
    so that metrics.jsonl does not depend on how many processes trained."""
    if not info.enabled or not metrics:
        return metrics
    stacked = torch.stack([v.float().reshape(()) for v in metrics.values()])
    dist.all_reduce(stacked)
    return dict(zip(metrics, stacked / info.world_size))


def _on_device(value, device: torch.device) -> torch.Tensor:
    """A step's metric as a tensor on ``device``, kept for the next read: a device tensor as it is (moved if on
    another device), a host one (a number, a CPU tensor) copied without making the host wait for the device."""
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value.detach().to(device)
    return to_device(torch.as_tensor(value).detach(), device)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget the lines written after the checkpoint, so the log matches the weights (and a line cut
    short by a full disk)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


def _filled_as_before(given: Any, resolved: Any, before: Any) -> Any:
    """``resolved`` with the checkpoint's value (``before``) wherever the config as given left a field null to be
    filled in when training starts (a first stage's architecture, the dVAE's annealing length): a resumed run keeps
    what its start filled in, even where the config would now fill in something else (another ``train.steps``)."""
    if given is None:
        return before
    if is_dataclass(resolved) and type(resolved) is type(before) and type(given) is type(resolved):
        return replace(resolved, **{f.name: _filled_as_before(getattr(given, f.name), getattr(resolved, f.name),
                                                              getattr(before, f.name))
                                    for f in fields(resolved) if f.init})
    return resolved


def _check_same_model(new: Config, old: Config, where: Path) -> None:
    for section in ("system", "model"):
        a, b = getattr(new, section), getattr(old, section)
        if a != b:
            raise ConfigError(f"the config's {section} differs from the checkpoint's ({where}/config.yaml): "
                              f"{a} vs {b}; resume with the checkpoint's {section} settings (omit CONFIG and any {section}.* "
                              "overrides) or start a new run")
    if new.data.source != old.data.source or new.data.image_size != old.data.image_size:
        raise ConfigError(f"the config's data differs from the checkpoint's ({where}/config.yaml); resume with the same data")


def _deferred_sync(mode: str, device: torch.device, opt: torch.optim.Optimizer) -> bool:
    """Whether the loop reads its numbers only at log, sample and checkpoint steps (``train.sync``): needs the
    fused optimizer, which can skip a non-finite step on the device."""
    fused = all(g.get("fused") for g in opt.param_groups)
    if mode == "deferred" and not fused:
        raise ConfigError("train.sync=deferred needs the fused AdamW (floating-point parameters on the CPU or CUDA); "
                          "use train.sync=step")
    return mode == "deferred" or (mode == "auto" and device.type == "cuda" and fused)


def _step_number(path: Path) -> Optional[int]:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None
