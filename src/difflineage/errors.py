"""The errors difflineage raises for bad input. Each message names what was wrong, with the value, and what to do.

This module is the bottom of the package: it imports nothing, so every layer can raise these.
"""


class ConfigError(ValueError):
    """A config file or override that cannot describe a run."""


class DataError(ValueError):
    """A data source that cannot be read; the message names the path and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be loaded; the message names the file and what to do."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being a finite number."""


__all__ = ["ConfigError", "DataError", "CheckpointError", "TrainingDiverged"]
