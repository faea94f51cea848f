"""The project's error classes: each names what is at fault and carries one line of advice.

A bundle run that fails on one of these ends with a short summary (class, message, advice) instead of the
traceback; see :mod:`dae.bundle.report`. Each class also derives from the built-in exception a caller would
expect (``ValueError`` for bad values, ``OSError`` for files and disks), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CacheSizeError",
    "CheckpointContentError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DaeError",
    "DataError",
    "DiskSpaceError",
]


class DaeError(Exception):
    """Base of the project's errors.

    Attributes:
        advice: one line telling the user what to do; subclasses set a default, ``advice=`` overrides it.
    """

    advice: str = ""

    def __init__(self, message: str, *, advice: str | None = None) -> None:
        super().__init__(message)
        if advice is not None:
            self.advice = advice

    def __reduce__(self) -> tuple:
        # Keep the advice across pickling (DataLoader workers re-raise their errors in the main process).
        return (_rebuild, (type(self), str(self), self.advice))


def _rebuild(cls: type[DaeError], message: str, advice: str) -> DaeError:
    return cls(message, advice=advice)


class ConfigError(DaeError, ValueError):
    """A setting of a run is unknown, of the wrong type or out of range."""

    advice = "fix the named key in the command line or the config file"


class DataError(DaeError, ValueError):
    """An image, label or datalist entry cannot be used."""

    advice = "fix or remove the named entries; python -m dae.cli validate-datalist --deep checks a whole list"


class CheckpointError(DaeError, OSError):
    """A checkpoint cannot be read or written."""

    advice = "check the named file; a checkpoint that cannot be read must be replaced, not loaded half-way"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file does not exist."""

    advice = "check the path (a relative path starts from the current folder)"


class CheckpointContentError(CheckpointError, ValueError):
    """A checkpoint file loads but does not hold what the caller needs."""


class DiskSpaceError(DaeError, OSError):
    """The output folder has too little free space for the run's checkpoints."""

    advice = "free space in the output folder or choose another --output_dir"


class CacheSizeError(DaeError, MemoryError):
    """The data cache a run would build does not fit the machine's memory."""

    advice = "use cache: disk or cache: smart (see the bundle's docs/README.md), or lower cache_rate"
