"""Segmentation metrics: the project's one Dice (and IoU), per case and class, from label maps; HD95 with misses.

The Dice definition, used by the 3D whole-volume evaluation and by the 2D segmentation probe alike, is in
:func:`dice_iou_per_case`; the penalised HD95 of the whole-volume evaluation's aggregate in :func:`penalised_hd95`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "dice_iou",
    "dice_iou_from_counts",
    "dice_iou_per_case",
    "image_diagonal",
    "mean_per_class",
    "overlap_counts",
    "penalised_hd95",
]


def overlap_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the intersection and the summed sizes of prediction and target.

    Args:
        pred: ``[N, ...]`` predicted class indices.
        target: ``[N, ...]`` true class indices, the same shape.
        num_classes: number of classes, background (index 0) included.

    Returns:
        ``(intersections, totals)``, each ``[N, num_classes]`` float64 on the CPU, where ``totals`` is
        ``|pred == c| + |target == c|``; what :func:`dice_iou_from_counts` reduces.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 2:
        raise ValueError("pred and target must be [N, ...] batches of label maps")
    p = pred.reshape(pred.shape[0], -1).long()
    t = target.reshape(target.shape[0], -1).long()
    if p.numel() and (min(int(p.min()), int(t.min())) < 0 or max(int(p.max()), int(t.max())) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    offsets = torch.arange(p.shape[0], device=p.device)[:, None] * num_classes * num_classes
    confusion = torch.bincount((offsets + t * num_classes + p).flatten(), minlength=p.shape[0] * num_classes**2)
    confusion = confusion.reshape(-1, num_classes, num_classes).double().cpu()
    return confusion.diagonal(dim1=1, dim2=2), confusion.sum(dim=1) + confusion.sum(dim=2)


def dice_iou_per_case(intersections: torch.Tensor, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per case and class from :func:`overlap_counts`: the project's one Dice.

    With ``P`` the predicted and ``T`` the true voxels (or pixels) of a class in one case:

    - Dice ``2 |P and T| / (|P| + |T|)`` and IoU ``|P and T| / |P or T|``;
    - a class absent from both the label and the prediction is undefined: NaN, left out of every mean
      (MONAI's ``compute_dice(ignore_empty=True)`` also gives NaN; ``ignore_empty=False`` gives 1, which
      rewards empty images);
    - a class absent from the label but predicted scores 0, so a false positive is penalised (unlike MONAI's
      ``ignore_empty=True``, which gives NaN there and so lets false positives of absent classes cost nothing).

    :func:`mean_per_class` then averages each class over the cases where it is defined, and the classes.

    Args:
        intersections: ``[N, C]`` counts ``|P and T|``.
        totals: ``[N, C]`` counts ``|P| + |T|``.

    Returns:
        ``(dice, iou)``, each ``[N, C]`` float64, NaN where undefined.
    """
    inter, total = intersections.double(), totals.double()
    return 2 * inter / total, inter / (total - inter)


def mean_per_class(values: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """Means of ``[N, C]`` per-case values: per class over the cases where defined, then over the classes.

    NaNs (undefined cases) are left out; a class defined in no case gets NaN and is left out of the mean over
    classes, which is NaN when no class is defined.

    Returns:
        ``(per_class, mean)``: ``C`` class means and their mean.
    """
    per_class = []
    for column in torch.as_tensor(values, dtype=torch.float64).T:
        defined = column[~column.isnan()]
        per_class.append(float(defined.mean()) if defined.numel() else math.nan)
    finite = [value for value in per_class if not math.isnan(value)]
    return per_class, float(np.mean(finite)) if finite else math.nan


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The diagonal of an image's box in mm, ``sqrt(sum((n_i * s_i) ** 2))``: the largest distance within it.

    Args:
        shape: the number of voxels along each spatial axis.
        spacing: the voxel size along each axis in mm; ``None`` for unit spacing (as MONAI's HD95 assumes).

    Returns:
        The diagonal, e.g. 373.13 for a 240 x 240 x 155 image of 1 mm voxels.

    Raises:
        ValueError: when ``spacing`` has another length than ``shape``.
    """
    sizes = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    if len(sizes) != len(shape):
        raise ValueError(f"{len(sizes)} spacings for a {len(shape)}-dimensional shape")
    return math.hypot(*(n * s for n, s in zip(shape, sizes)))


def penalised_hd95(
    hd95: Sequence[float], in_pred: Sequence[bool], in_label: Sequence[bool], diagonal: float
) -> list[float]:
    """HD95 of each class of one case with a missed or spurious class counted as the image diagonal.

    The raw HD95 is undefined (NaN) whenever the class is absent from the label or the prediction, so a mean
    over the defined values rewards a model for never predicting a hard class. Following common challenge
    practice (e.g. BraTS), a class present in exactly one of the label and the prediction (missed, or a false
    positive class) scores ``diagonal``, the largest possible distance (:func:`image_diagonal`); a class absent
    from both stays NaN (nothing to find, left out of the means); a class present in both keeps its HD95.

    Args:
        hd95: the raw HD95 of each class, in mm.
        in_pred: whether each class has a voxel in the prediction.
        in_label: whether each class has a voxel in the label.
        diagonal: the penalty, in mm.

    Returns:
        The penalised HD95 of each class.

    Raises:
        ValueError: when the three sequences differ in length.
    """
    if not len(hd95) == len(in_pred) == len(in_label):
        raise ValueError(f"{len(hd95)} HD95 values, {len(in_pred)} and {len(in_label)} presence flags")
    return [
        float(value) if pred and label else diagonal if pred or label else math.nan
        for value, pred, label in zip(hd95, in_pred, in_label)
    ]


def dice_iou_from_counts(
    intersections: torch.Tensor,
    totals: torch.Tensor,
    class_names: Sequence[str],
    ignore_background: bool = True,
) -> dict[str, dict[str, float]]:
    """Dice and IoU per class and macro-averaged from :func:`overlap_counts` (see :func:`dice_iou`)."""
    first = 1 if ignore_background else 0
    out: dict[str, dict[str, float]] = {}
    for key, values in zip(("dice", "iou"), dice_iou_per_case(intersections, totals)):
        per_class, macro = mean_per_class(values[:, first:])
        out[key] = {"macro": macro, **dict(zip(class_names[first:], per_class))}
    return out


def dice_iou(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_background: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Dice and IoU (Jaccard) per class and macro-averaged, from label maps.

    Scores are the project's one Dice and IoU (:func:`dice_iou_per_case`), computed per image and class, then
    averaged over images for each class, then over classes for the macro (:func:`mean_per_class`). An (image,
    class) pair where the class is absent from both the prediction and the target is left out of the averages,
    rather than counted as 1 (which would reward empty images) or 0 (which would punish a correct "nothing
    here"); a class absent everywhere gets NaN and is left out of the macro. A class predicted where the target
    has none scores 0, so false positives are penalised.

    Args:
        pred: ``[N, ...]`` predicted class indices (e.g. ``[N, H, W]``).
        target: ``[N, ...]`` true class indices, the same shape.
        num_classes: number of classes, background (index 0) included.
        ignore_background: leave class 0 out.
        class_names: names for the per-class keys (all ``num_classes`` of them; default ``class_<i>``).

    Returns:
        ``{"dice": {"macro": ..., <class>: ...}, "iou": {...}}``.
    """
    names = list(class_names) if class_names else [f"class_{c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return dice_iou_from_counts(*overlap_counts(pred, target, num_classes), names, ignore_background)
