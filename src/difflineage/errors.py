"""The errors difflineage raises for bad input. Each message names what was wrong, with the value, and what to do.

This module is the bottom of the package: it imports nothing, so every layer can raise these.
"""


class ConfigError(ValueError):
    """A config file or override that cannot describe a run."""


class DataError(ValueError):
    """A data source that cannot be read; the message names the path and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be loaded; the message names the file and what to do."""


class RunDirError(ValueError):
    """A run directory (or store) that cannot be written now: another process holds it, or it already holds a run
    that would be overwritten; the message says who holds it or what is there, and the command to use instead."""


class StorageError(OSError):
    """Writing a file failed (no space, read-only, not a directory, no permission); the message names the path and
    the cause in one line, and what was left behind (nothing half-written)."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being a finite number, or jumped by orders of magnitude."""


__all__ = ["ConfigError", "DataError", "CheckpointError", "RunDirError", "StorageError", "TrainingDiverged"]
