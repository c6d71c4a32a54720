"""What a run directory guarantees: one writer, no silent overwrite, no leftovers.

- One writer: the process that trains (rank 0 under torchrun) holds ``RUN/.lock`` (storage.DirectoryLock); a
  second trainer on the same directory is refused at once with the holder named. Readers (sample, evaluate) take
  no lock: checkpoints appear by rename, complete or not at all.
- No silent overwrite: training into a directory that already holds a run needs ``--resume`` (continue it) or
  ``--overwrite`` (replace it). The replacement is journalled: the old run's files are moved into
  ``RUN/.overwrite-PID/`` and that folder is marked complete before it is deleted; a crash before the mark puts the
  old run back on the next start, a crash after it leaves the new run. Never a mix of the two.
- Resuming from a checkpoint older than the run's latest moves the later ones aside
  (``checkpoints/abandoned-TIME/``), so the continuation's checkpoints are the only ``step_*`` the run has.
- Leftovers of an interrupted write (``checkpoints/.tmp-*``, ``.removing-*``) are removed on the next start.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from difflineage.checkpoint import checkpoints_of
from difflineage.errors import RunDirError
from difflineage.storage import DirectoryLock, fsync_dir, writing

# The files and folders a run writes at the top of its directory (the rest of a directory is left alone: an earlier
# stage's run nested in it, the user's own files). Top-level pictures (*.png) and sample archives (*.npz) too.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "metrics.json", "checkpoints", "samples")
RUN_SUFFIXES = (".png", ".npz")
COMPLETE = "COMPLETE"


def run_entries(run_dir: Path) -> list[Path]:
    """The entries of ``run_dir`` that belong to its run (what --overwrite replaces)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name in RUN_ENTRIES or (p.is_file() and p.suffix in RUN_SUFFIXES))


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def describe_run(run_dir: Path) -> str:
    ckpts = checkpoints_of(run_dir)
    if ckpts:
        return f"a run with {len(ckpts)} checkpoint(s), the latest {ckpts[-1].name}"
    return "a run with no checkpoint yet"


def clean_leftovers(run_dir: Path) -> list[str]:
    """Finish or undo an interrupted overwrite, and remove half-written checkpoints; return notes for the user."""
    notes = []
    for journal in sorted(run_dir.glob(".overwrite-*")):
        if (journal / COMPLETE).exists():
            shutil.rmtree(journal, ignore_errors=True)
            continue
        restored = []
        for entry in sorted(journal.iterdir()):
            if not (run_dir / entry.name).exists():
                os.replace(entry, run_dir / entry.name)
                restored.append(entry.name)
        shutil.rmtree(journal, ignore_errors=True)
        notes.append(f"note: an --overwrite of {run_dir} was interrupted; the old run is back in place "
                     f"({', '.join(restored) or 'nothing had been moved'})")
    leftovers = [*run_dir.glob(".removing-*"), *run_dir.glob(".replaced-*")]
    if (run_dir / "checkpoints").is_dir():
        leftovers += [*(run_dir / "checkpoints").glob(".tmp-*"), *(run_dir / "checkpoints").glob(".removing-*"),
                      *(run_dir / "checkpoints").glob(".replaced-*")]
    for p in sorted(leftovers):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        notes.append(f"note: removed {p}, left by an interrupted write")
    return notes


def overwrite(run_dir: Path) -> list[str]:
    """Replace the run in ``run_dir`` by nothing, journalled (see the module's docstring). Returns a note."""
    entries = run_entries(run_dir)
    if not entries:
        return []
    journal = run_dir / f".overwrite-{os.getpid()}"
    with writing(journal, "move the old run aside into"):
        journal.mkdir()
        # the checkpoints go last, so that a reader sees the old run's checkpoints until the very end
        for entry in sorted(entries, key=lambda p: p.name == "checkpoints"):
            os.replace(entry, journal / entry.name)
        (journal / COMPLETE).write_text("the old run's files; safe to delete\n")
        fsync_dir(journal)
        doomed = run_dir / f".removing-overwrite-{os.getpid()}"
        os.replace(journal, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return [f"note: --overwrite: removed the old run in {run_dir} ({', '.join(p.name for p in entries)})"]


def abandon_after(run_dir: Path, step: int) -> list[str]:
    """Move the run's checkpoints later than ``step`` into ``checkpoints/abandoned-TIME/`` (nothing is deleted)."""
    later = [p for p in checkpoints_of(run_dir) if _step_of(p) is not None and _step_of(p) > step]
    if not later:
        return []
    aside = run_dir / "checkpoints" / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    with writing(aside, "move later checkpoints aside into"):
        aside.mkdir(parents=True, exist_ok=True)
        for p in later:
            os.replace(p, aside / p.name)
    return [f"note: resuming from step {step}: the run's later checkpoints ({', '.join(p.name for p in later)}) "
            f"were moved to {aside}; delete that folder when you no longer need them"]


def _step_of(path: Path) -> Optional[int]:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def lock_run_dir(run_dir: Path) -> tuple[DirectoryLock, list[str]]:
    """Create ``run_dir`` if needed, lock it for this process and clean up after interrupted writes.
    Returns the held lock and the notes to print."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory; choose another --out")
    with writing(run_dir, "create the run directory"):
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(run_dir)
    lock.acquire()
    try:
        notes = [lock.note] if lock.note else []
        with writing(run_dir, "clean up the run directory"):
            notes += clean_leftovers(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, notes


def check_run_dir(run_dir: Path, resume_from: Optional[Path], overwrite_run: bool, resume_hint: str) -> list[str]:
    """Check that this start may write into the (locked) ``run_dir``, and make room: --overwrite replaces the old
    run, a resume from an older checkpoint moves the later ones aside. ``resume_from``: the checkpoint being
    resumed (None for a new run); ``resume_hint``: the command that continues the run, for the refusal."""
    run_dir = Path(run_dir)
    if resume_from is None or not _inside(resume_from, run_dir):
        if holds_run(run_dir):
            if not overwrite_run:
                what = "a new run" if resume_from is None else f"a run resumed from {resume_from}"
                raise RunDirError(
                    f"{run_dir} already holds {describe_run(run_dir)}; {what} would overwrite it. Continue it with: "
                    f"{resume_hint}; replace it with --overwrite; or choose another --out")
            return overwrite(run_dir)
        return []
    step = _step_of(Path(resume_from))
    return abandon_after(run_dir, step) if step is not None else []


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False


__all__ = ["RUN_ENTRIES", "abandon_after", "check_run_dir", "clean_leftovers", "describe_run", "holds_run",
           "lock_run_dir", "overwrite", "run_entries"]
