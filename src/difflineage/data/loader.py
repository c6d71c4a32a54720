"""The training batches of one process, in a resumable order.

``BatchStream`` walks the epochs of a DistributedSampler (each process its own share of every global batch) from a
given (epoch, position) on, forever, and yields ``(epoch, position, batch)``. An in-memory dataset is gathered in
this process (one indexing operation per batch: the digits lose no speed); a dataset read from disk is decoded in
``torch.utils.data.DataLoader`` worker processes (persistent, prefetching, pinned memory on CUDA). The order, the
flips (a hash of seed, epoch and index: data.augment) and therefore every batch depend only on (seed, epoch,
position), so a run resumed in the middle of an epoch, with any number of workers, sees what it would have seen.
"""

from __future__ import annotations

import signal
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from difflineage.data.dataset import Batch, ImageFiles, collate
from difflineage.errors import DataError


class BatchStream:
    """Batches of ``per_rank`` images for process ``rank`` of ``world``, from ``(epoch, position)`` on."""

    def __init__(self, dataset, per_rank: int, world: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0,
                 position: int = 0, device: torch.device | str = "cpu", workers: int = 0, prefetch: int = 2):
        self.dataset, self.per_rank, self.device = dataset, per_rank, torch.device(device)
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batches_per_epoch = len(self.sampler) // per_rank
        if self.batches_per_epoch < 1:
            raise DataError(f"{dataset.name or 'the dataset'}: {len(dataset)} images make no batch of "
                            f"{per_rank} per process; lower train.batch_size")
        self.epoch, self.position = epoch, position
        self.workers, self.prefetch = workers, prefetch

    def order(self, epoch: int) -> list[int]:
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def keys(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, position, indices) of every batch from the start point on."""
        epoch, position = self.epoch, self.position
        while True:
            if position >= self.batches_per_epoch:
                epoch, position = epoch + 1, 0
            order = self.order(epoch)
            while position < self.batches_per_epoch:
                yield epoch, position, order[position * self.per_rank : (position + 1) * self.per_rank]
                position += 1

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        if not isinstance(self.dataset, ImageFiles):
            for epoch, position, idx in self.keys():
                yield epoch, position, self.dataset.batch(idx, self.device, epoch=epoch)
            return
        loader = DataLoader(_Items(self.dataset), batch_sampler=_Keys(self), collate_fn=_collate,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=self.workers > 0, prefetch_factor=self.prefetch if self.workers else None,
                            worker_init_fn=_worker_init if self.workers else None,
                            # its own generator: creating the workers draws their base seed, which must not move
                            # the training's random stream (a resumed run creates them at another point of it)
                            generator=torch.Generator().manual_seed(self.sampler.seed))
        for epoch, position, batch in loader:
            if "error" in batch:
                raise DataError(batch["error"])
            batch["image"] = batch["image"].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
            if batch["label"] is not None:
                batch["label"] = batch["label"].to(self.device, non_blocking=True)
            yield epoch, position, batch


class _Keys(Sampler):
    """The DataLoader's batch sampler: each batch a list of (index, epoch, position) keys."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        for epoch, position, idx in self.stream.keys():
            yield [(i, epoch, position) for i in idx]

    def __len__(self) -> int:  # endless; DataLoader only asks for its own bookkeeping
        return 2**62


class _Items(torch.utils.data.Dataset):
    """Decodes one key in a worker; a file that cannot be decoded becomes an error the main process raises by name
    (an exception raised in a worker would reach the user wrapped in a worker traceback)."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        index, epoch, position = key
        try:
            return self.files.item(index, epoch), epoch, position
        except DataError as exc:
            return {"error": str(exc)}, epoch, position


def _collate(items) -> tuple[int, int, dict]:
    epoch, position = items[0][1], items[0][2]
    errors = [it[0]["error"] for it in items if "error" in it[0]]
    if errors:
        return epoch, position, {"error": errors[0] + (f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else "")}
    return epoch, position, collate([it[0] for it in items], "cpu", scale=False)


def _worker_init(_worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the trainer, which finishes its step and writes a checkpoint. SLURM,
    ``timeout`` and torchrun send SIGTERM to the whole process group; a worker it killed would make the DataLoader
    raise in the middle of that checkpoint. The DataLoader still ends its workers itself, and they exit when the
    trainer dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ordered_batches(dataset, indices: list[int], batch: int, device: torch.device | str = "cpu",
                    workers: int = 0) -> Iterator[Batch]:
    """``indices`` in order, ``batch`` at a time, without augmentation (what extraction encodes); a streamed set is
    decoded in DataLoader workers."""
    chunks = [indices[s : s + batch] for s in range(0, len(indices), batch)]
    if not isinstance(dataset, ImageFiles):
        for chunk in chunks:
            yield dataset.batch(chunk, device)
        return
    loader = DataLoader(_Items(dataset), batch_sampler=[[(i, None, 0) for i in c] for c in chunks], collate_fn=_collate,
                        num_workers=workers, worker_init_fn=_worker_init if workers else None,
                        pin_memory=torch.device(device).type == "cuda", generator=torch.Generator().manual_seed(0))
    for _, _, b in loader:
        if "error" in b:
            raise DataError(b["error"])
        b["image"] = b["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        yield b


def stream_workers(requested: Optional[int]) -> int:
    """``data.workers``: the number asked for, or (None) up to 4 of the cores this process may use, less one."""
    if requested is not None:
        return requested
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


__all__ = ["BatchStream", "ordered_batches", "stream_workers"]
