"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol), single- and multi-label.

Compared with DINO's ``eval_knn.py``, the test set is processed in chunks of a fixed size, so any number of
test images works (the reference splits it into ``N // 100``-image chunks, which fails below 100 images);
the number of classes is taken from the labels or the caller (the reference always assumes 1000); and
multi-label tasks are supported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dae.evaluation.featureset import FeatureSet
from dae.evaluation.metrics import accuracy, auroc, bootstrap_ci

__all__ = ["knn_evaluate", "knn_predict"]

logger = logging.getLogger(__name__)


def _macro_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return auroc(scores, labels)["macro"]


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores of test samples from a temperature-weighted vote of their k nearest training samples.

    Features are L2-normalised and compared by cosine similarity. Each of the k neighbours votes with
    weight ``exp(sim / temperature)`` for its one-hot (single-label) or multi-hot (multi-label) label, and
    the votes are divided by the sum of the weights. Single-label scores therefore sum to 1 per test
    sample (the arg-max is DINO's prediction) and multi-label scores are per-class values in [0, 1].

    Args:
        train_features: ``[N, D]`` training features.
        train_labels: ``[N]`` class indices or ``[N, C]`` 0/1 labels.
        test_features: ``[M, D]`` test features, any M >= 0.
        k: number of neighbours; capped at N, with a warning.
        temperature: softmax temperature of the vote weights.
        num_classes: number of classes of a single-label task (default: largest training label + 1).
        chunk_size: test samples per similarity block, which bounds memory at ``chunk_size x N``.

    Returns:
        ``[M, C]`` float32 scores.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("train_features and test_features must be [N, D] and [M, D]")
    n = train_features.shape[0]
    if n == 0 or train_labels.shape[0] != n:
        raise ValueError(
            f"need >= 1 training sample with a label each, got {n} features, {train_labels.shape[0]} labels"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if k < 1 or chunk_size < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1, chunk_size >= 1 and temperature > 0 (got {k}, {chunk_size}, {temperature})")
    if k > n:
        warnings.warn(f"k={k} exceeds the {n} training samples; using k={n}", stacklevel=2)
        k = n

    if train_labels.ndim == 2:
        if num_classes is not None and num_classes != train_labels.shape[1]:
            raise ValueError(f"num_classes={num_classes} but the multi-label labels have {train_labels.shape[1]}")
        votes = train_labels.float()
    else:
        labels = train_labels.long()
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"training labels must lie in [0, {num_classes})")
        votes = F.one_hot(labels, num_classes).float()

    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    votes = votes.to(train.device)
    out = []
    for start in range(0, test.shape[0], chunk_size):
        sims, index = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        # Shifting by the largest similarity leaves the normalised weights unchanged and avoids overflow.
        weights = ((sims - sims[:, :1]) / temperature).exp()
        scores = torch.einsum("mk,mkc->mc", weights, votes[index])
        out.append(scores / weights.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, votes.shape[1])
    return torch.cat(out).cpu()


def knn_evaluate(
    train: FeatureSet,
    test: FeatureSet,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_boot: int = 0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """k-NN evaluation on the final CLS features for several k.

    Args:
        train: the reference (training) features.
        test: the evaluated features.
        ks: the numbers of neighbours to try (each capped at the training-set size).
        temperature: vote temperature.
        n_boot: bootstrap resamples for the confidence intervals (0: no interval).
        seed: bootstrap seed.

    Returns:
        One row per (k, metric), in the :mod:`dae.evaluation.report` layout: ``protocol`` "knn",
        ``setting``, ``k``, ``k_used``, ``temperature``, ``metric`` ("accuracy" for single-label tasks,
        "auroc" always; macro AUROC), ``value``, ``low``/``high`` when ``n_boot`` > 0, and ``per_class``
        AUROC on the AUROC rows.
    """
    if train.is_multilabel != test.is_multilabel:
        raise ValueError("train and test must both be single-label or both multi-label")
    num_classes = None if train.is_multilabel else max(train.num_classes, test.num_classes)
    class_names = train.class_names or test.class_names or None
    rows: list[dict[str, Any]] = []
    for k in ks:
        scores = knn_predict(train.cls, train.labels, test.cls, k, temperature, num_classes=num_classes)
        base = {
            "protocol": "knn",
            "setting": f"k={k},T={temperature:g}",
            "k": k,
            "k_used": min(k, len(train)),
            "temperature": temperature,
        }
        per_class = auroc(scores, test.labels, class_names)
        values = {"auroc": per_class.pop("macro")}
        if not train.is_multilabel:
            values = {"accuracy": accuracy(scores, test.labels), **values}
        for name, value in values.items():
            row = {**base, "metric": name, "value": value}
            if n_boot > 0:
                fn = accuracy if name == "accuracy" else _macro_auroc
                _, row["low"], row["high"] = bootstrap_ci(fn, scores, test.labels, n_boot=n_boot, seed=seed)
            if name == "auroc":
                row["per_class"] = per_class
            rows.append(row)
        logger.info("k-NN %s: %s", base["setting"], ", ".join(f"{m}={v:.4f}" for m, v in values.items()))
    return rows
