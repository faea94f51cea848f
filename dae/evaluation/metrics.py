"""Classification metrics: accuracy, AUROC, bootstrap estimates and ROC curves (Dice and IoU: ``seg_metrics``).

Scores and labels may be torch tensors or NumPy arrays. Labels are ``[N]`` class indices (single-label) or
``[N, C]`` 0/1 matrices (multi-label); scores are ``[N, C]`` (or ``[N]`` for a binary task).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.metrics import auc as trapezoid_area
from sklearn.metrics import roc_curve

__all__ = [
    "METRICS",
    "MetricEstimate",
    "RocCurve",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "bootstrap_estimate",
    "bootstrap_samples",
    "classification_estimates",
    "metric_value",
    "resolve_metric",
    "roc_curves",
]

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray
#: selection and report metrics of the classification protocols (see :func:`resolve_metric`)
METRICS = ("auto", "accuracy", "auroc")


class RocCurve(NamedTuple):
    """One ROC curve: false- and true-positive rates at each threshold, and the area under it."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


class MetricEstimate(NamedTuple):
    """A metric with its percentile-bootstrap interval and the number of resamples the interval used."""

    value: float
    low: float
    high: float
    n_boot: int


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(scores_or_preds: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy of a single-label task.

    Args:
        scores_or_preds: ``[N, C]`` scores (the arg-max is the prediction) or ``[N]`` predicted class indices.
        labels: ``[N]`` true class indices.

    Returns:
        The fraction of correct predictions (NaN for an empty set).
    """
    y = _numpy(labels)
    if y.ndim != 1:
        raise ValueError(f"accuracy needs single-label [N] labels, got shape {y.shape}")
    p = _numpy(scores_or_preds)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    elif p.ndim != 1:
        raise ValueError(f"expected [N, C] scores or [N] predictions, got shape {p.shape}")
    elif np.issubdtype(p.dtype, np.floating) and not np.all(p == np.round(p)):
        raise ValueError("1-D input is read as predicted class indices, but it holds non-integer values")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        return math.nan
    return float(np.mean(p.astype(np.int64) == y.astype(np.int64)))


def _class_targets(
    scores: ArrayLike, labels: ArrayLike, class_names: Sequence[str] | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Split a task into one binary problem per class: ``(names, [N, K] 0/1 targets, [N, K] scores)``.

    Binary tasks (``[N]``, ``[N, 1]`` or ``[N, 2]`` scores with ``[N]`` labels) give one problem, the positive
    class; multi-class tasks give one one-vs-rest problem per class; multi-label tasks one per column.
    """
    s = _numpy(scores).astype(np.float64)
    y = _numpy(labels)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"scores of shape {s.shape} do not match labels of shape {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    n_cols = s.shape[1]
    if y.ndim == 2:
        if y.shape != s.shape:
            raise ValueError(f"multi-label scores {s.shape} and labels {y.shape} differ in shape")
        names = list(class_names) if class_names else [f"class_{c}" for c in range(n_cols)]
        targets = (y > 0.5).astype(np.int64)
    elif y.ndim != 1:
        raise ValueError(f"labels must be [N] or [N, C], got shape {y.shape}")
    elif n_cols <= 2:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("binary AUROC needs labels in {0, 1}")
        names = [class_names[-1] if class_names else "class_1"]
        targets, s = y.astype(np.int64)[:, None], s[:, -1:]
    else:
        names = list(class_names) if class_names else [f"class_{c}" for c in range(n_cols)]
        targets = (y.astype(np.int64)[:, None] == np.arange(n_cols)).astype(np.int64)
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} class names for {s.shape[1]} score columns")
    return names, targets, s


def _auroc_columns(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each column by counting pairs; NaN where the column holds one outcome only.

    The share of (positive, negative) pairs in which the positive scores higher, a tie counting half: for
    each positive, the negatives below it are found by binary search in the sorted negatives. This equals
    sklearn's ``roc_auc_score`` (the trapezoidal area under the ROC curve) and is several times faster,
    which matters when bootstrapping many classes.
    """
    scores = np.ascontiguousarray(scores.T)
    positive = np.ascontiguousarray(targets.T > 0)
    out = np.full(scores.shape[0], np.nan)
    for c in range(scores.shape[0]):
        pos, neg = np.sort(scores[c][positive[c]]), np.sort(scores[c][~positive[c]])
        if pos.size and neg.size:
            wins_twice = np.searchsorted(neg, pos, "left").sum() + np.searchsorted(neg, pos, "right").sum()
            out[c] = wins_twice / (2.0 * pos.size * neg.size)
    return out


def auroc(scores: ArrayLike, labels: ArrayLike, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Area under the ROC curve, per class and macro-averaged.

    - binary (``[N]`` labels in {0, 1}, scores ``[N]``, ``[N, 1]`` or ``[N, 2]``; the last column is the
      positive class): one AUROC, under "macro" and under the positive class's name;
    - multi-class (``[N]`` labels, ``[N, C]`` scores with C > 2): one-vs-rest per class, macro = their mean;
    - multi-label (``[N, C]`` 0/1 labels): per column, macro = their mean.

    The values equal scikit-learn's ``roc_auc_score`` per class (and its ``multi_class="ovr"`` macro when
    every class is defined). A class whose targets hold only one outcome (e.g. no positive in the set) has
    no AUROC: it is reported as NaN, left out of the macro average, and a warning names it. The macro is NaN
    if no class is defined.

    Args:
        scores: the scores, higher meaning more likely positive (finite).
        labels: class indices or 0/1 matrix.
        class_names: names for the per-class keys (default ``class_<i>``).

    Returns:
        ``{"macro": value, <class name>: value, ...}``.
    """
    names, targets, s = _class_targets(scores, labels, class_names)
    values = _auroc_columns(targets, s)
    undefined = [name for name, value in zip(names, values) if np.isnan(value)]
    if undefined:
        warnings.warn(
            f"AUROC undefined (one outcome only) for {undefined}; excluded from the macro average", stacklevel=2
        )
    defined = values[~np.isnan(values)]
    macro = float(defined.mean()) if defined.size else math.nan
    return {"macro": macro, **{name: float(value) for name, value in zip(names, values)}}


def resolve_metric(metric: str, multilabel: bool, num_classes: int) -> str:
    """The selection and report metric: "auto" gives accuracy for multi-class single-label tasks, else AUROC.

    Binary and multi-label tasks use AUROC (macro over classes for multi-label); accuracy is refused for
    multi-label tasks.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "auto":
        return "accuracy" if not multilabel and num_classes > 2 else "auroc"
    if metric == "accuracy" and multilabel:
        raise ValueError("accuracy is not defined here for multi-label tasks; use metric='auroc'")
    return metric


def metric_value(metric: str, scores: ArrayLike, labels: ArrayLike) -> float:
    """The value of a resolved metric: ``"accuracy"``, or ``"auroc"`` (the macro AUROC)."""
    if metric == "accuracy":
        return accuracy(scores, labels)
    return auroc(scores, labels)["macro"]


def _take(x: ArrayLike, index: np.ndarray) -> ArrayLike:
    return x[torch.from_numpy(index).to(x.device)] if isinstance(x, torch.Tensor) else np.asarray(x)[index]


def bootstrap_samples(
    metric_fn: Callable[[Any, Any], float],
    scores: ArrayLike,
    labels: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Metric values on ``n_boot`` resamples (with replacement) of the test samples.

    Resamples on which the metric is undefined (NaN, or ``metric_fn`` raises ``ValueError``) are skipped, so
    the result may hold fewer than ``n_boot`` values. Warnings raised by ``metric_fn`` are silenced.

    Args:
        metric_fn: ``metric_fn(scores, labels) -> float``, called with row subsets of the same type as given.
        scores: ``[N, ...]`` scores.
        labels: ``[N, ...]`` labels.
        n_boot: number of resamples.
        seed: seed of the resampling generator.

    Returns:
        The finite metric values, in resample order.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            index = rng.integers(0, n, size=n)
            try:
                value = float(metric_fn(_take(scores, index), _take(labels, index)))
            except ValueError:
                continue
            if math.isfinite(value):
                values.append(value)
    return np.asarray(values, dtype=np.float64)


def bootstrap_estimate(
    metric_fn: Callable[[Any, Any], float],
    scores: ArrayLike,
    labels: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricEstimate:
    """Point estimate and percentile-bootstrap ``1 - alpha`` confidence interval of a metric.

    The interval comes from :func:`bootstrap_samples`; how many resamples were usable is logged, with a
    warning when some were skipped as undefined.

    Returns:
        The estimate; the bounds are NaN (and ``n_boot`` 0) when no resample gave a defined value.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    point = float(metric_fn(scores, labels))
    values = bootstrap_samples(metric_fn, scores, labels, n_boot=n_boot, seed=seed)
    logger.info("bootstrap: %d of %d resamples defined", values.size, n_boot)
    if values.size < n_boot:
        warnings.warn(
            f"bootstrap: metric undefined on {n_boot - values.size} of {n_boot} resamples; "
            f"the interval uses the other {values.size}",
            stacklevel=2,
        )
    if values.size == 0:
        return MetricEstimate(point, math.nan, math.nan, 0)
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return MetricEstimate(point, float(low), float(high), int(values.size))


def bootstrap_ci(
    metric_fn: Callable[[Any, Any], float],
    scores: ArrayLike,
    labels: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, low, high)`` of :func:`bootstrap_estimate`."""
    point, low, high, _ = bootstrap_estimate(metric_fn, scores, labels, n_boot=n_boot, alpha=alpha, seed=seed)
    return point, low, high


def classification_estimates(
    scores: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, MetricEstimate], dict[str, float]]:
    """The test estimates of every classification protocol: accuracy and AUROC with intervals, per-class AUROC.

    Accuracy is estimated for single-label tasks only; AUROC (macro) always. Each interval comes from
    :func:`bootstrap_estimate` (95%, warnings silenced; ``n_boot`` 0 gives NaN bounds). Classes without an
    AUROC are warned about once.

    Returns:
        ``({"accuracy": estimate, "auroc": estimate}, {<class name>: AUROC})``.
    """
    per_class = auroc(scores, labels, class_names or None)
    per_class.pop("macro")
    names = ["auroc"] if labels.ndim == 2 else ["accuracy", "auroc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimates = {
            name: bootstrap_estimate(partial(metric_value, name), scores, labels, n_boot=n_boot, seed=seed)
            for name in names
        }
    return estimates, per_class


def roc_curves(scores: ArrayLike, labels: ArrayLike, class_names: Sequence[str] | None = None) -> dict[str, RocCurve]:
    """ROC curve of every class whose AUROC is defined (same task rules as :func:`auroc`), for plotting."""
    names, targets, s = _class_targets(scores, labels, class_names)
    curves = {}
    for c, name in enumerate(names):
        if targets[:, c].min(initial=0) != targets[:, c].max(initial=0):
            fpr, tpr, _ = roc_curve(targets[:, c], s[:, c])
            curves[name] = RocCurve(fpr=fpr, tpr=tpr, auc=float(trapezoid_area(fpr, tpr)))
    return curves
