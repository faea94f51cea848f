"""2D X-ray files: a reader for PNG, JPEG, TIFF, DICOM and other SimpleITK formats, its MONAI transform, and datalists.

:func:`read_xray` returns the stored values of one radiograph as a 2-D float32 array (rows, columns) plus its
metadata; :class:`LoadXRayd` wraps it for MONAI pipelines. :func:`make_xray_datalist` finds the images of a folder,
attaches the class labels (and any other column) of a CSV file, or classes named by folders, and splits them into
training, validation and test lists with no patient in two lists, stratified by label; or it keeps the dataset's
split folders (:mod:`dae.data.xray_layouts`), or writes a test-only list.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from dae.data.xray_layouts import classes_from_folders as folder_classes
from dae.data.xray_layouts import splits_from_folders

__all__ = ["XRAY_EXTENSIONS", "LoadXRayd", "make_xray_datalist", "read_xray"]

XRAY_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "tif", "tiff", "dcm")
"""File extensions :func:`make_xray_datalist` looks for by default."""

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights PIL uses for "L"
_SITK_FORMATS = {"GDCMImageIO": "DICOM", "MetaImageIO": "MetaImage", "NrrdImageIO": "NRRD", "NiftiImageIO": "NIfTI"}
_DICOM_SPACING_TAGS = ("0028|0030", "0018|1164", "0018|2010")  # pixel, imager pixel, nominal scanned pixel spacing
_RESERVED_KEYS = ("image", "label", "modality", "tags")
_SPLIT_KEYS = ("training", "validation", "test")


def read_xray(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one 2D radiograph as a float32 array of its stored values, with its metadata.

    PNG, JPEG, TIFF and BMP files are read with PIL: 8-bit and 16-bit greyscale, 32-bit float TIFF, and colour
    images, which become one channel (any channel if the three are equal, else the BT.601 luminance
    ``0.299 R + 0.587 G + 0.114 B`` with a warning). Other files (DICOM, MetaImage, NRRD, ...) are read with
    SimpleITK, which applies a DICOM's rescale slope and intercept. A MONOCHROME1 DICOM (minimum shown as white) is
    inverted to MONOCHROME2 within its nominal value range, so that high values are always shown bright: bone is
    bright in display images, unattenuated air in raw detector images. No VOI windowing or LUT is applied.

    Args:
        path: the image file.

    Returns:
        ``(array, meta)``: the array has shape (rows, columns), i.e. (H, W) as displayed (MONAI's ``LoadImage``
        would give the transpose for PNG/JPEG). ``meta`` holds ``filename_or_obj``; ``format`` (``"PNG"``,
        ``"JPEG"``, ``"TIFF"``, ``"DICOM"``, ``"MetaImage"``, ...); ``bit_depth`` (bits stored per value; 32 for
        float data); ``max_value`` (largest storable value after rescaling, e.g. 255 or 65535; NaN for float data);
        ``photometric_interpretation`` as stored (``"MONOCHROME1"``, ``"MONOCHROME2"``, ``"RGB"``); ``inverted``
        (whether the values were inverted from MONOCHROME1); and ``spacing`` (row and column pixel spacing in mm,
        NaN where the file does not give it). Unknown values are NaN rather than None so that batches collate.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read, is a 3-D volume or multi-frame file, or has an unsupported number of
            channels; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"X-ray file '{path}' does not exist.")
    try:
        if path.suffix.lower() in _PIL_SUFFIXES:
            array, meta = _read_pil(path)
        else:
            array, meta = _read_sitk(path)
    except ValueError:
        raise
    except Exception as e:  # reader libraries raise many types for corrupt or unsupported files
        raise ValueError(f"Cannot read X-ray '{path}': {type(e).__name__}: {' '.join(str(e).split())}") from e
    return np.ascontiguousarray(array, dtype=np.float32), {"filename_or_obj": str(path), **meta}


def _read_pil(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with Image.open(path) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise ValueError(f"X-ray '{path}' has {frames} frames; read_xray reads single 2-D images.")
        mode, fmt = image.mode, image.format or path.suffix.lstrip(".").upper()
        photometric = "MONOCHROME2"
        if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
            array = np.asarray(image)
        elif mode == "LA":
            array = np.asarray(image)[..., 0]
        else:
            photometric = "RGB"
            array = _to_grey(np.asarray(image.convert("RGB")), path)
    if mode == "1":
        bits = 1
    elif mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):  # older Pillow opens 16-bit PNGs as "I"
        bits = 16
    elif mode in ("I", "F"):
        bits = 32
    else:
        bits = 8
    meta = {
        "format": fmt,
        "bit_depth": bits,
        "max_value": math.nan if mode == "F" else float(2**bits - 1),
        "photometric_interpretation": photometric,
        "inverted": False,
        "spacing": (math.nan, math.nan),
    }
    return array, meta


def _to_grey(rgb: np.ndarray, path: Path) -> np.ndarray:
    r, g, b = (rgb[..., i] for i in range(3))
    if np.array_equal(r, g) and np.array_equal(r, b):
        return r
    warnings.warn(
        f"X-ray '{path}' is a colour image with unequal channels; using its luminance 0.299 R + 0.587 G + 0.114 B.",
        stacklevel=3,
    )
    return sum(w * c.astype(np.float32) for w, c in zip(_LUMA, (r, g, b)))


def _read_sitk(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    io_name = reader.GetImageIOFromFileName(str(path))
    size = reader.GetSize()
    if len(size) < 2 or any(s > 1 for s in size[2:]):
        raise ValueError(f"X-ray '{path}' has size {size}: a 3-D volume or multi-frame file, not a 2-D image.")
    components = reader.GetNumberOfComponents()
    if components not in (1, 3, 4):
        raise ValueError(f"X-ray '{path}' has {components} components per pixel; expected 1, 3 (RGB) or 4 (RGBA).")
    tags = {k: reader.GetMetaData(k).strip() for k in reader.GetMetaDataKeys() if k.startswith(("0028|", "0018|"))}
    is_dicom = io_name == "GDCMImageIO"
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).reshape(size[1], size[0], components)
    dtype = array.dtype
    photometric = tags.get("0028|0004", "RGB" if components > 1 else "MONOCHROME2")
    array = array[..., 0] if components == 1 else _to_grey(array, path)
    if is_dicom:
        slope, intercept = float(tags.get("0028|1053") or 1.0), float(tags.get("0028|1052") or 0.0)
        bits = int(tags.get("0028|0101") or dtype.itemsize * 8)
        signed = tags.get("0028|0103", "0") == "1"
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = sorted((slope * lo + intercept, slope * hi + intercept))
        has_spacing = any(k in tags for k in _DICOM_SPACING_TAGS)
    else:
        bits = dtype.itemsize * 8
        lo, hi = (math.nan, math.nan) if dtype.kind == "f" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        has_spacing = True
    inverted = photometric == "MONOCHROME1"
    if inverted and not _sitk_inverts_monochrome1():
        array = (lo + hi) - array.astype(np.float64)
    spacing = image.GetSpacing()
    meta = {
        "format": _SITK_FORMATS.get(io_name, io_name.removesuffix("ImageIO")),
        "bit_depth": bits,
        "max_value": float(hi),
        "photometric_interpretation": photometric,
        "inverted": inverted,
        "spacing": (float(spacing[1]), float(spacing[0])) if has_spacing else (math.nan, math.nan),
    }
    return array, meta


@functools.cache
def _sitk_inverts_monochrome1() -> bool:
    """Whether SimpleITK's DICOM reader already turns MONOCHROME1 pixels into MONOCHROME2 (recent ITK does).

    Found out once per process by reading back a tiny MONOCHROME1 file (SimpleITK writes only MONOCHROME2, so the
    tag is patched in the written bytes; both values have the same length).
    """
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.dcm"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2), dtype=np.uint16)), str(probe))
        probe.write_bytes(probe.read_bytes().replace(b"MONOCHROME2 ", b"MONOCHROME1 ", 1))
        return bool(sitk.GetArrayViewFromImage(sitk.ReadImage(str(probe))).max() > 0)


class LoadXRayd(MapTransform):
    """Load 2D X-rays with :func:`read_xray` as ``[1, H, W]`` float32 MetaTensors carrying its metadata.

    Args:
        keys: keys holding the file paths.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each path by its image."""
        d = dict(data)
        for key in self.key_iterator(d):
            array, meta = read_xray(d[key])
            d[key] = MetaTensor(torch.from_numpy(array)[None], meta=meta)
        return d


def make_xray_datalist(
    folder: str | Path,
    output: str | Path,
    labels: str | Path | None = None,
    label_column: str | None = "label",
    group_column: str | None = "patient",
    path_column: str = "path",
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    extensions: Sequence[str] = XRAY_EXTENSIONS,
    data_root: str | Path | None = None,
    modality: str = "XR",
    name: str | None = None,
    classes_from_folders: bool = False,
    keep_splits: bool = False,
    test_only: bool = False,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a datalist of the X-rays under ``folder``, split by group (patient) and stratified by label.

    Images are found recursively (hidden files and folders skipped) and sorted by path. With a ``labels`` CSV,
    each image must have exactly one row, whose ``path_column`` gives the image's path relative to ``folder``;
    the ``label_column`` becomes the entry's integer ``label`` (the class index; the names are stored in the
    top-level ``labels`` map, e.g. ``{"0": "NORMAL", "1": "PNEUMONIA"}``; integer labels are kept as they are)
    and every other column is copied as a string. With ``classes_from_folders`` instead, an image's class is the
    name of its parent folder (``PNEUMONIA/img1.png``) and the sorted class names get the labels 0..K-1.

    By default the images are split anew: images of the same ``group_column`` value stay in one list; within each
    label stratum (a group's most common label), groups are shuffled with ``seed`` and, largest first, each is
    given to the list with the most images still missing from its target fraction. With ``keep_splits`` the
    dataset's own split is kept: each image goes to the list named by a folder of its path (``train``/``training``,
    ``valid``/``val``/``validation``/``dev``, ``test``/``testing``, in any case); if there are training folders
    but no validation folder, ``val_fraction`` of the training images are drawn as validation by the same grouped,
    stratified split. With ``test_only`` every image goes to the ``test`` list, e.g. an external test set scored
    with a model trained on another datalist (compare the two ``labels`` maps).

    The file is a MONAI ``dataset_0.json``-style JSON (``description``, ``labels``, ``modality``, ``name``,
    ``numTraining``, ``tensorImageSize`` ``"2D"``, ``training``, ``validation``, ``test``; empty lists are
    omitted) readable by :func:`dae.data.load_datalist` with ``data_root``. Entries are ``{"image", "modality",
    "label", <other columns>}``.

    Args:
        folder: the image folder.
        output: the JSON file to write (its folder is created).
        labels: CSV file with one row per image; None: no CSV, every image its own group.
        label_column: CSV column of the class; None or ``""``: no labels (the CSV only groups and annotates).
        group_column: CSV column of the group (patient) id; None or ``""``: every image is its own group.
        path_column: CSV column of the image path relative to ``folder``.
        val_fraction: fraction of the images for ``validation`` (with ``keep_splits``: of the training images, if
            drawn); None: 0.15. Ignored with ``test_only``, and with ``keep_splits`` unless validation is drawn.
        test_fraction: fraction of the images for ``test``; None: 0.15. Ignored with ``keep_splits`` or
            ``test_only``.
        seed: seed of the group shuffle.
        extensions: file extensions of the images (case-insensitive, with or without the dot).
        data_root: folder the written paths are relative to (they may start with ``..``); defaults to the
            output file's folder. Pass the same folder as ``data_root`` to :func:`dae.data.load_datalist`.
        modality: modality tag of every entry (``XR``, ``DX`` or ``CR`` for :func:`dae.data.load_datalist`).
        name: dataset name; defaults to the folder's name.
        classes_from_folders: each image's class is the name of its parent folder (not with ``labels``).
        keep_splits: keep the lists given by the split folders instead of splitting anew (not with ``test_only``).
        test_only: write every image to the ``test`` list.
        note: called with one sentence for each choice the caller should hear of: validation drawn from the
            training folders, fractions given but not used.

    Returns:
        The written content.

    Raises:
        ValueError: bad fractions or options; the folder is missing or holds no image; images outside split or
            class folders; or the CSV lacks a column, has a column named like a datalist key, rows naming no
            image, duplicate or empty values, or misses images (all problems listed, with the files named).
    """
    folder, output = Path(folder), Path(output)
    _check_options(labels, classes_from_folders, keep_splits, test_only)
    fractions = _fractions(val_fraction, test_fraction, keep_splits, test_only)
    note = note or (lambda _: None)
    images = _find_images(folder, extensions)
    use_labels = labels is not None and bool(label_column)
    use_groups = labels is not None and bool(group_column)
    columns, rows = [], {}
    if labels is not None:
        required = [path_column] + [c for c in (label_column, group_column) if c]
        columns, rows = _read_label_rows(Path(labels), images, folder, required)
    extra = [c for c in columns if c not in (path_column, label_column)]
    clashes = [c for c in extra if c in _RESERVED_KEYS]
    if clashes:
        raise ValueError(
            f"Labels file '{labels}': columns {clashes} would overwrite datalist keys {list(_RESERVED_KEYS)}; "
            "choose the class column with label_column (--label-column) or rename them."
        )
    class_of, class_names = _classes(
        images, folder, rows, label_column if use_labels else None, classes_from_folders, keep_splits
    )
    class_index = {n: int(i) for i, n in class_names.items()}
    root = Path(data_root) if data_root is not None else output.parent
    entries, groups = [], []
    for key, path in images.items():
        row = rows.get(key, {})
        entry: dict[str, Any] = {"image": Path(os.path.relpath(path.absolute(), root.absolute())).as_posix()}
        entry["modality"] = modality
        if class_of:
            entry["label"] = class_index[class_of[key]]
        entry |= {c: row.get(c) or "" for c in extra}
        entries.append(entry)
        groups.append(row[group_column] if use_groups else key)
    strata = [class_of.get(key, "") for key in images]
    by = f"by {group_column!r}" if use_groups else "by image"
    by += f", stratified by {label_column!r}" if use_labels else ", stratified by class folder" if class_of else ""
    if test_only:
        index, how, used = [2] * len(entries), "test only: every image in the test list", ()
    elif keep_splits:
        index, how, used = _kept_splits(images, folder, groups, strata, fractions[1], seed, by, note)
    else:
        assignment = _split_groups(groups, strata, fractions, seed)
        index, used = [assignment[g] for g in groups], ("val_fraction", "test_fraction")
        how = f"split {'/'.join(f'{f:g}' for f in fractions)} {by}, seed {seed}"
    _note_unused(note, {"val_fraction": val_fraction, "test_fraction": test_fraction}, used, how)
    splits = {k: [e for e, i in zip(entries, index) if i == n] for n, k in enumerate(_SPLIT_KEYS)}
    name = name or folder.absolute().name
    root_from_output = Path(os.path.relpath(root.absolute(), output.parent.absolute())).as_posix()
    description = (
        f"{name}: {len(entries)} X-rays from {folder.as_posix()}, {how} (dae.cli make-xray-datalist); "
        f"paths are relative to {root_from_output!r} as seen from this file's folder."
    )
    content: dict[str, Any] = {"description": description}
    if class_of:
        content["labels"] = class_names
    content |= {"modality": {"0": modality}, "name": name, "numTraining": len(splits["training"])}
    content["tensorImageSize"] = "2D"
    content |= {k: v for k, v in splits.items() if v}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(content, indent=4) + "\n")
    return content


def _check_options(labels: str | Path | None, classes_from_folders: bool, keep_splits: bool, test_only: bool) -> None:
    if labels is not None and classes_from_folders:
        raise ValueError(
            f"Classes come either from the labels file '{labels}' or from the folder names (classes_from_folders, "
            "--classes-from-folders), not both."
        )
    if keep_splits and test_only:
        raise ValueError(
            "keep_splits (--keep-splits) and test_only (--test-only) exclude each other: one keeps the split "
            "folders' lists, the other puts every image in the test list."
        )


def _fractions(
    val_fraction: float | None, test_fraction: float | None, keep_splits: bool, test_only: bool
) -> tuple[float, float, float]:
    """The (training, validation, test) fractions of a new split, None given as 0.15; checked where used."""
    val = 0.15 if val_fraction is None else val_fraction
    test = 0.15 if test_fraction is None else test_fraction
    if keep_splits and not 0 <= val < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val}.")
    if not (keep_splits or test_only or (val >= 0 and test >= 0 and val + test < 1)):
        raise ValueError(f"val_fraction and test_fraction must be >= 0 with a sum below 1, got {val} and {test}.")
    return 1.0 - val - test, val, test


def _classes(
    images: Mapping[str, Path],
    folder: Path,
    rows: Mapping[str, Mapping[str, str]],
    label_column: str | None,
    from_folders: bool,
    split_folders: bool,
) -> tuple[dict[str, str], dict[str, str]]:
    """The class name of every image (from the CSV's ``label_column`` or the folders) and the ``labels`` map."""
    if label_column:
        class_of = {k: rows[k][label_column] for k in images}
        return class_of, _class_map(list(class_of.values()))[0]
    if from_folders:
        class_of = folder_classes(images, folder, split_folders)
        return class_of, {str(i): n for i, n in enumerate(sorted(set(class_of.values())))}
    return {}, {}


def _kept_splits(
    images: Mapping[str, Path],
    folder: Path,
    groups: Sequence[str],
    strata: Sequence[str],
    val_fraction: float,
    seed: int,
    by: str,
    note: Callable[[str], None],
) -> tuple[list[int], str, tuple[str, ...]]:
    """The list index of every image from its split folder, how, and the fractions used.

    Without a validation folder, ``val_fraction`` of the training images (if any) are drawn as validation.
    """
    index = [_SPLIT_KEYS.index(s) for s in splits_from_folders(images, folder).values()]
    if 0 not in index or 1 in index:
        return index, "lists kept from its split folders", ()
    training = [i for i, k in enumerate(index) if k == 0]
    fractions = (1.0 - val_fraction, val_fraction, 0.0)
    assignment = _split_groups([groups[i] for i in training], [strata[i] for i in training], fractions, seed)
    for i in training:
        index[i] = assignment[groups[i]]
    drawn = f"{val_fraction:g} of the training images {by}, seed {seed}"
    note(f"No validation folder under '{folder}': validation drawn from training ({drawn}).")
    return index, f"lists kept from its split folders, validation drawn from training ({drawn})", ("val_fraction",)


def _note_unused(note: Callable[[str], None], given: Mapping[str, float | None], used: Sequence[str], how: str) -> None:
    """Tell ``note`` of the fractions given (not None) but not used by this datalist."""
    unused = [n for n, v in given.items() if v is not None and n not in used]
    if unused:
        options = ", ".join("--" + n.replace("_", "-") for n in unused)
        note(f"{' and '.join(unused)} ({options}) not used ({how}).")


def _find_images(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Images under ``folder`` by their relative POSIX path, sorted."""
    if not folder.is_dir():
        raise ValueError(f"Image folder '{folder}' does not exist.")
    suffixes = {"." + e.lower().lstrip(".") for e in extensions}
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and path.suffix.lower() in suffixes and not any(p.startswith(".") for p in relative.parts):
            found[relative.as_posix()] = path
    if not found:
        raise ValueError(f"No image with extension {sorted(suffixes)} under '{folder}'.")
    return dict(sorted(found.items()))


def _read_label_rows(
    labels: Path, images: Mapping[str, Path], folder: Path, required: Sequence[str]
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The CSV's columns and its rows by image key (relative POSIX path); every problem is listed in one error.

    ``required[0]`` is the path column; all ``required`` columns must exist and be non-empty in every row.
    """
    if not labels.is_file():
        raise ValueError(f"Labels file '{labels}' does not exist.")
    with labels.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing_columns = [c for c in required if c not in columns]
        if missing_columns:
            raise ValueError(f"Labels file '{labels}' has no column {missing_columns} (columns: {columns}).")
        path_column = required[0]
        rows: dict[str, dict[str, str]] = {}
        problems = []
        for line, row in enumerate(reader, start=2):
            key = Path(os.path.normpath(row[path_column] or ".")).as_posix()
            empty = [c for c in required if not row.get(c)]
            if empty:
                problems.append(f"  line {line}: empty {empty}")
            elif key in rows:
                problems.append(f"  line {line}: second row for {key}")
            elif key not in images:
                problems.append(f"  line {line}: no image {folder / key} (missing, or its extension is not searched)")
            else:
                rows[key] = row
    problems += [f"  image without a row: {images[k]}" for k in images if k not in rows]
    if problems:
        header = f"Labels file '{labels}' does not match the images under '{folder}' ({len(problems)} problems):"
        raise ValueError("\n".join([header, *problems]))
    return columns, rows


def _class_map(values: Sequence[str]) -> tuple[dict[str, str], dict[str, int]]:
    """The ``labels`` map (index to name) and each name's index; integer labels keep their value."""
    names = sorted(set(values))
    try:
        index = {v: int(v) for v in names}
    except ValueError:
        index = {v: i for i, v in enumerate(names)}
    return {str(i): v for v, i in sorted(index.items(), key=lambda item: item[1])}, index


def _split_groups(
    groups: Sequence[str], strata: Sequence[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, int]:
    """Split index (0 training, 1 validation, 2 test) of every group, balanced per stratum by image count."""
    sizes = Counter(groups)
    labels_of: dict[str, Counter] = {}
    for group, stratum in zip(groups, strata):
        labels_of.setdefault(group, Counter())[stratum] += 1
    # a group with mixed labels joins the stratum of its most common label (ties: the first name)
    stratum_of = {g: min(c, key=lambda s: (-c[s], s)) for g, c in labels_of.items()}
    rng = random.Random(seed)
    open_splits = [k for k, f in enumerate(fractions) if f > 0]
    assignment = {}
    for stratum in sorted(set(stratum_of.values())):
        members = sorted(g for g, s in stratum_of.items() if s == stratum)
        rng.shuffle(members)
        members.sort(key=lambda g: -sizes[g])  # stable: equal sizes keep the shuffled order
        missing = [f * sum(sizes[g] for g in members) for f in fractions]
        for group in members:
            k = max(open_splits, key=lambda i: missing[i])
            assignment[group] = k
            missing[k] -= sizes[group]
    return assignment
