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
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from difflineage.checkpoint import checkpoints_of, latest_checkpoint, resolve_checkpoint, save_checkpoint
from difflineage.config import Config
from difflineage.data import BatchStream, ImageDataset, check_source, load_dataset, stream_workers
from difflineage.data.dataset import to_device
from difflineage.data.store import open_store_dataset
from difflineage.errors import CheckpointError, ConfigError, StorageError, TrainingDiverged
from difflineage.images import save_grid
from difflineage.nn.precision import resolve_bf16
from difflineage.storage import remove_tree, writing
from difflineage.systems import System, build_system, load_checkpoint, system_for
from difflineage.systems.base import Denoises
from difflineage.train.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from difflineage.train.plots import plot_metrics
from difflineage.train.rundir import check_run_dir, holds_run, lock_run_dir
from difflineage.weights import load_state_dict_strict


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "finished", "interrupted" (signal) or "stopped" (stop_at reached)
    checkpoint: Optional[Path]
    samples: Optional[Path]


def resolve_data(config: Config, dataset: ImageDataset) -> Config:
    """Fill the data fields that come from the files (channels, number of classes, class names) into the
    config, so that the checkpoint can rebuild the system, and make its captions, without the data."""
    data = config.data
    channels = dataset.shape[0]
    if data.num_classes is not None and dataset.num_classes is not None and data.num_classes < dataset.num_classes:
        raise ConfigError(f"data.num_classes={data.num_classes} but {data.source} has {dataset.num_classes} classes; "
                          f"set data.num_classes={dataset.num_classes} or leave it null")
    return replace(config, data=replace(data, channels=channels,
                                        num_classes=data.num_classes if data.num_classes is not None else dataset.num_classes,
                                        class_names=data.class_names if data.class_names is not None else dataset.class_names))


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
        config = self.config or ckpt.config
        tc = config.train
        if tc.batch_size % info.world_size:
            raise ConfigError(f"train.batch_size={tc.batch_size} does not split over {info.world_size} processes; "
                              f"use a multiple of {info.world_size}")
        per_rank = tc.batch_size // info.world_size

        if config.data.latents:  # the training set as a first stage encoded it once (difflineage extract)
            dataset = open_store_dataset(config.data, seed=tc.seed, verify=info.is_main, progress=self.progress)
        else:
            check_source(config.data)  # every file of both splits, before any time is spent
            dataset = load_dataset(config.data, "train", seed=tc.seed)
        config = system_for(config).resolve_config(resolve_data(config, dataset))
        if ckpt is not None and self.config is not None:  # compare once both are resolved (first stage filled in)
            _check_same_model(config, ckpt.config, self.resume_from)
        if len(dataset) < tc.batch_size:
            raise ConfigError(f"train.batch_size={tc.batch_size} exceeds the {len(dataset)} training images of "
                              f"{config.data.source}; lower train.batch_size")
        device = info.device
        bf16 = resolve_bf16(tc.bf16, device)
        if tc.tf32 and device.type == "cuda":  # as the official train.py: fp32 products in TF32 (a speed lever)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if tc.bf16 == "auto" and info.is_main:
            print(f"train.bf16=auto: {'bf16 autocast' if bf16 else 'fp32'} on {device} "
                  f"({'native' if bf16 else 'no native'} bf16 here)", file=sys.stderr)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        system = build_system(config).to(device)
        system.prepare(dataset)
        groups = system.param_groups()
        params = [p for g in groups for p in g["params"]]
        opt = adamw(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        ema = EMA(system, tc.ema_decay, tc.ema_warmup)
        if tc.compile:
            compile_for_training(system.net if isinstance(system, Denoises) else system, device)

        step, epoch, position = 0, 0, 0
        torch.manual_seed(tc.seed + 1 + info.rank)  # the noise each process draws during training
        if ckpt is not None:
            load_state_dict_strict(system, ckpt.model, f"{ckpt.path}/model.safetensors")
            if ckpt.ema is None:
                raise CheckpointError(f"{ckpt.path} has no ema.safetensors, which resuming needs (the EMA weights "
                                      "go on from it); restore the file, or resume from another checkpoint")
            load_state_dict_strict(ema.module, ckpt.ema, f"{ckpt.path}/ema.safetensors")
            st = ckpt.training_state
            ema.updates = int(st["ema_n_averaged"])
            configured = [{k: g[k] for k in ("weight_decay", "betas")} for g in opt.param_groups]
            opt.load_state_dict(st["optimizer"])
            for group, values in zip(opt.param_groups, configured):  # the config's, as a fresh run would use them
                group.update(values)
            step, epoch, position = int(st["step"]), int(st["epoch"]), int(st["position"])
            rng = st["rng"]
            if len(rng) == info.world_size:
                _set_rng(rng[info.rank], device)
            elif info.is_main:
                print(f"note: resuming a {len(rng)}-process run with {info.world_size} processes; "
                      "random streams restart, so the continuation is not bit-exact")
        if self.stop_at is not None and self.stop_at <= step:
            raise ConfigError(f"--stop-at {self.stop_at} is not after the step this run resumes from ({step}); give a "
                              f"later step, or leave --stop-at out to train to train.steps={tc.steps}")
        model = system
        if info.enabled:
            model = DistributedDataParallel(system, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=tc.find_unused_parameters)

        if info.is_main:
            with writing(self.run_dir / "config.yaml", "write the run's config"):
                (self.run_dir / "config.yaml").write_text(config.to_yaml())
                _truncate_metrics(self.run_dir / "metrics.jsonl", step)
        run = _RunState(info=info, config=config, system=system, ema=ema, opt=opt, run_dir=self.run_dir)
        self.system, self.ema, self.optimizer, self.config = system, ema, opt, config  # for callers and tests

        stream = BatchStream(dataset, per_rank, info.world_size, info.rank, seed=tc.seed, epoch=epoch, position=position,
                             device=device, workers=stream_workers(config.data.workers))
        batches = iter(stream)
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {config.system}", disable=not (self.progress and info.is_main),
                   dynamic_ncols=True)
        window: dict[str, float] = {}
        window_steps, window_time = 0, 0.0  # throughput counts training steps only, not drawing or saving
        watch = DivergenceWatch(tc.spike_factor, tc.spike_window)
        if ckpt is not None:  # the log window and the watch's recent values, as they were (older checkpoints lack them)
            window = dict(ckpt.training_state.get("log_window", {}).get("sums", {}))
            window_steps = int(ckpt.training_state.get("log_window", {}).get("steps", 0))
            watch.load_state(ckpt.training_state.get("divergence_watch"))
        last_ckpt = latest_checkpoint(self.run_dir)
        status = "finished"
        # Host synchronisation: "step" reads the loss and gradient norm every step and checks them before the
        # weights change; "deferred" (CUDA by default) reads them only at log, sample and checkpoint steps, while
        # the fused optimizer skips, on the device, any step whose loss or gradient norm is not finite (its
        # found_inf input) and the EMA skips it too; the checks then run over the steps since the last read, and
        # nothing is written before they pass.
        deferred = _deferred_sync(tc.sync, device, opt)
        pending: list[tuple] = []  # (step, loss, grad norm, metrics) on the device, not yet read

        def read_pending(at_step: int) -> bool:
            """Read the pending steps (one synchronisation), check them, fold them into the log window; return
            whether any process was asked to stop (deferred mode; step mode agrees on that every step)."""
            nonlocal window_steps
            stop_flag = torch.tensor([1.0 if (self._stop_signal and deferred) else 0.0], device=device)
            if info.enabled and deferred:
                dist.all_reduce(stop_flag)
            if pending:
                keys = list(pending[0][3])
                rows = torch.stack([torch.stack([lo, gn, *[m[k].float() for k in keys]]) for _, lo, gn, m in pending]).cpu()
                for (s, *_), row in zip(pending, rows.tolist()):
                    lo, gn = row[0], row[1]
                    if deferred:  # step mode checked these before the weights changed
                        for what, value, name in (("the loss", lo, "loss"), ("the gradient norm", gn, "grad_norm")):
                            if not math.isfinite(value):
                                self._diverged(what, value, s, "", watch, info)
                            jump = watch.jump(name, value, s)
                            if jump:
                                self._diverged(what, value, s, jump, watch, info)
                        watch.record(s, lo, gn)
                    window["loss"] = window.get("loss", 0.0) + lo
                    window["grad_norm"] = window.get("grad_norm", 0.0) + gn
                    for k, v in zip(keys, row[2:]):
                        window[k] = window.get(k, 0.0) + v
                    window_steps += 1
                pending.clear()
            return bool(stop_flag.item())

        try:
            while step < tc.steps:
                step_start = time.perf_counter()
                epoch, position, batch = next(batches)  # position: this batch's place in its epoch

                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, metrics = model(batch, step)  # step: those done before this one
                loss_value = loss.detach().float()
                stop = False
                if not deferred:
                    # One small all-reduce per step: the mean loss, and whether any process saw a non-finite
                    # loss or was asked to stop, so that every process takes the same branch.
                    flags = torch.tensor([loss_value.item(), 0.0 if torch.isfinite(loss).item() else 1.0,
                                          1.0 if self._stop_signal else 0.0], device=device)
                    if info.enabled:
                        dist.all_reduce(flags)
                    mean_loss, nonfinite, stop = flags[0].item() / info.world_size, flags[1].item(), bool(flags[2].item())
                    if nonfinite:
                        self._diverged("the loss", mean_loss, step, "", watch, info)
                    jump = watch.jump("loss", mean_loss, step)
                    if jump:
                        self._diverged("the loss", mean_loss, step, jump, watch, info)
                    loss_value = torch.tensor(mean_loss)
                elif info.enabled:
                    dist.all_reduce(loss_value)  # queued on the device; read with the others later
                    loss_value = loss_value / info.world_size

                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
                skip = None
                if not deferred:
                    norm = grad_norm.item()
                    if not math.isfinite(norm):
                        self._diverged("the gradient norm", norm, step, "", watch, info)
                    jump = watch.jump("grad_norm", norm, step)
                    if jump:
                        self._diverged("the gradient norm", norm, step, jump, watch, info)
                    watch.record(step, mean_loss, norm)
                else:
                    skip = ~(torch.isfinite(loss_value) & torch.isfinite(grad_norm))
                    opt.found_inf = skip.float()  # the fused AdamW leaves every weight and moment as it was
                lr = lr_at(step, tc)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                opt.step()
                ema.update(system, skip)
                pending.append((step, loss_value.to(device), grad_norm.detach().float(),
                                _mean_over_processes({k: _on_device(v, device) for k, v in metrics.items()}, info)))
                step, position = step + 1, position + 1  # position: batches of this epoch done

                done = step == tc.steps
                log_now = step % tc.log_every == 0 or done
                draw_now = bool(tc.sample_every and step % tc.sample_every == 0) or done
                save_now = bool(tc.checkpoint_every and step % tc.checkpoint_every == 0) or done
                stop_at = self.stop_at is not None and step >= self.stop_at
                if not deferred or log_now or draw_now or save_now or stop_at or (self._stop_signal and not info.enabled):
                    stop = read_pending(step) or stop
                window_time += time.perf_counter() - step_start
                bar.update(1)
                try:
                    if info.is_main and log_now:
                        row = {"step": step, "epoch": epoch, "lr": lr,
                               **{k: v / max(window_steps, 1) for k, v in window.items()},
                               "images_per_s": window_steps * tc.batch_size / max(window_time, 1e-9)}
                        with writing(self.run_dir / "metrics.jsonl", "append to"):
                            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                                fh.write(json.dumps(row) + "\n")
                        bar.set_postfix(loss=f"{row['loss']:.4g}", img_s=f"{row['images_per_s']:.0f}")
                    if log_now:
                        window, window_steps, window_time = {}, 0, 0.0
                    if draw_now:
                        run.draw(step)
                    if stop or stop_at:
                        status = "interrupted" if stop else "stopped"
                        last_ckpt = run.checkpoint(step, epoch, position, _resumable(window, window_steps, watch))
                        if info.is_main:
                            why = f"stopped by {self._stop_signal}" if stop else f"stopped at --stop-at {self.stop_at}"
                            bar.write(f"{why}: step {step} of {tc.steps}, checkpoint saved to {last_ckpt}. "
                                      f"Continue with: {self.resume_command(info)}")
                        break
                    if save_now:
                        last_ckpt = run.checkpoint(step, epoch, position, _resumable(window, window_steps, watch))
                except StorageError as exc:
                    kept = (f"the last complete checkpoint, {last_ckpt}, is intact; once that is fixed, continue with: "
                            f"{self.resume_command(info)}") if last_ckpt else \
                        "no checkpoint had been written yet; once that is fixed, start again with --overwrite"
                    raise StorageError(exc.errno, f"{exc.strerror or exc}; training stopped at step {step}: {kept}") from None
        finally:
            bar.close()
            del batches  # stops the DataLoader's workers
        samples = self.run_dir / "samples.png"
        return TrainResult(run_dir=self.run_dir, step=step, status=status, checkpoint=last_ckpt,
                           samples=samples if samples.exists() else None)

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
class _RunState:
    """What checkpointing and drawing need, gathered in one place."""

    info: DistInfo
    config: Config
    system: System
    ema: EMA
    opt: torch.optim.Optimizer
    run_dir: Path

    def checkpoint(self, step: int, epoch: int, position: int, extra: Optional[dict] = None) -> Path:
        rng = all_gather_objects(_get_rng(self.info.device), self.info)  # every process's random state
        path = self.run_dir / "checkpoints" / f"step_{step:07d}"
        if self.info.is_main:
            state = {"step": step, "epoch": epoch, "position": position, "world_size": self.info.world_size,
                     "ema_n_averaged": self.ema.updates, "optimizer": self.opt.state_dict(), "rng": rng,
                     **(extra or {})}
            save_checkpoint(path, self.config, self.system.state_dict(), self.ema.module.state_dict(), state)
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
        n = len(cond) if cond is not None else tc.sample_n
        images = model.sample(n, condition=cond, generator=torch.Generator().manual_seed(tc.seed))
        model.train(was_training)
        with writing(self.run_dir / "samples", "write the sample grid into"):
            grid = save_grid(images, self.run_dir / "samples" / f"step_{step:07d}.png", nrow=per_class or None, scale=2)
            (self.run_dir / "samples.png").write_bytes(grid.read_bytes())
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=f"{self.config.system} training")


def _resumable(window: dict[str, float], window_steps: int, watch: "DivergenceWatch") -> dict:
    """What a checkpoint keeps so that the run goes on as if never stopped: the log window's sums so far (the next
    metrics row averages the same steps) and the divergence watch's recent values."""
    return {"log_window": {"sums": dict(window), "steps": window_steps}, "divergence_watch": watch.state()}


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


def _get_rng(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


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
