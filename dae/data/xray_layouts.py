"""Folder layouts of X-ray datasets for :func:`dae.data.make_xray_datalist`: lists kept from split folders
(``train/``, ``valid/``, ``test/``) and classes named by folders (``PNEUMONIA/img1.png``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

__all__ = ["SPLIT_FOLDER_NAMES", "classes_from_folders", "splits_from_folders"]

SPLIT_FOLDER_NAMES: dict[str, str] = {
    "train": "training",
    "training": "training",
    "valid": "validation",
    "val": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
"""Split folder name (compared in lower case) to the datalist list its images go to."""

_SHOWN = 5  # images named in an error


def splits_from_folders(images: Mapping[str, Path], folder: Path) -> dict[str, str]:
    """The list of every image, from the split folder in its path (a folder named as in :data:`SPLIT_FOLDER_NAMES`).

    Args:
        images: image paths by their POSIX path relative to ``folder``.
        folder: the searched folder (named in errors).

    Returns:
        ``"training"``, ``"validation"`` or ``"test"`` by image key.

    Raises:
        ValueError: some images are under no split folder, or under split folders of two lists (a few named).
    """
    found = {key: _splits_in_path(key) for key in images}
    outside = [images[key] for key, splits in found.items() if not splits]
    if outside:
        raise ValueError(
            f"{len(outside)} of {len(images)} images under '{folder}' are in no split folder; with split folders kept "
            f"(keep_splits, --keep-splits) each image must be under a folder named {', '.join(SPLIT_FOLDER_NAMES)} "
            f"(any case); for one test set use test_only (--test-only):{_listing(outside)}"
        )
    mixed = [images[key] for key, splits in found.items() if len(splits) > 1]
    if mixed:
        raise ValueError(f"{len(mixed)} images under '{folder}' are under split folders of two lists:{_listing(mixed)}")
    return {key: splits.pop() for key, splits in found.items()}


def classes_from_folders(images: Mapping[str, Path], folder: Path, split_folders: bool = False) -> dict[str, str]:
    """The class of every image: the name of its parent folder (``PNEUMONIA/img1.png`` is ``PNEUMONIA``).

    Args:
        images: image paths by their POSIX path relative to ``folder``.
        folder: the searched folder (named in errors).
        split_folders: whether split folders are kept, so that a parent named like one is no class folder.

    Returns:
        The class name by image key.

    Raises:
        ValueError: some images lie directly in ``folder`` or, with ``split_folders``, directly in a split folder
            (a few named).
    """
    classes = {key: PurePosixPath(key).parent.name for key in images}
    unnamed = [
        images[key]
        for key, name in classes.items()
        if not name or (split_folders and name.lower() in SPLIT_FOLDER_NAMES)
    ]
    if unnamed:
        example = "test/PNEUMONIA/img1.png" if split_folders else "PNEUMONIA/img1.png"
        raise ValueError(
            f"{len(unnamed)} of {len(images)} images under '{folder}' are in no class folder; with classes from "
            f"folders (classes_from_folders, --classes-from-folders) each image's folder names its class, e.g. "
            f"{example}:{_listing(unnamed)}"
        )
    return classes


def _splits_in_path(key: str) -> set[str]:
    """The lists named by the folders of an image's relative path."""
    return {SPLIT_FOLDER_NAMES[p.lower()] for p in PurePosixPath(key).parts[:-1] if p.lower() in SPLIT_FOLDER_NAMES}


def _listing(paths: Sequence[Path]) -> str:
    lines = [f"\n  {p}" for p in paths[:_SHOWN]]
    if len(paths) > _SHOWN:
        lines.append(f"\n  ... and {len(paths) - _SHOWN} more")
    return "".join(lines)
