"""Decathlon-style datalists: loading, tag filtering, modality groups, header-only validation, cache sizing.

A datalist is a JSON file ``{"training": [...], "validation": [...]}`` whose entries hold ``image`` (a NIfTI,
NRRD or MetaImage file, or a DICOM series folder; for X-rays a 2D PNG, JPEG, TIFF or DICOM file; relative to a
data root or absolute), ``modality`` (``CT``, ``MR`` or a finer MR tag such as ``T1CE`` or ``FLAIR``, or ``XR``
for projection X-rays; case-insensitive), optional ``tags`` (a list of strings used to pick subsets) and any other
keys, which are kept. A string ``label`` is a label image (a path); an integer ``label`` is a class index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from dae.data.readers import find_dicom_series
from dae.errors import DataError
from dae.utils.sizes import format_bytes

__all__ = [
    "GROUP_NAMES",
    "MODALITY_GROUPS",
    "DatalistError",
    "ImageHeader",
    "estimate_cache_bytes",
    "format_bytes",
    "inference_entries",
    "label_problem",
    "load_datalist",
    "read_class_names",
    "read_image_header",
    "validate_datalist",
]

GROUP_NAMES: tuple[str, ...] = ("CT", "MR", "XR")
"""Modality groups; an entry's ``modality_label`` is its group's index in this tuple."""

MODALITY_GROUPS: dict[str, str] = {
    "CT": "CT",
    "MR": "MR",
    "T1": "MR",
    "T1CE": "MR",
    "T1C": "MR",
    "T1GD": "MR",
    "T2": "MR",
    "FLAIR": "MR",
    "PD": "MR",
    "DWI": "MR",
    "ADC": "MR",
    "SWI": "MR",
    "XR": "XR",
    "DX": "XR",
    "CR": "XR",
}
"""Default map from (upper-case) modality tag to modality group."""

_PATH_KEYS = ("image", "label")
_2D_GROUPS = ("XR",)
_LABEL_REQUIREMENTS = (False, True, "class", "image")
_MISSING_LABEL = {
    True: "no 'label'",
    "class": "no 'label' (an integer class index is required)",
    "image": "no 'label' (a label image path is required)",
}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DatalistError(DataError):
    """A datalist cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image read from its header.

    Attributes:
        shape: number of voxels per axis, as stored (x, y, z[, ...]).
        spacing: voxel size per axis in mm.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def is_3d(self) -> bool:
        """Three spatial axes of more than one voxel (a trailing 4th axis of size 1 is allowed)."""
        shape = self.shape[:3] if len(self.shape) == 4 and self.shape[3] == 1 else self.shape
        return len(shape) == 3 and min(shape) > 1

    @property
    def is_2d(self) -> bool:
        """Two axes of more than one pixel; further axes (a 2D DICOM's third) must have size 1."""
        return len(self.shape) >= 2 and min(self.shape[:2]) > 1 and all(s == 1 for s in self.shape[2:])


def read_image_header(path: str | Path) -> ImageHeader:
    """Read shape and spacing from an image header without loading the voxels.

    NIfTI files are read with nibabel, other files with SimpleITK's ``ReadImageInformation``, and a DICOM
    series folder gives the in-plane information of its first file, the slice count, and the slice spacing
    from the positions of its first and last files.

    Args:
        path: an image file or a DICOM series folder.

    Returns:
        The image's header geometry.

    Raises:
        ValueError: a folder holds no DICOM series.
        Exception: whatever nibabel or SimpleITK raise for an unreadable file.
    """
    path = Path(path)
    if path.is_dir():
        files = find_dicom_series(path)
        first, last = _sitk_info(files[0]), _sitk_info(files[-1])
        gap = float(np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())))
        z_spacing = gap / (len(files) - 1) if len(files) > 1 else first.GetSpacing()[2]
        return ImageHeader((*first.GetSize()[:2], len(files)), (*first.GetSpacing()[:2], z_spacing))
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        header = nib.load(path).header
        return ImageHeader(tuple(int(s) for s in header.get_data_shape()), tuple(float(z) for z in header.get_zooms()))
    info = _sitk_info(path)
    return ImageHeader(tuple(info.GetSize()), tuple(info.GetSpacing()))


def _sitk_info(path: str | Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def label_problem(entry: Mapping, require_label: bool | str) -> str | None:
    """Why an entry's ``label`` does not meet ``require_label``, or None.

    Args:
        entry: a datalist entry.
        require_label: False (no check), True (an integer class index >= 0 or a label image path), ``"class"``
            (an integer class index >= 0) or ``"image"`` (a label image path).

    Raises:
        ValueError: ``require_label`` is none of these.
    """
    if require_label not in _LABEL_REQUIREMENTS or not isinstance(require_label, (bool, str)):
        raise ValueError(f"require_label must be one of {_LABEL_REQUIREMENTS}, got {require_label!r}")
    if not require_label:
        return None
    label = entry.get("label")
    if label is None:
        return _MISSING_LABEL[require_label]
    is_class = isinstance(label, int) and not isinstance(label, bool)
    if require_label == "class" and not is_class:
        return f"'label' must be an integer class index, got {label!r}"
    if require_label == "image" and not isinstance(label, str):
        return f"'label' must be a label image path, got {label!r}"
    if not (is_class or isinstance(label, str)):
        return f"'label' must be an integer class index or a label image path, got {label!r}"
    return f"class 'label' must be >= 0, got {label}" if is_class and label < 0 else None


def _entry_problem(
    entry: object, groups: Mapping[str, str], check_files: bool, require_label: bool | str = False
) -> str | None:
    """The first problem of one entry, or None."""
    if not isinstance(entry, Mapping):
        return f"entry must be a JSON object, got {type(entry).__name__}"
    if "image" not in entry:
        return f"missing 'image' key (keys present: {sorted(entry)})"
    modality = entry.get("modality")
    if not isinstance(modality, str) or modality.upper() not in groups:
        return f"unknown modality {modality!r} (known: {', '.join(sorted(groups))})"
    tags = entry.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return f"'tags' must be a list of strings, got {tags!r}"
    label = label_problem(entry, require_label)
    if label is not None or not check_files:
        return label
    path = Path(entry["image"])
    if not path.exists():
        return "file or folder does not exist"
    try:
        header = read_image_header(path)
    except Exception as e:  # any reader failure means the image is unusable
        return f"unreadable header ({type(e).__name__}: {' '.join(str(e).split())})"
    if groups[modality.upper()] in _2D_GROUPS:
        if not header.is_2d:
            return f"not a 2D image: shape {header.shape}"
    elif not header.is_3d:
        return f"not a 3D volume: shape {header.shape}"
    if isinstance(entry.get("label"), str):
        label_path = Path(entry["label"])
        if not label_path.exists():
            return f"label {label_path} does not exist"
        try:
            label_header = read_image_header(label_path)
        except Exception as e:  # any reader failure means the label is unusable
            return f"label {label_path}: unreadable header ({type(e).__name__}: {' '.join(str(e).split())})"
        if tuple(label_header.shape[:3]) != tuple(header.shape[:3]):
            return f"label shape {label_header.shape[:3]} differs from image shape {header.shape[:3]}"
    return None


def validate_datalist(
    entries: Sequence[object],
    source: str = "<datalist>",
    modality_groups: Mapping[str, str] | None = None,
    check_files: bool = True,
    indices: Sequence[int] | None = None,
    require_label: bool | str = False,
) -> None:
    """Check every entry and raise one error listing all bad ones.

    Checks: the list is not empty; each entry is an object with an ``image`` key, a known ``modality``
    and ``tags`` (if any) given as a list of strings; and, with ``check_files``, that the image exists,
    its header can be read and it is a 3D volume (a 2D image for X-ray modalities), and that a string ``label``
    (a label image) exists and has the image's shape. Only headers are read. With ``require_label``, each entry
    must have a ``label`` of the required kind (see :func:`label_problem`).

    Args:
        entries: datalist entries, with ``image`` paths already resolved.
        source: name of the datalist (file and key) for the error message.
        modality_groups: modality tag to group map; defaults to :data:`MODALITY_GROUPS`.
        check_files: also check existence, readability and dimensionality of each image.
        indices: position of each entry in the source list, for the message (default ``0..n-1``).
        require_label: False, True (a class index or a label image), ``"class"`` or ``"image"``.

    Raises:
        DatalistError: with a header naming ``source`` and one ``  [index] <path>: <reason>`` line per bad entry.
    """
    if not entries:
        raise DatalistError(f"Datalist {source} is empty.")
    groups = {k.upper(): v for k, v in (modality_groups or MODALITY_GROUPS).items()}
    indices = range(len(entries)) if indices is None else indices
    lines = []
    for index, entry in zip(indices, entries):
        reason = _entry_problem(entry, groups, check_files, require_label)
        if reason is not None:
            path = entry.get("image", "<no image>") if isinstance(entry, Mapping) else "<no image>"
            lines.append(f"  [{index}] {path}: {reason}")
    if lines:
        header = f"Datalist {source}: {len(lines)} of {len(entries)} entries are invalid:"
        raise DatalistError("\n".join([header, *lines]))


def _read_entries(path: Path, key: str) -> list:
    if not path.is_file():
        raise DatalistError(f"Datalist file '{path}' does not exist.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(f"Datalist file '{path}' is not valid JSON: {e}") from e
    if not isinstance(content, dict) or key not in content:
        present = sorted(content) if isinstance(content, dict) else f"a JSON {type(content).__name__}, not an object"
        raise DatalistError(f"Datalist file '{path}' has no key '{key}' (keys present: {present}).")
    if not isinstance(content[key], list):
        raise DatalistError(f"Datalist file '{path}': '{key}' must be a list, got {type(content[key]).__name__}.")
    return content[key]


def _keep(entry: object, include: set[str] | None, exclude: set[str]) -> bool:
    """Tag filter; malformed entries are kept so that validation reports them."""
    tags = entry.get("tags", []) if isinstance(entry, Mapping) else None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return True
    return (include is None or bool(set(tags) & include)) and not set(tags) & exclude


def load_datalist(
    path: str | Path,
    key: str = "training",
    data_root: str | Path | None = None,
    include_tags: Iterable[str] | None = None,
    exclude_tags: Iterable[str] | None = None,
    modality_groups: Mapping[str, str] | None = None,
    validate: bool = True,
    default_modality: str | None = None,
    require_label: bool | str = False,
) -> list[dict]:
    """Load, filter and validate one list of a datalist JSON file.

    Args:
        path: the JSON file.
        key: which list to read (``"training"``, ``"validation"``, ...).
        data_root: folder that relative ``image``/``label`` paths are joined to; defaults to the current
            directory (not the JSON's folder), i.e. relative paths are left as they are.
        include_tags: keep only entries having at least one of these tags (None: no restriction).
        exclude_tags: drop entries having any of these tags.
        modality_groups: modality tag to group map; defaults to :data:`MODALITY_GROUPS`.
        validate: check that every kept image exists, has a readable header and is 3D (2D for X-ray
            modalities); entry structure and modalities are always checked.
        default_modality: modality of entries that have none, e.g. ``"CT"`` for MONAI-style fold files that
            state the modality once at the top; None requires a ``modality`` in every entry.
        require_label: require a ``label`` in every kept entry: True (an integer class index or a label image
            path), ``"class"`` (an integer class index, e.g. for classification probes) or ``"image"`` (a label
            image path); False accepts entries without one. Checked even when ``validate`` is False.

    Returns:
        The kept entries (copies) with resolved paths, ``modality`` in upper case, ``modality_group``
        (e.g. ``"CT"``) and ``modality_label`` (index of the group in :data:`GROUP_NAMES`).

    Raises:
        DatalistError: the file is missing or not JSON, ``key`` is missing, the list is empty (before or
            after tag filtering), or some entries are invalid or lack the required label (all listed in one
            message).
        ValueError: ``require_label`` is not one of False, True, ``"class"``, ``"image"``.
    """
    path = Path(path)
    source = f"'{path}' (key '{key}')"
    groups = {k.upper(): v for k, v in (modality_groups or MODALITY_GROUPS).items()}
    unknown_groups = sorted(set(groups.values()) - set(GROUP_NAMES))
    if unknown_groups:
        raise ValueError(f"modality_groups maps to unknown groups {unknown_groups}; groups are {GROUP_NAMES}.")
    raw = _read_entries(path, key)
    if not raw:
        raise DatalistError(f"Datalist {source} is empty.")
    include = None if include_tags is None else set(include_tags)
    exclude = set(exclude_tags or ())
    kept = [(i, dict(e) if isinstance(e, Mapping) else e) for i, e in enumerate(raw) if _keep(e, include, exclude)]
    if not kept:
        present = sorted({t for e in raw for t in e.get("tags", [])})  # malformed entries are never filtered out
        raise DatalistError(
            f"Datalist {source}: no entries left after tag filtering (include_tags={sorted(include or [])}, "
            f"exclude_tags={sorted(exclude)}); tags present: {present}."
        )
    root = Path(data_root) if data_root is not None else Path()
    for _, entry in kept:
        for k in _PATH_KEYS:
            if isinstance(entry, dict) and isinstance(entry.get(k), str):
                entry[k] = str(root / entry[k])  # an absolute entry path replaces the root
    entries = [e for _, e in kept]
    if default_modality is not None:
        for entry in entries:
            if isinstance(entry, dict):
                entry.setdefault("modality", default_modality)
    indices = [i for i, _ in kept]
    validate_datalist(entries, source, groups, check_files=validate, indices=indices, require_label=require_label)
    for entry in entries:
        entry["modality"] = entry["modality"].upper()
        entry["modality_group"] = groups[entry["modality"]]
        entry["modality_label"] = GROUP_NAMES.index(entry["modality_group"])
    return entries


def inference_entries(
    path: str | Path, key: str = "validation", data_root: str | Path | None = None, default_modality: str | None = None
) -> list[dict]:
    """The images of one list of a datalist, for inference: ``{"image", "modality_group"}`` per entry.

    Entries are loaded and validated as by :func:`load_datalist`; labels, tags and other keys are dropped, so
    that lists with and without labels give the same batches.
    """
    entries = load_datalist(path, key=key, data_root=data_root, default_modality=default_modality)
    return [{"image": e["image"], "modality_group": e["modality_group"]} for e in entries]


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a datalist's top-level ``labels`` map (``{"0": "NORMAL", "1": "PNEUMONIA"}``), in index order.

    Raises:
        DatalistError: when the file has no ``labels`` map or its keys are not the indices 0, 1, ... (naming the
            file and the keys found).
    """
    path = Path(path)
    content = json.loads(path.read_text())
    labels = content.get("labels") if isinstance(content, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise DatalistError(
            f"datalist {path} has no top-level 'labels' map of class index to name, e.g. "
            '{"labels": {"0": "NORMAL", "1": "PNEUMONIA"}}; python -m dae.cli make-xray-datalist writes one'
        )
    try:
        indices = sorted(int(key) for key in labels)
    except ValueError:
        indices = []
    if indices != list(range(len(labels))):
        raise DatalistError(f"datalist {path}: the 'labels' keys must be 0..{len(labels) - 1}, got {list(labels)}")
    return [str(labels[str(i)]) for i in indices]


def estimate_cache_bytes(
    entries: Sequence[Mapping | ImageHeader],
    target_spacing: Sequence[float] | float | None = None,
    bytes_per_voxel: int = 4,
    cache_rate: float = 1.0,
    pad_to: Sequence[int] | None = None,
) -> int:
    """Estimate the memory of cached volumes (resampled, before cropping) from their headers.

    Per volume, the voxel count is ``prod(round(shape * spacing / target_spacing))`` over the three
    spatial axes (``prod(shape)`` without ``target_spacing``), each axis at least ``pad_to`` when given. Like
    MONAI's ``CacheDataset``, only the first ``int(cache_rate * len(entries))`` entries are counted.

    Args:
        entries: datalist entries (their ``image`` header is read) or :class:`ImageHeader` objects.
        target_spacing: spacing in mm after resampling (one value for all axes, or three).
        bytes_per_voxel: bytes per cached voxel (4 for float32).
        cache_rate: fraction of the entries that is cached.
        pad_to: the size volumes are padded to (e.g. the crop size), per axis.

    Returns:
        The estimated number of bytes.
    """
    total = 0
    for entry in entries[: int(cache_rate * len(entries))]:
        header = entry if isinstance(entry, ImageHeader) else read_image_header(entry["image"])
        shape = np.asarray(header.shape[:3], dtype=np.float64)
        if target_spacing is not None:
            target = np.broadcast_to(np.asarray(target_spacing, dtype=np.float64), (3,))
            shape = np.maximum(np.round(shape * np.asarray(header.spacing[:3]) / target), 1)
        if pad_to is not None:
            shape = np.maximum(shape, np.asarray(pad_to, dtype=np.float64))
        total += math.prod(int(s) for s in shape) * bytes_per_voxel
    return total
