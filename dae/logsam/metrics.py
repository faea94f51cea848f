"""Case-level measures of the dictation-to-mask pipeline: box overlap, mask overlap and their intervals.

Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ``x1``/``y1`` (the tight box of a mask ``m`` covers
``m[y0:y1, x0:x1]``); masks are boolean ``(H, W)`` arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dae.evaluation.metrics import MetricEstimate, bootstrap_estimate

__all__ = ["box_iou", "box_mask", "mask_dice_iou", "mean_estimate", "rate_estimate"]


def box_iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (0 when they do not touch or one is empty)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def box_mask(box: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The box filled as a boolean ``shape`` mask: the segmentation a box alone gives (the baseline of MedSAM).

    Fractional coordinates cover the pixels whose centres lie inside the box.
    """
    height, width = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    mask = np.zeros(shape, dtype=bool)
    c0, r0 = max(0, math.ceil(x0 - 0.5)), max(0, math.ceil(y0 - 0.5))
    c1, r1 = min(width, math.ceil(x1 - 0.5)), min(height, math.ceil(y1 - 0.5))
    if c1 > c0 and r1 > r0:
        mask[r0:r1, c0:c1] = True
    return mask


def mask_dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of one shape; both empty counts as a perfect match (1, 1)."""
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, target {target.shape}")
    pred, target = pred.astype(bool), target.astype(bool)
    inter = float(np.logical_and(pred, target).sum())
    total = float(pred.sum() + target.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


def _mean(values: np.ndarray, _: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def mean_estimate(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0) -> MetricEstimate:
    """Mean of per-case values with its 95% percentile-bootstrap interval (cases resampled).

    Returns:
        ``MetricEstimate(value, low, high, n_boot)``; NaN everywhere when there is no case.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return MetricEstimate(math.nan, math.nan, math.nan, 0)
    return bootstrap_estimate(_mean, array, array, n_boot=n_boot, seed=seed)


def rate_estimate(hits: Sequence[bool] | np.ndarray, n_boot: int = 1000, seed: int = 0) -> MetricEstimate:
    """Share of true values (accuracy, recall) with its bootstrap interval."""
    return mean_estimate(np.asarray(hits, dtype=np.float64), n_boot=n_boot, seed=seed)
