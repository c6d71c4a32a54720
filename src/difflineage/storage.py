"""Writing files without surprises: OS errors as one line naming the path and the cause, and one writer per directory.

``writing(path, doing)`` turns any error of the file system (no space, read-only, not a directory, no permission,
a file-size limit), including the ones torch and safetensors report in their own words, into a
:class:`~difflineage.errors.StorageError` that says what was being written, where, and why it failed.

``DirectoryLock`` is an advisory lock (``flock``) on ``DIR/.lock`` that records its holder's pid, host and command:
a second writer is refused at once, naming the holder. The kernel drops the lock when its holder dies, however it
dies (``kill -9`` included), so a lock left by a dead process is taken over, with a note.
"""

from __future__ import annotations

import errno as errnos
import io
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from difflineage.errors import RunDirError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid file alone
    fcntl = None

LOCK_NAME = ".lock"

# What to do about each cause, after the OS's own words.
_ADVICE = {
    errnos.ENOSPC: "free space on that file system or write elsewhere",
    errnos.EDQUOT: "free space within your quota or write elsewhere",
    errnos.EFBIG: "a file-size limit applies (ulimit -f); raise it or write elsewhere",
    errnos.EROFS: "the file system is mounted read-only; choose a writable path",
    errnos.EACCES: "you may not write there; choose a path you own or fix its permissions",
    errnos.EPERM: "you may not write there; choose a path you own or fix its permissions",
    errnos.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errnos.EISDIR: "that path is a directory where a file was expected; choose another path",
    errnos.EEXIST: "something else already exists at that path; remove it or choose another path",
    errnos.ENOENT: "a part of that path does not exist and cannot be created there; choose another path",
    errnos.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errnos.EIO: "the device reported an I/O error; check the disk",
}


def errno_of(exc: BaseException) -> Optional[int]:
    """The OS error number behind ``exc``: an OSError's own, or the ``(os error N)`` that safetensors' Rust I/O
    and other libraries put in their messages."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    return int(found.group(1)) if found else None


def describe(path: Path | str, doing: str, code: Optional[int], detail: str = "") -> str:
    """One line: ``cannot DOING PATH: CAUSE [Errno N]; ADVICE``."""
    if code:
        cause = f"{os.strerror(code).lower()} [Errno {code}]"
        advice = _ADVICE.get(code, "check the path and the disk")
    else:
        cause, advice = detail or "the write failed", "check the path and the disk"
    return f"cannot {doing} {path}: {cause}; {advice}"


@contextmanager
def writing(path: Path | str, doing: str = "write") -> Iterator[None]:
    """Run the block; an OS error in it (or one torch/safetensors wrapped) becomes one StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(exc.errno, describe(path, doing, exc.errno, str(exc))) from None
    except Exception as exc:
        code = errno_of(exc)
        if code is None:
            raise
        raise StorageError(code, describe(path, doing, code)) from None


class RecordingFile(io.RawIOBase):
    """A binary file that remembers the OS error of a failed write: torch.save reports a full disk as
    ``RuntimeError: ... unexpected pos`` and loses the cause; this keeps it for :func:`save_torch`."""

    def __init__(self, path: Path):
        self._fh = open(path, "wb")
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = exc
                raise

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        try:
            super().close()  # flushes
        finally:
            self._fh.close()


def save_torch(obj, path: Path) -> None:
    """``torch.save(obj, path)``, with the OS's reason when the write fails (see :class:`RecordingFile`)."""
    import torch

    fh = RecordingFile(path)
    try:
        torch.save(obj, fh)
        fh.flush()
    except Exception:
        if fh.error is not None:
            raise fh.error from None
        raise
    finally:
        fh.close()


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the whole new one: a temporary file
    in the same folder, flushed to disk, renamed into place, and the rename made durable."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    with writing(path, "write"):
        try:
            with open(tmp, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete ``path`` so that no reader ever sees it half-deleted: rename it to a hidden name first, then delete."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.parent / f".removing-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An exclusive, advisory lock on ``directory`` for one writing process (see the module's docstring).

    ``what`` names the directory in messages ("run directory", "latent store"); ``hint`` is what to do instead
    when it is held. Use as a context manager, or ``acquire()`` / ``release()``.
    """

    def __init__(self, directory: Path | str, what: str = "run directory",
                 hint: str = "wait for it to finish, stop it, or choose another --out"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what, self.hint = what, hint
        self._fd: Optional[int] = None
        self.note: Optional[str] = None  # set when a dead process's lock was taken over

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict:
        """The pid, host, start time and command recorded in the lock file ({} when none is)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if self._fd is not None:
            return
        with writing(self.path, f"lock the {self.what} by writing"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock_works = self._flock(fd)
            previous = self.holder()
            host = socket.gethostname()
            if not flock_works and previous and previous.get("host") == host and _alive(int(previous.get("pid", 0))) \
                    and int(previous.get("pid", 0)) != os.getpid():
                raise RunDirError(self._held_message(previous))
            if previous.get("pid"):
                same_host = previous.get("host") == host
                state = "no longer running" if same_host and not _alive(int(previous["pid"])) else \
                    ("on another host; its lock is no longer held" if not same_host else "no longer holding it")
                self.note = (f"note: took over the lock of {self.directory} left by pid {previous['pid']} on "
                             f"{previous.get('host', '?')} ({state})")
            record = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join(sys.argv)[:500]}
            with writing(self.path, f"lock the {self.what} by writing"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """Take the kernel lock; raise naming the holder if another process has it. False where the file system
        has no flock (the pid recorded in the file then decides)."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise RunDirError(self._held_message(self.holder())) from None
        except OSError as exc:
            if exc.errno in (errnos.ENOLCK, errnos.EOPNOTSUPP, errnos.ENOSYS):
                return False
            raise

    def _held_message(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
               + (f", running: {holder['command']}" if holder.get("command") else "")) if holder else "another process"
        return f"{self.what} {self.directory} is in use by {who}; {self.hint}"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder recorded: the next writer takes it without a note
        except OSError:
            pass
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None


__all__ = ["DirectoryLock", "LOCK_NAME", "RecordingFile", "describe", "errno_of", "fsync_dir", "remove_tree",
           "save_torch", "sha256_of", "write_text_durably", "writing"]
