"""Datalists of the dictation-to-mask pipeline, checked up front, and a disk cache of image embeddings.

A LoGSAM datalist (e.g. ``jsons/logsam_demo.json``) is ``{"training": [...], "validation": [...], "test": [...]}``;
each entry holds ``image`` (an 8-bit grey PNG), ``class`` (a name of the class table), a tumour ``mask`` (same
size, non-zero = tumour) and/or its tight ``box`` ``[x0, y0, x1, y1]`` in pixels (x1/y1 exclusive), and optionally
``dictation`` (an audio file), ``report`` (the dictation's text), ``language`` (a language of the class table:
``"en"``, ``"de"``), ``dictated_class`` (the class the report names, when it differs from the image's) and ``id``.
Paths are relative to a dataset folder (the repository's ``data/`` for the demo) or absolute.

:class:`EmbeddingCache` runs a segmenter's image encoder once per image and keeps the result on disk, so that
training and evaluating a detector on top of the frozen encoder costs one encoder pass per image in total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from dae.errors import CheckpointError, DataError
from dae.logsam.classes import ClassTable
from dae.utils.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "EmbeddingCache",
    "load_logsam_datalist",
    "mask_to_box",
    "read_grey",
]

logger = logging.getLogger(__name__)


_GREY_MODES = ("L", "LA", "P", "RGB", "RGBA")  # 8-bit modes that PIL converts to grey without rescaling
_PATH_KEYS = ("image", "mask", "dictation")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def read_grey(path: str | Path) -> np.ndarray:
    """An 8-bit image file as a grey ``uint8`` array of shape (H, W); colour images are converted to grey.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        DataError: when the file is not an image PIL can read, or not 8 bits per channel (e.g. a 16-bit PNG,
            whose conversion would clip), naming the file and its mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in _GREY_MODES:
                raise DataError(f"image {path} has PIL mode {image.mode!r}; expected an 8-bit image ({_GREY_MODES})")
            return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {path} cannot be read: {err}") from err


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """The tight box ``[x0, y0, x1, y1]`` (float, x1/y1 exclusive) around the non-zero pixels of an (H, W) mask.

    Returns:
        A (4,) float64 array, or None when the mask has no non-zero pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_to_box expects an (H, W) mask, got shape {mask.shape}")
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float64)


def _resolve(value: object, dataset_dir: Path) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else dataset_dir / path


def _box_problem(box: object, size: tuple[int, int]) -> str | None:
    """Why ``box`` is not a valid ``[x0, y0, x1, y1]`` inside an image of ``size`` (H, W), or None."""
    numbers = isinstance(box, list) and len(box) == 4
    if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return f"must be 4 numbers [x0, y0, x1, y1], got {box!r}"
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        return f"{box} is not a box with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (the image's W, H)"
    return None


def _entry_problems(entry: object, dataset_dir: Path, table: ClassTable) -> tuple[list[str], dict[str, Any]]:
    """Every problem of one entry as ``"key 'k' (value): reason"`` strings, and the resolved entry."""
    if not isinstance(entry, Mapping):
        return [f"must be a JSON object, got {type(entry).__name__}"], {}
    problems: list[str] = []
    out = dict(entry)
    for key in ("image", "class"):
        if key not in entry:
            problems.append(f"key '{key}' is missing (keys present: {sorted(entry)})")
    for key in _PATH_KEYS:
        if key in entry:
            out[key] = str(_resolve(entry[key], dataset_dir))
            if not Path(out[key]).is_file():
                problems.append(f"key '{key}' ({out[key]}): file does not exist")
    name = entry.get("class")
    if "class" in entry and name not in table.names:
        problems.append(f"key 'class' ({name!r}): not a class of the class table {list(table.names)}")
    tumour = name in table.tumour_names
    if tumour and "mask" not in entry and "box" not in entry:
        problems.append(f"class {name!r} is a tumour class: a 'mask' or a 'box' is required")
    if not tumour and "box" in entry:
        problems.append(f"key 'box': a {name!r} entry has no tumour to box")
    language = entry.get("language")
    if language is not None and language not in table.languages:
        problems.append(f"key 'language' ({language!r}): must be one of the class table's {list(table.languages)}")
    dictated = entry.get("dictated_class")
    if dictated is not None and dictated not in table.names:
        problems.append(f"key 'dictated_class' ({dictated!r}): not a class of the class table {list(table.names)}")
    if "report" in entry and not isinstance(entry["report"], str):
        problems.append(f"key 'report' ({entry['report']!r}): must be a string")
    if problems or "image" not in entry:
        return problems, out

    try:
        size = read_grey(out["image"]).shape
    except DataError as err:
        return [f"key 'image': {err}"], out
    mask_box = None
    if "mask" in entry:
        try:
            mask = read_grey(out["mask"])
        except DataError as err:
            return [f"key 'mask': {err}"], out
        if mask.shape != size:
            return [f"key 'mask' ({out['mask']}): size {mask.shape} differs from the image's {size} (H, W)"], out
        mask_box = mask_to_box(mask)
        if tumour and mask_box is None:
            problems.append(f"key 'mask' ({out['mask']}): empty, but class {name!r} is a tumour class")
        if not tumour and mask_box is not None:
            problems.append(f"key 'mask' ({out['mask']}): not empty, but class {name!r} has no tumour")
    if "box" in entry:
        problem = _box_problem(entry["box"], size)
        if problem is not None:
            problems.append(f"key 'box': {problem}")
        elif mask_box is not None and not np.array_equal(np.asarray(entry["box"], dtype=np.float64), mask_box):
            problems.append(f"key 'box' ({entry['box']}): differs from the mask's tight box {mask_box.tolist()}")
    if not problems and tumour:
        out["box"] = [float(v) for v in entry.get("box", mask_box)]
    return problems, out


def load_logsam_datalist(
    path: str | Path, dataset_dir: str | Path, split: str, class_table: ClassTable | None = None
) -> list[dict[str, Any]]:
    """Read one list of a LoGSAM datalist and check every entry before anything is trained or evaluated.

    Checks, for every entry: ``image`` and ``class`` are present; the files of ``image``, ``mask`` and
    ``dictation`` exist; the image (and mask) are 8-bit images of the same size; ``class`` is a name of the class
    table; a tumour class has a ``mask`` or a ``box``, its mask is not empty and another class (``healthy``) has
    neither a box nor a non-empty mask; ``box`` lies inside the image with x0 < x1, y0 < y1 and, with a mask,
    equals the mask's tight box; ``language`` is a language and ``dictated_class`` a class of the class table;
    ``report`` is a string.

    Args:
        path: the datalist JSON file.
        dataset_dir: the folder its relative paths start from (absolute paths are kept).
        split: the list to read, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        class_table: the classes; default :meth:`ClassTable.default`.

    Returns:
        Copies of the entries with ``image``, ``mask`` and ``dictation`` joined to ``dataset_dir`` (strings) and, for
        tumour classes, ``box`` as 4 floats (the mask's tight box when the entry gave none).

    Raises:
        FileNotFoundError: when the datalist file does not exist.
        DataError: when the file is not JSON, has no list ``split`` or the list is empty, or with one line
            ``[index] <image>: key 'k' (value): reason`` per problem of every bad entry, all at once.
    """
    path, dataset_dir = Path(path), Path(dataset_dir)
    table = class_table if class_table is not None else ClassTable.default()
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist {path} is not valid JSON: {err}") from err
    entries = content.get(split) if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        present = sorted(k for k, v in content.items() if isinstance(v, list)) if isinstance(content, dict) else []
        raise DataError(f"datalist {path} has no non-empty list {split!r} (lists present: {present})")
    lines, resolved = [], []
    for index, entry in enumerate(entries):
        problems, out = _entry_problems(entry, dataset_dir, table)
        image = out.get("image", "<no image>")
        lines += [f"  [{index}] {image}: {problem}" for problem in problems]
        resolved.append(out)
    if lines:
        raise DataError("\n".join([f"datalist {path}, list {split!r}: {len(lines)} problems", *lines]))
    return resolved


class EmbeddingSegmenter(Protocol):
    """What the cache needs of a segmenter: a name that identifies its encoder and preprocessing, and ``embed``."""

    name: str

    def embed(self, image: np.ndarray) -> Any:
        """The image embedding of an (H, W) uint8 image; it has ``to_dict()`` (tensors, numbers, strings only)."""
        ...


class EmbeddingCache:
    """A segmenter's image embeddings, computed once per image and kept on disk.

    One file per image and segmenter: ``folder/<segmenter name>/<sha256 of the image file>.pt``, holding the
    segmenter name, the image hash and ``embedding.to_dict()``. Keying by content means that a changed image is
    embedded again and that a renamed or copied one is not. Files are written atomically and loaded with
    ``torch.load(..., weights_only=True)``; an unreadable or foreign file is logged, embedded again and
    replaced.

    Args:
        segmenter: has ``name`` (which must change whenever its weights or preprocessing change) and
            ``embed(image (H, W) uint8) -> embedding``.
        folder: the cache folder (created when needed).
        embedding_type: the class whose ``from_dict`` rebuilds a stored embedding; default
            :class:`dae.logsam.segmenters.ImageEmbedding`.

    Attributes:
        hits: embeddings read from disk so far.
        misses: embeddings computed so far.
    """

    def __init__(self, segmenter: EmbeddingSegmenter, folder: str | Path, embedding_type: type | None = None) -> None:
        if embedding_type is None:
            from dae.logsam.segmenters import ImageEmbedding

            embedding_type = ImageEmbedding
        if not getattr(segmenter, "name", ""):
            raise ValueError(f"segmenter {segmenter!r} has no name to key its cached embeddings by")
        self.segmenter = segmenter
        self.folder = Path(folder) / _UNSAFE_NAME.sub("_", segmenter.name)
        self.embedding_type = embedding_type
        self.hits = 0
        self.misses = 0

    def path_for(self, image_path: str | Path) -> Path:
        """The cache file of an image (whether it exists or not)."""
        return self.folder / f"{_file_sha256(image_path)}.pt"

    def get(self, image_path: str | Path) -> Any:
        """The embedding of the image file ``image_path``: from the cache, else computed with the segmenter and stored.

        Raises:
            FileNotFoundError / DataError: from :func:`read_grey` when the image cannot be read.
        """
        digest = _file_sha256(image_path)
        target = self.folder / f"{digest}.pt"
        if target.is_file():
            stored = self._read(target)
            if stored is not None and stored.get("segmenter") == self.segmenter.name and stored.get("image") == digest:
                self.hits += 1
                return self.embedding_type.from_dict(stored["embedding"])
            logger.warning(
                "cached embedding %s does not belong to %s / %s: embedding again", target, image_path, digest
            )
        embedding = self.segmenter.embed(read_grey(image_path))
        save_checkpoint({"segmenter": self.segmenter.name, "image": digest, "embedding": embedding.to_dict()}, target)
        self.misses += 1
        return embedding

    @staticmethod
    def _read(target: Path) -> dict[str, Any] | None:
        try:
            return load_checkpoint(target)
        except CheckpointError as err:
            logger.warning("cached embedding %s cannot be read (%s): embedding again", target, err)
            return None


def _file_sha256(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
