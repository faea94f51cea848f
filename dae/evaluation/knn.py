"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol), single- and multi-label.

:func:`knn_predict` scores test samples, :func:`knn_evaluate` reports several k, :func:`run_knn` is the protocol
(k chosen on validation, the test split scored once) and :class:`KnnMonitor` is the collapse check a DINO
trainer runs on its teacher. Compared with DINO's ``eval_knn.py``, the test set is processed in chunks of a
fixed size, so any number of test images works (the reference splits it into ``N // 100``-image chunks, which
fails below 100 images); the number of classes is taken from the labels or the caller (the reference always
assumes 1000); and multi-label tasks are supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dae.evaluation.features import DinoBackboneExtractor, extract_features
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.metrics import accuracy, auroc, classification_estimates, resolve_metric
from dae.evaluation.neighbours import cosine_topk

__all__ = ["KnnMonitor", "knn_evaluate", "knn_predict", "run_knn"]

logger = logging.getLogger(__name__)


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

    Neighbours are found by :func:`~dae.evaluation.neighbours.cosine_topk`. Each of the k neighbours votes with
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
    n = train_features.shape[0]
    if n == 0 or train_labels.shape[0] != n:
        raise ValueError(
            f"need >= 1 training sample with a label each, got {n} features, {train_labels.shape[0]} labels"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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

    sims, index = cosine_topk(test_features, train_features, k, chunk_size=chunk_size)
    votes = votes.to(sims.device)
    out = [torch.zeros(0, votes.shape[1], device=sims.device)]
    for start in range(0, sims.shape[0], chunk_size):
        chunk_sims, chunk_index = sims[start : start + chunk_size], index[start : start + chunk_size]
        # Shifting by the largest similarity leaves the normalised weights unchanged and avoids overflow.
        weights = ((chunk_sims - chunk_sims[:, :1]) / temperature).exp()
        scores = torch.einsum("mk,mkc->mc", weights, votes[chunk_index])
        out.append(scores / weights.sum(dim=1, keepdim=True))
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
        estimates, per_class = classification_estimates(scores, test.labels, class_names, n_boot=n_boot, seed=seed)
        for name, estimate in estimates.items():
            row = {**base, "metric": name, "value": estimate.value}
            if n_boot > 0:
                row["low"], row["high"] = estimate.low, estimate.high
            if name == "auroc":
                row["per_class"] = per_class
            rows.append(row)
        values = ", ".join(f"{name}={estimate.value:.4f}" for name, estimate in estimates.items())
        logger.info("k-NN %s: %s", base["setting"], values)
    return rows


def run_knn(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The k-NN protocol: k chosen on ``val`` with ``train`` as memory, then ``test`` scored once with train + val.

    The selection metric is that of :func:`~dae.evaluation.metrics.resolve_metric` ("auto"); ties go to the
    smaller k.

    Returns:
        The test rows of :func:`knn_evaluate` for the chosen k, each with ``val_value``: the chosen k's
        validation score.
    """
    metric = resolve_metric("auto", train.is_multilabel, max(train.num_classes, test.num_classes))
    val_rows = [r for r in knn_evaluate(train, val, ks, temperature) if r["metric"] == metric]
    best = max(val_rows, key=lambda r: (r["value"], -r["k"]))
    logger.info(
        "k-NN on validation (%s): %s; chosen k=%d", metric, {r["k"]: round(r["value"], 4) for r in val_rows}, best["k"]
    )
    rows = knn_evaluate(train.concat(val), test, [best["k"]], temperature, n_boot=n_boot, seed=seed)
    for row in rows:
        row["val_value"] = best["value"]
    return rows


class KnnMonitor:
    """k-NN top-1 accuracy and AUROC of a backbone's CLS features: the collapse check of self-supervised training.

    The backbone's final CLS features of ``probe_loader`` (labelled training images) vote, with k neighbours
    (at most the probe set's size), for the images of ``val_loader``. Give it a few hundred to a few thousand
    images. The backbone is left in eval mode.

    Both metrics come from the same vote: ``knn_top1`` (the arg-max, DINO's monitor) and ``knn_auroc`` (the macro
    AUROC of the vote scores; one-vs-rest with more than two classes). On a few hundred images of a binary task
    the accuracy moves in steps of one image, and sits on the majority class early on; the AUROC ranks every
    image and is the metric the evaluation bundle reports, so it is the steadier choice of ``best.pt`` there.

    Args:
        probe_loader: labelled images whose features vote.
        val_loader: labelled images that are classified.
        k: neighbours.
        temperature: vote temperature.
        image_key / label_key: batch keys.
        device: where features are computed.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` for the feature extraction.
    """

    #: the metrics a call returns (a trainer's ``best_metric`` must be one of them)
    metrics = ("knn_top1", "knn_auroc")

    def __init__(
        self,
        probe_loader: Iterable[Any],
        val_loader: Iterable[Any],
        k: int = 20,
        temperature: float = 0.07,
        image_key: str = "image",
        label_key: str = "label",
        device: str | torch.device = "cpu",
        amp: str = "none",
    ) -> None:
        self.probe_loader, self.val_loader = probe_loader, val_loader
        self.k, self.temperature = k, temperature
        self.keys = {"image_key": image_key, "label_key": label_key, "device": device, "amp": amp}

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """``{"knn_top1": accuracy, "knn_auroc": macro AUROC}`` of ``backbone`` (a ViT or ResNet of
        :func:`dae.models.build_backbone`)."""
        extractor = DinoBackboneExtractor(backbone, n_last_blocks=1)
        train = extract_features(extractor, self.probe_loader, **self.keys)
        val = extract_features(extractor, self.val_loader, **self.keys)
        k, num_classes = min(self.k, len(train)), max(train.num_classes, val.num_classes)
        scores = knn_predict(train.cls, train.labels, val.cls, k, self.temperature, num_classes=num_classes)
        return {"knn_top1": accuracy(scores, val.labels), "knn_auroc": auroc(scores, val.labels)["macro"]}
