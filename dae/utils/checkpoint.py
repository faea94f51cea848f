"""Atomic checkpoint writing, safe loading that names the file at fault, and the disk checks before a run.

Every checkpoint of the project is read with :func:`load_checkpoint` (``weights_only=True``: no code in the
file runs) and written with :func:`save_checkpoint` (a temporary file beside the destination, renamed over it).
A failure of either raises :class:`~dae.errors.CheckpointError` naming the file and what is wrong in plain
words. :func:`prepare_checkpoint_dir`, called from a bundle's ``initialize`` list, removes the temporary files
of a killed run and refuses to start when the disk cannot hold the next checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dae.errors import CheckpointContentError, CheckpointError, CheckpointNotFoundError, DiskSpaceError
from dae.utils.config import resolve_flag
from dae.utils.dist import is_main_process
from dae.utils.paths import free_disk_bytes
from dae.utils.sizes import format_bytes

__all__ = [
    "CHECKPOINT_SPACE_MARGIN",
    "estimate_checkpoint_bytes",
    "load_checkpoint",
    "load_resume_checkpoint",
    "prepare_checkpoint_dir",
    "remove_stale_temporaries",
    "resume_advice",
    "resume_path",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

#: Free space needed per checkpoint write, in checkpoint sizes: the new file is written beside the one it
#: replaces, and the first validated epoch writes ``latest.pt`` and ``best.pt`` (both new) one after the other.
CHECKPOINT_SPACE_MARGIN = 2

_TEMPORARY = re.compile(r"^\..+\.\w+\.tmp$")  # .<name>.<random>.tmp, as save_checkpoint names them
_WRITER_FAILURE = re.compile(r"PytorchStreamWriter|unexpected pos|inline_container")
_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
_CORRUPT = re.compile(r"PytorchStreamReader|zip archive|magic number|corrupt", re.IGNORECASE)
_RESAVE = (
    "re-save the weights as a plain state dict (torch.save(model.state_dict(), path): tensors, numbers, "
    "strings, lists and dicts only) where the file was made, or replace the file"
)
_REPLACE = "replace the file with an intact copy: a write or a download that was cut short leaves such a file"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    The file is written to a temporary name (``.<name>.<random>.tmp``) in the same folder, flushed to disk and
    then renamed over ``path``, so a crash or a full disk never leaves a truncated checkpoint behind.

    Args:
        state: a dictionary of tensors, numbers, strings, lists and dicts (loadable with ``weights_only=True``).
        path: destination file.

    Returns:
        The destination path.

    Raises:
        CheckpointError: when the file cannot be written (e.g. a full disk), naming it, the reason and the free
            space left; the temporary file is removed and a previous file at ``path`` is unchanged. Other
            errors (e.g. an object that cannot be pickled) are raised as they are, after the same clean-up.
    """
    path = Path(path)
    existed = path.is_file()
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and _WRITER_FAILURE.search(str(err))):
            raise _write_error(path, err, existed) from err
        raise
    return path


def _write_error(path: Path, err: BaseException, existed: bool) -> CheckpointError:
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
    else:
        # torch's zip writer reports a short write (as on a full disk) without the OS error behind it.
        detail = _ENFORCE_PREFIX.sub("", str(err)).partition("\n")[0]
        reason = f"torch's writer stopped part-way ({detail}), as it does when the disk fills up"
    previous = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    return CheckpointError(
        f"could not write checkpoint {path}: {reason}; {format_bytes(free_disk_bytes(path.parent))} free in "
        f"{path.parent}; {previous}",
        advice=f"free space in {path.parent} (or make it writable) or choose another --output_dir, then launch again",
    )


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    allowed_globals: Sequence[Any] = (),
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code in the file is executed).

    Args:
        path: the checkpoint file.
        map_location: where to put the tensors.
        allowed_globals: classes or functions the file may hold besides plain types (e.g. ``argparse.Namespace``
            in original DINO checkpoints), allowed for this call only.
        mmap: map the tensors from the file instead of reading them (a quick check that the file loads).

    Returns:
        The checkpoint's dictionary.

    Raises:
        CheckpointNotFoundError: when ``path`` does not exist (also a ``FileNotFoundError``).
        CheckpointError: when the file is truncated, not a PyTorch checkpoint or holds pickled Python objects
            that weights-only loading refuses; the message names the file and the refused object.
        CheckpointContentError: when the file does not hold a dictionary (also a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        error = _read_error(path, err)
        if "Weights only load failed" in str(err):
            # torch's text suggests weights_only=False, which would run code from the file: do not pass it on.
            raise error from None
        raise error from err
    if not isinstance(state, dict):
        raise CheckpointContentError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _read_error(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    first_line = _ENFORCE_PREFIX.sub("", text).partition("\n")[0]
    if "Weights only load failed" in text:
        if refused := _REFUSED_GLOBAL.search(text):
            what = f"pickled Python objects ({refused.group(1)}) that safe weights-only loading refuses to run"
        else:
            detail = _UNPICKLER_ERROR.search(text)
            what = "pickled data that safe weights-only loading refuses" + (f" ({detail.group(1)})" if detail else "")
        return CheckpointError(f"checkpoint {path} holds {what}", advice=_RESAVE)
    size = format_bytes(path.stat().st_size)
    if isinstance(err, EOFError):
        return CheckpointError(f"checkpoint {path} ({size}) is truncated: the data ends early", advice=_REPLACE)
    if isinstance(err, (KeyError, pickle.UnpicklingError)) or _CORRUPT.search(text):
        detail = first_line.split(". ")[0] if _CORRUPT.search(text) else ""
        return CheckpointError(
            f"checkpoint {path} ({size}) is truncated or not a PyTorch checkpoint" + (f" ({detail})" if detail else ""),
            advice=_REPLACE,
        )
    return CheckpointError(f"checkpoint {path} cannot be read: {type(err).__name__}: {first_line}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` left in ``folder`` when its process was killed.

    Only files named like its temporaries (``.<name>.<random>.tmp``) are removed, each logged with its size.

    Args:
        folder: a checkpoint folder; a missing folder has nothing to remove.

    Returns:
        The removed files.
    """
    folder = Path(folder)
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and _TEMPORARY.match(path.name):
            size = path.stat().st_size
            path.unlink()
            logger.warning("removed %s (%s), left by an interrupted checkpoint write", path, format_bytes(size))
            removed.append(path)
    return removed


def estimate_checkpoint_bytes(*modules: nn.Module, optimizer_moments: int = 2) -> int:
    """About how many bytes a checkpoint of ``modules`` and their optimizer takes.

    The saved state of the modules (parameters and persistent buffers; a tensor or storage shared between
    modules counts once, as ``torch.save`` writes it once) plus ``optimizer_moments`` tensors the size of each
    trainable parameter (2 for Adam/AdamW, 1 for SGD or LARS with momentum, 0 without optimizer state).

    Args:
        modules: the networks the checkpoint holds (e.g. a DINO student and teacher).
        optimizer_moments: optimizer state tensors per trainable parameter.

    Returns:
        The estimate in bytes (small metadata such as counters and generator states is not counted).
    """
    storages: dict[tuple[str, int], int] = {}
    trainable: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in module.state_dict(keep_vars=True).values():
            storages[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        for parameter in module.parameters():
            if parameter.requires_grad:
                trainable[_storage_key(parameter)] = parameter.untyped_storage().nbytes()
    return sum(storages.values()) + optimizer_moments * sum(trainable.values())


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    pointer = tensor.untyped_storage().data_ptr()
    # Storages without memory (meta tensors) all point at 0: tell them apart by the tensor instead.
    return (str(tensor.device), pointer) if pointer else ("id", id(tensor))


def resume_path(output_dir: str | os.PathLike, resume: bool, resume_from: str | os.PathLike | None) -> Path | None:
    """The checkpoint a run continues from: ``resume_from``, else ``checkpoints/latest.pt`` with ``resume`` when it
    exists, else None (a fresh start)."""
    if resume_from:
        return Path(resume_from)
    latest = Path(output_dir) / "checkpoints" / "latest.pt"
    return latest if resume and latest.is_file() else None


def resume_advice(path: Path) -> str:
    """What to do when the checkpoint ``path`` to resume from cannot be read, naming the newest kept epoch file."""
    kept = sorted(p for p in path.parent.glob("epoch_*.pt") if p != path)
    if path.name != "latest.pt":
        other = f" (e.g. {kept[-1]})" if kept else ""
        return f"pass another --resume_from{other}, or drop --resume_from and pass --resume false to start over"
    if kept:
        return f"move {path} away, then resume with --resume_from {kept[-1]} or start over with --resume false"
    return (
        f"move {path} away and start over with --resume false (no checkpoints/epoch_NNNN.pt was kept to resume "
        "from with --resume_from)"
    )


def load_resume_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """:func:`load_checkpoint` for a run that continues from ``path``: a failure says what to resume from instead.

    Args:
        path: the checkpoint to resume from.
        mmap: map the tensors instead of reading them (the check before a run).

    Raises:
        CheckpointError: naming the file, with :func:`resume_advice`.
    """
    try:
        return load_checkpoint(path, mmap=mmap)
    except CheckpointError as err:
        # The loader's own cause (none where torch's text must not be shown).
        raise type(err)(f"cannot resume: {err}", advice=resume_advice(Path(path))) from err.__cause__


def prepare_checkpoint_dir(
    output_dir: str | os.PathLike,
    *modules: nn.Module,
    optimizer_moments: int = 2,
    resume: bool = False,
    resume_from: str | os.PathLike | None = None,
) -> None:
    """Clean ``<output_dir>/checkpoints``, check the checkpoint to resume from, and that the disk can hold the
    next checkpoint.

    Meant for a bundle's ``initialize`` list, before any dataset is cached, e.g.
    ``"$dae.utils.checkpoint.prepare_checkpoint_dir(@output_dir, @network)"``. Removes the temporary files of a
    killed run (:func:`remove_stale_temporaries`, rank 0 only), checks that the checkpoint the trainer will
    resume from loads (:func:`resume_path`, :func:`load_resume_checkpoint`) and compares the free space of the
    folder's disk (of its nearest existing parent while it does not exist yet) with
    :data:`CHECKPOINT_SPACE_MARGIN` times :func:`estimate_checkpoint_bytes` (rank 0 only: it writes the checkpoints).

    Args:
        output_dir: the run folder.
        modules: the networks the trainer checkpoints.
        optimizer_moments: optimizer state tensors per trainable parameter (2 for AdamW, 1 for SGD or LARS).
        resume: the trainer's ``resume`` (continue from ``checkpoints/latest.pt`` when it exists).
        resume_from: the trainer's ``resume_from``.

    Raises:
        CheckpointError: when the checkpoint to resume from cannot be read, naming it.
        DiskSpaceError: when the free space is below what the next checkpoint write needs, naming the folder,
            the free and the needed space.
    """
    path = resume_path(output_dir, resolve_flag(resume, "resume"), resume_from)
    if path is not None:
        load_resume_checkpoint(path, mmap=True)
    if not is_main_process():
        return
    folder = Path(output_dir) / "checkpoints"
    remove_stale_temporaries(folder)
    size = estimate_checkpoint_bytes(*modules, optimizer_moments=optimizer_moments)
    needed, free = CHECKPOINT_SPACE_MARGIN * size, free_disk_bytes(folder)
    if free < needed:
        raise DiskSpaceError(
            f"{folder} has {format_bytes(free)} free, but the next checkpoint write needs about "
            f"{format_bytes(needed)} ({CHECKPOINT_SPACE_MARGIN} x {format_bytes(size)} per checkpoint)"
        )
    logger.info("checkpoints in %s: about %s each, %s free", folder, format_bytes(size), format_bytes(free))
