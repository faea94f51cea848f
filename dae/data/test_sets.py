"""The labelled list an evaluation scores: any datalist, any split, named so that results never overwrite."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dae.data.datalist import DatalistError, load_datalist

__all__ = ["TestSet", "load_test_set"]

logger = logging.getLogger(__name__)

_FALLBACK = "validation"


@dataclass(frozen=True)
class TestSet:
    """A scored list and its name.

    Attributes:
        name: ``<datalist file stem>_<split>``, the folder of its results (``<output_dir>/evaluation/<name>``).
        datalist: the JSON file.
        split: the list that was read.
        entries: its entries, loaded and validated (:func:`~dae.data.load_datalist`).
        note: why another split than the requested one was read ("" when none).
    """

    name: str
    datalist: str
    split: str
    entries: list[dict]
    note: str = ""


def _splits_in(path: Path) -> list[str]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatalistError(f"Datalist file '{path}' cannot be read as JSON: {error}") from error
    return [key for key, value in content.items() if isinstance(value, list)] if isinstance(content, dict) else []


def load_test_set(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    split: str = "test",
    default_modality: str | None = None,
    require_label: bool | str = True,
) -> TestSet:
    """Load the list ``split`` of ``datalist`` to score; a missing ``test`` list falls back to ``validation``.

    Args:
        datalist: the JSON datalist (any file: the training lists are read from elsewhere).
        dataset_dir: folder its relative paths are joined to.
        split: the key of the list to score.
        default_modality: modality of entries without one.
        require_label: the label every entry must have, as for :func:`~dae.data.load_datalist`.

    Returns:
        The :class:`TestSet`; its ``note`` says when ``validation`` was read for a missing ``test``.

    Raises:
        DatalistError: the file or the list (and, for ``test``, the fallback) is missing, or entries are bad.
    """
    path = Path(datalist)
    if not path.is_file():
        raise DatalistError(f"Datalist file '{path}' does not exist.")
    present = _splits_in(path)
    note = ""
    if split not in present and split == "test" and _FALLBACK in present:
        note = f"'{path}' has no 'test' list: its 'validation' list is scored instead"
        logger.warning(note)
        split = _FALLBACK
    if split not in present:
        raise DatalistError(f"Datalist file '{path}' has no list '{split}' to score (lists present: {present}).")
    entries = load_datalist(
        path, key=split, data_root=dataset_dir, default_modality=default_modality, require_label=require_label
    )
    stem = re.sub(r"\.json$", "", path.name, flags=re.IGNORECASE)
    return TestSet(f"{stem}_{split}", str(path), split, entries, note)
