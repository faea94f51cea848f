"""End-to-end fine-tuning of a backbone with one linear head: epoch chosen on validation, test scored once.

:class:`ProbeFeatures` turns a feature extractor into the linear-probe input (the layout of
:meth:`~dae.evaluation.featureset.FeatureSet.linear_input`), and :func:`run_finetune` trains a backbone and the
linear head of :mod:`dae.evaluation.linear_probe` together, or the head alone on a frozen backbone.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader

from dae.engine.step import backward_step
from dae.evaluation.features import FeatureExtractor, unpack_batch
from dae.evaluation.linear_probe import classification_loss, linear_head, probabilities
from dae.evaluation.metrics import MetricEstimate, classification_estimates, metric_value, resolve_metric
from dae.evaluation.report import estimate_rows
from dae.utils.config import resolve_flag

__all__ = ["FinetuneResult", "ProbeFeatures", "run_finetune"]

logger = logging.getLogger(__name__)


class ProbeFeatures(nn.Module):
    """Images to the linear-probe input ``[B, D * (n_blocks + avgpool)]``, with gradients (for fine-tuning).

    The layout is that of :meth:`~dae.evaluation.featureset.FeatureSet.linear_input`: the CLS tokens of the last
    ``n_blocks`` blocks (oldest first), then the mean of the last block's patch tokens when ``avgpool``. A linear
    head trained on extracted features therefore applies unchanged on top of this module.

    Args:
        extractor: the feature extractor.
        n_blocks: how many of the extractor's ``cls_blocks`` to use (1 to ``extractor.n_blocks``).
        avgpool: append the patch-token mean.

    Attributes:
        out_dim: ``D * (n_blocks + avgpool)``.

    Raises:
        ValueError: for ``n_blocks`` out of range, or ``avgpool`` on an extractor without patch tokens.
    """

    def __init__(self, extractor: FeatureExtractor, n_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        if not 1 <= n_blocks <= extractor.n_blocks:
            raise ValueError(f"n_blocks must be in 1..{extractor.n_blocks}, got {n_blocks}")
        if avgpool and not extractor.has_patch_tokens:
            raise ValueError("avgpool=True needs patch tokens, but this extractor pools its feature map (a CNN?)")
        self.extractor = extractor
        self.n_blocks = n_blocks
        self.avgpool = avgpool
        self.out_dim = extractor.embed_dim * (n_blocks + int(avgpool))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The linear-probe input of ``images``, shape ``[B, out_dim]``."""
        out = self.extractor(images)
        parts = [out["cls_blocks"][:, -self.n_blocks :].flatten(1)]
        if self.avgpool:
            parts.append(out["patch_grid"].flatten(2).mean(dim=2))
        return torch.cat(parts, dim=1)


@dataclass
class FinetuneResult:
    """Outcome of :func:`run_finetune`.

    Attributes:
        metric: the selection and headline metric.
        fine_tuned: whether the backbone was trained (False: frozen backbone, head only).
        best_epoch: the epoch (0-based) with the best validation score, whose weights were tested.
        history: per epoch, the mean training loss and the validation score.
        val_value: the best validation score.
        test: test estimates by metric name.
        test_per_class_auroc: per-class test AUROC.
        test_scores: ``[N, C]`` test probabilities.
        test_labels: the test labels.
        class_names: the class names.
    """

    metric: str
    fine_tuned: bool
    best_epoch: int
    history: list[dict[str, float]]
    val_value: float
    test: dict[str, MetricEstimate]
    test_per_class_auroc: dict[str, float]
    test_scores: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)

    @property
    def test_value(self) -> float:
        """The test value of the headline metric."""
        return self.test[self.metric].value

    def rows(self) -> list[dict[str, Any]]:
        """Result rows for :mod:`dae.evaluation.report`, the headline metric first."""
        protocol = "finetune" if self.fine_tuned else "frozen_head"
        return estimate_rows(
            protocol, f"best_epoch={self.best_epoch}", self.metric, self.test, self.test_per_class_auroc
        )


def _targets(labels: Any, multilabel: bool, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels).to(device)
    if multilabel:
        return labels.float()
    return labels.reshape(-1).long()  # [B, 1] label tensors (common with MONAI) become [B]


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear, train_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.train_backbone = train_backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            features = self.backbone(images)
        return self.head(features.float())

    def train(self, mode: bool = True) -> _Classifier:
        super().train(mode)
        self.backbone.train(mode and self.train_backbone)
        return self


@torch.no_grad()
def _predict_loader(
    model: _Classifier, loader: Iterable[Any], multilabel: bool, device: torch.device, image_key: str, label_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    scores, labels = [], []
    for batch in loader:
        images, y = unpack_batch(batch, image_key, label_key)
        scores.append(probabilities(model(images.to(device)), multilabel).cpu())
        labels.append(_targets(y, multilabel, torch.device("cpu")))
    return torch.cat(scores), torch.cat(labels)


def run_finetune(
    model: nn.Module,
    train_loader: DataLoader | Sequence[Any],
    val_loader: Iterable[Any],
    test_loader: Iterable[Any],
    num_classes: int,
    multilabel: bool = False,
    head_lr: float = 1e-3,
    backbone_lr: float = 1e-5,
    epochs: int = 10,
    fine_tune: bool | str = True,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    metric: str = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    feature_dim: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> FinetuneResult:
    """Train a backbone and one linear head end to end, choose the epoch on validation, test once.

    Both parameter groups use SGD with momentum and a per-iteration cosine decay to 0, the backbone at
    ``backbone_lr`` (DINOv2ForRadiology's 1e-5) and the head at ``head_lr``. After every epoch the model is
    scored on ``val_loader``; the weights of the best epoch (the earliest on ties) are restored at the end
    and scored once on ``test_loader``. With ``fine_tune`` false the backbone stays frozen in eval mode and
    only the head is trained. ``model`` is modified in place and ends with the selected weights.

    Args:
        model: maps images ``[B, ...]`` to features ``[B, F]``.
        train_loader: yields ``{image_key, label_key}`` dicts or ``(images, labels)`` pairs; needs ``len()``.
        val_loader: validation batches, used for the epoch selection only.
        test_loader: test batches, used once.
        num_classes: number of classes (label columns for multi-label tasks).
        multilabel: labels are ``[B, C]`` 0/1 vectors (BCE loss) rather than class indices (cross-entropy).
        head_lr: learning rate of the head.
        backbone_lr: learning rate of the backbone.
        epochs: training epochs.
        fine_tune: train the backbone; strings are read with :func:`dae.utils.config.str2bool`.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        metric: "auto", "accuracy" or "auroc" (see :func:`~dae.evaluation.metrics.resolve_metric`).
        n_boot: bootstrap resamples for the test interval.
        seed: seed of the head initialisation and the bootstrap.
        device: training device.
        class_names: names of the classes, for the per-class results.
        feature_dim: backbone output width F (default: measured on one training batch).
        image_key: image key of dict batches.
        label_key: label key of dict batches.

    Returns:
        The per-epoch history, the chosen epoch and the test results.
    """
    train_backbone = resolve_flag(fine_tune, "fine_tune")
    metric = resolve_metric(metric, multilabel, num_classes)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    model.to(device)
    if feature_dim is None:
        images, _ = unpack_batch(next(iter(train_loader)), image_key, label_key)
        model.eval()
        with torch.no_grad():
            feature_dim = model(images[:1].to(device)).shape[1]
    head = linear_head(feature_dim, num_classes, torch.Generator().manual_seed(seed)).to(device)
    classifier = _Classifier(model, head, train_backbone)
    groups = [{"params": head.parameters(), "lr": head_lr}]
    if train_backbone:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": backbone_lr})
    optimizer = SGD(groups, lr=head_lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader), eta_min=0.0)
    trained = classifier if train_backbone else head

    history: list[dict[str, float]] = []
    best_value, best_epoch, best_state = -math.inf, -1, None
    for epoch in range(epochs):
        classifier.train()
        total, count = 0.0, 0
        for batch in train_loader:
            images, labels = unpack_batch(batch, image_key, label_key)
            targets = _targets(labels, multilabel, device)
            loss = classification_loss(classifier(images.to(device)), targets, multilabel)
            backward_step(loss, optimizer)
            scheduler.step()
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        val_scores, val_labels = _predict_loader(classifier, val_loader, multilabel, device, image_key, label_key)
        value = math.nan
        if torch.isfinite(val_scores).all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # undefined classes are reported once, on the test set
                value = metric_value(metric, val_scores, val_labels)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), f"val_{metric}": value})
        logger.info("epoch %d: train loss %.4f, val %s %.4f", epoch, total / max(count, 1), metric, value)
        if not math.isnan(value) and value > best_value:
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in trained.state_dict().items()}
    if best_state is None:
        raise ValueError(f"validation {metric} was undefined at every epoch (does val hold both outcomes?)")
    trained.load_state_dict(best_state)

    test_scores, test_labels = _predict_loader(classifier, test_loader, multilabel, device, image_key, label_key)
    estimates, per_class = classification_estimates(test_scores, test_labels, class_names, n_boot, seed)
    logger.info("test %s = %.4f [%.4f, %.4f]", metric, *estimates[metric][:3])
    return FinetuneResult(
        metric=metric,
        fine_tuned=train_backbone,
        best_epoch=best_epoch,
        history=history,
        val_value=best_value,
        test=estimates,
        test_per_class_auroc=per_class,
        test_scores=test_scores,
        test_labels=test_labels,
        class_names=list(class_names or []),
    )
