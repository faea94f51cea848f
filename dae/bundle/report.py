"""A failing bundle ends with a short summary; the full traceback goes to the run folder's ``error.log``.

MONAI wraps every failure of a config expression in "Failed to evaluate ConfigExpression", so the message
that names the file or key at fault sits in the middle of 60-140 lines. The summary shows the project's error
(the first :class:`dae.errors.DaeError` in the exception chain; for other errors, the original one and
where it was raised), its advice, and where the full traceback is. ``--debug`` or ``DAE_DEBUG=1`` prints the
full traceback as Python would.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from dae.errors import DaeError

__all__ = ["culprit", "format_summary", "install_error_report"]

_MAX_LINES = 30
_GENERIC_ADVICE = "not one of dae's checked errors: the full traceback shows where it happened"


@dataclass
class _Report:
    log_dir: Path | None = None
    debug: bool = False


_REPORT = _Report()


def culprit(error: BaseException) -> BaseException:
    """The exception to show: the outermost :class:`DaeError` in the chain, else the innermost exception."""
    chain = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        if isinstance(current, DaeError):
            return current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain[-1]


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (raised at {last.filename}:{last.lineno} in {last.name})"


def format_summary(error: BaseException, log_file: Path | None = None) -> str:
    """A few lines on ``error``: class, message (the first lines of a long one), advice, log file."""
    shown = culprit(error)
    lines = str(shown).strip().splitlines() or [""]
    if len(lines) > _MAX_LINES:
        lines = [*lines[: _MAX_LINES - 1], f"... {len(lines) - _MAX_LINES + 1} more lines in the full message"]
    where = "" if isinstance(shown, DaeError) else _where(shown)
    advice = shown.advice if isinstance(shown, DaeError) and shown.advice else _GENERIC_ADVICE
    text = [f"ERROR {type(shown).__name__}: {lines[0]}{where}", *lines[1:], f"Advice: {advice}."]
    if log_file is not None:
        text.append(f"Full traceback: {log_file} (or rerun with --debug, or DAE_DEBUG=1)")
    return "\n".join(text)


def _log_path() -> Path:
    rank = os.environ.get("RANK", "0")
    name = "error.log" if rank == "0" else f"error_rank{rank}.log"
    for folder in (_REPORT.log_dir, Path(tempfile.gettempdir())):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / name
            probe.touch()
            return probe
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    full = "".join(traceback.format_exception(kind, error, tb))
    log_file = _log_path()
    try:
        log_file.write_text(full)
    except OSError:
        log_file = None
    if _REPORT.debug:
        sys.stderr.write(full)
    sys.stderr.write(format_summary(error, log_file) + "\n")


def install_error_report(log_dir: str | os.PathLike | None = None, debug: bool = False) -> None:
    """Make uncaught errors end with :func:`format_summary`, writing the traceback to ``log_dir/error.log``.

    Args:
        log_dir: the run folder (the system's temporary folder when None or not writable).
        debug: also print the full traceback (``DAE_DEBUG=1`` in the environment does the same).
    """
    _REPORT.log_dir = None if log_dir is None else Path(log_dir)
    _REPORT.debug = debug or os.environ.get("DAE_DEBUG", "") not in ("", "0")
    sys.excepthook = _hook
