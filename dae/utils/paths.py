"""Questions about folders that the settings check, the checkpoints and the caches all ask."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["free_disk_bytes", "is_writable_folder"]


def free_disk_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the disk of ``folder``, or of its nearest existing parent when it does not exist yet."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_writable_folder(value: object) -> bool:
    """Create the folder and write a file in it: permission bits say too little (root may write anywhere)."""
    if not isinstance(value, str | os.PathLike):
        return False
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=value):
            return True
    except OSError:
        return False
