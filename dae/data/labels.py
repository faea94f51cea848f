"""Class names of the fine-tuning tasks and label remapping (TotalSegmentator to BTCV, fetal atlas to FeTA).

BTCV (Synapse multi-organ CT) has 13 organs and FeTA (fetal brain MRI) 7 tissues, plus background 0. The
embedded demo labels use other id tables: TotalSegmentator (``data/ct/chest_ct/structures.csv`` and the
``"total"`` table of ``data/ct/totalseg/class_map_total_and_total_mr.json``) and the spina bifida fetal atlas;
the maps below bring them to the BTCV and FeTA ids.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.utils_pytorch_numpy_unification import clip, searchsorted, where
from monai.utils import convert_to_dst_type

__all__ = [
    "BTCV_CLASSES",
    "FETA_ATLAS_TO_FETA",
    "FETA_CLASSES",
    "TOTALSEGMENTATOR_BTCV_NAMES",
    "RemapLabelsd",
    "read_totalsegmentator_classes",
    "remap_labels",
    "totalsegmentator_to_btcv",
]

LabelT = TypeVar("LabelT", np.ndarray, torch.Tensor)

BTCV_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_veins",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
)
"""BTCV class names; the index is the label id."""

FETA_CLASSES: tuple[str, ...] = (
    "background",
    "external_csf",
    "grey_matter",
    "white_matter",
    "ventricles",
    "cerebellum",
    "deep_grey_matter",
    "brainstem",
)
"""FeTA class names; the index is the label id."""

TOTALSEGMENTATOR_BTCV_NAMES: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_vein_and_splenic_vein": 10,
    "pancreas": 11,
    "adrenal_gland_right": 12,
    "adrenal_gland_left": 13,
}
"""TotalSegmentator structure name to BTCV id, for the 13 BTCV organs."""

FETA_ATLAS_TO_FETA: dict[int, int] = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 7, 8: 3}
"""Spina bifida fetal atlas parcellation id (1 WM, 2 ventricles, 3 cerebellum, 4 extra-axial CSF, 5 cortical GM,
6 deep GM, 7 brainstem, 8 corpus callosum) to FeTA id; the corpus callosum becomes white matter."""


def read_totalsegmentator_classes(path: str | Path, task: str = "total") -> dict[int, str]:
    """Read a TotalSegmentator id table.

    Two formats are read: a CSV with columns ``id`` and ``structure`` (``data/ct/chest_ct/structures.csv``),
    and a JSON object either ``{"1": "spleen", ...}`` or holding such tables under task names
    (``class_map_total_and_total_mr.json``: ``"total"`` and ``"total_mr"``).

    Args:
        path: the ``.csv`` or ``.json`` file.
        task: which table of a JSON file holding several.

    Returns:
        Label id to structure name.

    Raises:
        ValueError: unknown file type, missing column or task, a non-integer or repeated id.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"id", "structure"} <= set(rows[0]):
            raise ValueError(f"TotalSegmentator table '{path}' needs the columns 'id' and 'structure'.")
        pairs = [(row["id"], row["structure"]) for row in rows]
    elif path.suffix.lower() == ".json":
        content = json.loads(path.read_text())
        if task in content and isinstance(content[task], Mapping):
            content = content[task]
        elif any(isinstance(v, Mapping) for v in content.values()):
            raise ValueError(f"TotalSegmentator table '{path}' has no task {task!r} (tasks: {sorted(content)}).")
        pairs = list(content.items())
    else:
        raise ValueError(f"TotalSegmentator table '{path}' must be a .csv or .json file.")
    classes: dict[int, str] = {}
    for raw_id, name in pairs:
        try:
            label = int(raw_id)
        except ValueError:
            raise ValueError(f"TotalSegmentator table '{path}': id {raw_id!r} is not an integer.") from None
        if label in classes:
            raise ValueError(f"TotalSegmentator table '{path}': id {label} is listed twice.")
        classes[label] = str(name).strip()
    return classes


def totalsegmentator_to_btcv(class_map: Mapping[int, str]) -> dict[int, int]:
    """Map TotalSegmentator ids to BTCV ids by structure name.

    The map is built from the names in :data:`TOTALSEGMENTATOR_BTCV_NAMES`, so it is right for any id table
    that uses the TotalSegmentator names (the v2 ``structures.csv`` and ``class_map_total_and_total_mr.json``
    ``"total"`` give the same ids for the 13 organs).

    Args:
        class_map: TotalSegmentator id to structure name, e.g. from :func:`read_totalsegmentator_classes`.

    Returns:
        Every id of ``class_map`` to its BTCV id: 1-13 for the BTCV organs, 0 for all other structures.

    Raises:
        ValueError: a BTCV organ is missing from ``class_map`` or named by two ids.
    """
    for name, btcv_id in TOTALSEGMENTATOR_BTCV_NAMES.items():
        ids = sorted(k for k, v in class_map.items() if v == name)
        if len(ids) != 1:
            raise ValueError(f"TotalSegmentator class map must name {name!r} (BTCV {btcv_id}) once, found ids {ids}.")
    return {int(k): TOTALSEGMENTATOR_BTCV_NAMES.get(name, 0) for k, name in class_map.items()}


def _lookup_table(mapping: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys and their values as int64 arrays; raises ValueError on negative or non-integer items."""
    for key, value in mapping.items():
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in (key, value)):
            raise ValueError(f"Label mapping items must be non-negative integers, got {key!r}: {value!r}.")
    keys = np.array(sorted(mapping), dtype=np.int64)
    return keys, np.array([mapping[k] for k in keys], dtype=np.int64)


def _output_dtype(label: np.ndarray | torch.Tensor, largest: int) -> np.dtype:
    """The label's integer dtype if it holds ``largest``, else the smallest of uint8, int16, int32, int64 that does."""
    dtype = np.dtype(str(label.dtype).replace("torch.", ""))
    if dtype.kind in "iu" and largest <= np.iinfo(dtype).max:
        return dtype
    return next(np.dtype(t) for t in (np.uint8, np.int16, np.int32, np.int64) if largest <= np.iinfo(t).max)


def remap_labels(label: LabelT, mapping: Mapping[int, int], default: int = 0) -> LabelT:
    """Replace every label id by ``mapping[id]``, and ids absent from ``mapping`` by ``default``.

    The lookup is vectorised (a binary search in the sorted keys), so large or sparse ids cost no memory.
    Float labels (as loaded by MONAI's ``LoadImage``) are accepted if their values are whole numbers.

    Args:
        label: a label volume (numpy array, tensor or MetaTensor).
        mapping: old id to new id (non-negative integers).
        default: new id of the ids absent from ``mapping``.

    Returns:
        The remapped labels, of the input's type (a MetaTensor keeps its metadata) and on its device, with the
        input's integer dtype if it holds the new ids, else the smallest of uint8, int16, int32, int64 that does.

    Raises:
        ValueError: the labels hold a negative, non-integer or non-finite value, or ``mapping`` or ``default``
            is not made of non-negative integers.
    """
    if isinstance(default, bool) or not isinstance(default, (int, np.integer)) or default < 0:
        raise ValueError(f"default must be a non-negative integer, got {default!r}.")
    keys, values = _lookup_table(mapping)
    ints = _as_int64(label.as_tensor() if isinstance(label, MetaTensor) else label)
    if len(keys) == 0:
        out = ints * 0 + default
    else:
        keys_t, values_t = convert_to_dst_type(keys, ints)[0], convert_to_dst_type(values, ints)[0]
        index = clip(searchsorted(keys_t, ints), 0, len(keys) - 1)
        out = where(keys_t[index] == ints, values_t[index], default)
    largest = max([default, *values.tolist()])
    return convert_to_dst_type(out, label, dtype=_output_dtype(label, largest))[0]


def _as_int64(data: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The labels as int64, checking that they are finite, whole and non-negative."""
    xp = torch if isinstance(data, torch.Tensor) else np
    floating = data.is_floating_point() if xp is torch else np.issubdtype(data.dtype, np.floating)
    if floating:
        if not xp.isfinite(data).all():
            raise ValueError("Labels must be integers, found a non-finite value (nan or inf).")
        fractional = data[data != xp.round(data)]
        if len(fractional):
            raise ValueError(f"Labels must be integers, found {float(fractional[0])}.")
    ints = data.to(torch.int64) if xp is torch else data.astype(np.int64)
    if len(ints.reshape(-1)) and ints.min() < 0:
        raise ValueError(f"Labels must be non-negative, found {int(ints.min())}.")
    return ints


class RemapLabelsd(MapTransform):
    """Dictionary transform applying :func:`remap_labels`, with one mapping or one per sample.

    With ``map_key`` set, ``mapping`` holds named mappings and each sample uses ``mapping[sample[map_key]]``,
    e.g. ``RemapLabelsd("label", {"totalsegmentator_v2": ts_to_btcv, "fetal_atlas": FETA_ATLAS_TO_FETA},
    map_key="id_table")`` for datalist entries carrying ``"id_table"``; a sample without ``map_key`` keeps its
    labels as they are (they are already the task's ids), so lists may mix both. MetaTensor metadata is kept and the
    output dtype is an integer one.

    Args:
        keys: label keys to remap.
        mapping: old id to new id, or (with ``map_key``) mapping name to such a mapping.
        default: new id of the ids absent from a mapping.
        map_key: sample key naming the mapping to use; None to use ``mapping`` for every sample. Avoid names
            that start with ``"<label key>_"`` (e.g. ``label_map``): MONAI's spatial transforms treat such
            keys as metadata dictionaries of that image.
        allow_missing_keys: do not raise if a label key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        mapping: Mapping[int, int] | Mapping[str, Mapping[int, int]] | None = None,
        default: int = 0,
        map_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mapping is None:
            raise ValueError("RemapLabelsd needs a mapping.")
        tables = mapping.values() if map_key is not None else [mapping]
        for table in tables:
            _lookup_table(table)  # fail at construction, not in a data-loader worker
        self.mapping = mapping
        self.default = default
        self.map_key = map_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Remap the labels of one sample.

        Raises:
            KeyError: with ``map_key``, the sample names an unknown mapping.
        """
        d = dict(data)
        mapping = self.mapping
        if self.map_key is not None:
            name = d.get(self.map_key)
            if name is None:
                return d
            if name not in self.mapping:
                raise KeyError(
                    f"Sample label map {name!r} (key '{self.map_key}') is not one of {sorted(self.mapping)}."
                )
            mapping = self.mapping[name]
        for key in self.key_iterator(d):
            d[key] = remap_labels(d[key], mapping, self.default)
        return d
