"""Decode one datalist entry completely and describe it: the worker side of :mod:`dae.data.deep_check`.

:func:`inspect_entry` uses only NumPy, nibabel, SimpleITK and PIL (no torch operations), so that it runs in
forked worker processes, and returns plain JSON-ready values, so that its results can be cached.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import inv_ornt_aff, io_orientation

from dae.data.readers import SimpleITKReader
from dae.data.xray import read_xray

__all__ = ["inspect_entry"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PERCENTILES = (1.0, 50.0, 99.0)
_GRID_TOLERANCE = 0.01  # label and image grid corners may differ by this fraction of the smallest voxel edge
_SPACING_TOLERANCE = 1e-3  # relative, for X-ray pixel spacings
_CHUNK = 1 << 22  # voxels per step of the label value scan (bounded temporary memory)
_BINCOUNT_LIMIT = 1 << 16  # above this largest id, distinct values are found by sorting
_MAX_LABEL_VALUES = 1000


def inspect_entry(image: str, label: str | None, xray: bool) -> dict[str, Any]:
    """Decode an entry's image (and label image) completely and check them.

    Image checks: it decodes to its end (a truncated file fails), has 3 spatial axes with at most one channel
    (a 2D image for X-rays, read with :func:`~dae.data.read_xray`), holds only finite values and is not constant.
    Label checks: it decodes, has the image's shape and grid (3D: the same voxel-to-world map, up to axis flips
    and permutations, within 1 % of a voxel; X-rays: the same pixel spacing where both give one) and holds
    integer values >= 0.

    Args:
        image: the image file or DICOM series folder.
        label: the label image, or None.
        xray: read both as 2D X-rays instead of 3D volumes.

    Returns:
        ``{"problems": [...], "stats": ..., "label_values": ...}``: the problems found (empty when the entry is
        fine); ``stats`` (None when the image is unusable) holds the image's ``min``, ``p1``, ``median``, ``p99``,
        ``max``, ``spacing`` (mm per axis, None where unknown) and ``shape``; ``label_values`` the label's sorted
        distinct values (None without a usable label).
    """
    result: dict[str, Any] = {"problems": [], "stats": None, "label_values": None}
    try:
        array, affine, spacing = _decode(image, xray)
    except Exception as e:  # every reader failure means the image is unusable
        result["problems"].append(f"cannot decode image ({_describe(e)})")
        return result
    problem = _layout_problem(array, xray) or _value_problem(array)
    if problem:
        result["problems"].append(problem)
        return result
    low, p1, median, p99, high = (float(v) for v in (array.min(), *np.percentile(array, _PERCENTILES), array.max()))
    result["stats"] = {
        "min": low,
        "p1": p1,
        "median": median,
        "p99": p99,
        "max": high,
        "spacing": [None if math.isnan(s) else s for s in spacing],
        "shape": list(array.shape[: 2 if xray else 3]),
    }
    if label is not None:
        problem, values = _check_label(label, xray, array.shape, affine, spacing)
        if problem:
            result["problems"].append(problem)
        result["label_values"] = values
    return result


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _decode(path: str, xray: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """The whole array, its voxel-to-RAS affine (None for X-rays) and its spacing."""
    if xray:
        array, meta = read_xray(path)
        return array, None, tuple(float(s) for s in meta["spacing"])
    if not Path(path).is_dir() and path.lower().endswith(_NIFTI_SUFFIXES):
        nifti = nib.load(path)
        array, affine = np.asanyarray(nifti.dataobj), nifti.affine  # dataobj reads and decompresses the whole body
    else:
        reader = SimpleITKReader()
        itk_image = reader.read(path) if Path(path).is_dir() else sitk.ReadImage(path)
        array, meta = reader.get_data(itk_image)
        affine = meta["affine"]
    return array, affine, tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def _layout_problem(array: np.ndarray, xray: bool) -> str | None:
    if xray:
        return None if array.ndim == 2 and min(array.shape) > 1 else f"not a 2D image: shape {array.shape}"
    if array.ndim < 3 or min(array.shape[:3]) <= 1:
        return f"not a 3D volume: shape {array.shape}"
    channels = math.prod(array.shape[3:])
    return None if channels == 1 else f"{channels} channels (shape {array.shape}); expected one"


def _value_problem(array: np.ndarray) -> str | None:
    if array.dtype.kind not in "iuf":
        return f"voxel type {array.dtype} is not a real-valued intensity"
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"{bad} of {array.size} voxels are not finite (NaN or Inf)"
    low, high = array.min(), array.max()
    return f"constant image (every voxel is {float(low):g})" if low == high else None


def _check_label(
    path: str, xray: bool, shape: tuple[int, ...], affine: np.ndarray | None, spacing: tuple[float, ...]
) -> tuple[str | None, list[int] | None]:
    try:
        label, label_affine, label_spacing = _decode(path, xray)
    except Exception as e:  # every reader failure means the label is unusable
        return f"cannot decode label {path} ({_describe(e)})", None
    layout = _layout_problem(label, xray)
    if layout:
        return f"label {path}: {layout}", None
    if xray:
        problem = _xray_grid_problem(label.shape, shape, label_spacing, spacing)
    else:
        problem = _grid_problem(label_affine, label.shape[:3], affine, shape[:3])
    if problem:
        return problem, None
    values, problem = _label_values(label)
    return (f"label {path}: {problem}", None) if problem else (None, values)


def _xray_grid_problem(
    shape: tuple[int, ...], image_shape: tuple[int, ...], spacing: tuple[float, ...], image_spacing: tuple[float, ...]
) -> str | None:
    if tuple(shape) != tuple(image_shape):
        return f"label shape {tuple(shape)} differs from image shape {tuple(image_shape)}"
    known = [(a, b) for a, b in zip(spacing, image_spacing) if not (math.isnan(a) or math.isnan(b))]
    if any(not math.isclose(a, b, rel_tol=_SPACING_TOLERANCE) for a, b in known):
        return f"label pixel spacing {spacing} differs from image spacing {image_spacing}"
    return None


def _canonical(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape after reorienting to the closest RAS axes, as Orientationd does before training."""
    orientation = io_orientation(affine)
    canonical_shape = [0] * 3
    for axis, (new_axis, _) in enumerate(orientation):
        canonical_shape[int(new_axis)] = shape[axis]
    return affine @ inv_ornt_aff(orientation, shape), tuple(canonical_shape)


def _grid_problem(
    affine: np.ndarray, shape: tuple[int, ...], image_affine: np.ndarray, image_shape: tuple[int, ...]
) -> str | None:
    canonical, canonical_shape = _canonical(affine, shape)
    image_canonical, image_canonical_shape = _canonical(image_affine, image_shape)
    if canonical_shape != image_canonical_shape:
        return f"label shape {tuple(shape)} differs from image shape {tuple(image_shape)}"
    corners = np.array([[*c, 1.0] for c in itertools.product(*((0, n - 1) for n in canonical_shape))]).T
    distance = float(np.linalg.norm((canonical - image_canonical) @ corners, axis=0).max())
    voxel = float(np.linalg.norm(image_canonical[:3, :3], axis=0).min())
    if distance <= _GRID_TOLERANCE * voxel:
        return None

    def fmt(values: np.ndarray) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    return (
        f"label grid differs from the image's by up to {distance:.3g} mm: spacing "
        f"{fmt(np.linalg.norm(canonical[:3, :3], axis=0))} vs {fmt(np.linalg.norm(image_canonical[:3, :3], axis=0))}, "
        f"origin {fmt(canonical[:3, 3])} vs {fmt(image_canonical[:3, 3])} (RAS, mm)"
    )


def _label_values(label: np.ndarray) -> tuple[list[int] | None, str | None]:
    """The sorted distinct values of a label array, or the reason they are not class ids."""
    if label.dtype.kind not in "biuf":
        return None, f"dtype {label.dtype} cannot hold class ids"
    flat = label.ravel(order="K")
    values: set[int] = set()
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if chunk.dtype.kind == "f":
            if not np.isfinite(chunk).all():
                return None, "values are not finite (NaN or Inf)"
            fractional = chunk[chunk != np.round(chunk)]
            if fractional.size:
                return None, f"values must be integers, found {float(fractional[0]):g}"
        ints = chunk.astype(np.int64)
        low, high = int(ints.min()), int(ints.max())
        if low < 0:
            return None, f"values must be >= 0, found {low}"
        found = np.flatnonzero(np.bincount(ints)) if high < _BINCOUNT_LIMIT else np.unique(ints)
        values.update(found.tolist())
        if len(values) > _MAX_LABEL_VALUES:
            return None, f"more than {_MAX_LABEL_VALUES} distinct values: an intensity image, not a label?"
    return sorted(values), None
