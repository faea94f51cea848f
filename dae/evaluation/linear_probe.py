"""Linear probing of frozen features with a hyper-parameter grid, and end-to-end fine-tuning with one linear head.

The probe follows DINOv2ForRadiology's two-phase protocol. Phase 1 trains one linear head per
(n_last_blocks, avgpool, learning rate) on the training features, all in one loop on the same mini-batches,
and scores each on the validation set. Phase 2 re-trains the best setting from scratch on train + val and
evaluates it once on the test set. Two reference problems are avoided: DINO's ``eval_linear.py`` reports
the best validation epoch as the result, and DINOv2ForRadiology validates on the test set when no validation
set is given. Here the selection sees only validation data (:func:`select_probe_setting` is never given the
test set), and the test set is scored once, at the end.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader

from dae.evaluation.features import unpack_batch
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.metrics import accuracy, auroc, bootstrap_samples

__all__ = [
    "FinetuneResult",
    "LinearProbeConfig",
    "MetricEstimate",
    "ProbeResult",
    "ProbeSetting",
    "fit_probe_and_test",
    "resolve_finetune_flag",
    "resolve_metric",
    "run_finetune",
    "run_linear_probe",
    "select_probe_setting",
    "str2bool",
]

logger = logging.getLogger(__name__)

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_METRICS = ("auto", "accuracy", "auroc")


def str2bool(value: str | bool) -> bool:
    """Parse a boolean from a config value or a command-line string.

    Accepts a bool, or one of true/false, yes/no, 1/0, on/off (any case, surrounding spaces ignored). Use it
    as ``argparse`` ``type=``: ``type=bool`` turns every non-empty string, "False" included, into True.

    Raises:
        ValueError: for any other string.
        TypeError: for a value that is neither a string nor a bool.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a bool or a string, got {type(value).__name__}")
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"cannot read {value!r} as a boolean (use true/false, yes/no, 1/0 or on/off)")


def resolve_finetune_flag(value: bool | str) -> bool:
    """The ``fine_tune`` option as a bool, read strictly with :func:`str2bool` ("False" means False)."""
    try:
        return str2bool(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid fine_tune flag: {error}") from None


def resolve_metric(metric: str, multilabel: bool, num_classes: int) -> str:
    """The selection and report metric: "auto" gives accuracy for multi-class single-label tasks, else AUROC.

    Binary and multi-label tasks use AUROC (macro over classes for multi-label); accuracy is refused for
    multi-label tasks.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if metric == "auto":
        return "accuracy" if not multilabel and num_classes > 2 else "auroc"
    if metric == "accuracy" and multilabel:
        raise ValueError("accuracy is not defined here for multi-label tasks; use metric='auroc'")
    return metric


def _metric_value(metric: str, scores: torch.Tensor, labels: torch.Tensor) -> float:
    if metric == "accuracy":
        return accuracy(scores, labels)
    return auroc(scores, labels)["macro"]


class MetricEstimate(NamedTuple):
    """A test-set metric with its percentile-bootstrap 95% interval and the number of resamples it used."""

    value: float
    low: float
    high: float
    n_boot: int


def _estimate(metric: str, scores: torch.Tensor, labels: torch.Tensor, n_boot: int, seed: int) -> MetricEstimate:
    value = _metric_value(metric, scores, labels)
    if n_boot <= 0:
        return MetricEstimate(value, math.nan, math.nan, 0)
    samples = bootstrap_samples(lambda s, y: _metric_value(metric, s, y), scores, labels, n_boot=n_boot, seed=seed)
    logger.info("%s bootstrap: %d of %d resamples defined", metric, samples.size, n_boot)
    if samples.size == 0:
        return MetricEstimate(value, math.nan, math.nan, 0)
    low, high = np.percentile(samples, [2.5, 97.5])
    return MetricEstimate(value, float(low), float(high), int(samples.size))


def _test_report(
    metric: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, MetricEstimate], dict[str, float]]:
    """Test estimates (accuracy for single-label tasks, AUROC always) and per-class AUROC."""
    per_class = auroc(scores, labels, class_names or None)  # warns once about undefined classes
    per_class.pop("macro")
    metrics = ["auroc"] if labels.ndim == 2 else ["accuracy", "auroc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimates = {name: _estimate(name, scores, labels, n_boot, seed) for name in metrics}
    logger.info("test %s = %.4f [%.4f, %.4f]", metric, *estimates[metric][:3])
    return estimates, per_class


def _result_rows(
    protocol: str,
    setting: str,
    metric: str,
    test: dict[str, MetricEstimate],
    per_class: dict[str, float],
) -> list[dict[str, Any]]:
    rows = []
    for name, est in sorted(test.items(), key=lambda item: item[0] != metric):
        row: dict[str, Any] = {
            "protocol": protocol,
            "setting": setting,
            "metric": name,
            "value": est.value,
            "low": est.low,
            "high": est.high,
            "n_boot": est.n_boot,
            "selected_by": metric,
        }
        if name == "auroc":
            row["per_class"] = dict(per_class)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class ProbeSetting:
    """One point of the probe grid."""

    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        """E.g. ``linear:blocks=4:avgpool=True:lr=0.005``."""
        return f"linear:blocks={self.n_blocks}:avgpool={self.avgpool}:lr={self.lr:g}"

    @property
    def tie_key(self) -> tuple[float, int, bool]:
        """Order among settings with equal validation scores: smaller lr, then fewer blocks, then no avgpool."""
        return (self.lr, self.n_blocks, self.avgpool)


@dataclass
class LinearProbeConfig:
    """Hyper-parameters of :func:`run_linear_probe` (defaults after DINOv2ForRadiology and DINO).

    Attributes:
        learning_rates: grid of SGD learning rates (not scaled by the batch size).
        n_last_blocks: grid of how many last-block CLS tokens to concatenate.
        avgpool: grid of whether to append the mean patch token.
        epochs: passes over the training data, in both phases.
        batch_size: mini-batch size.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: seed of the head initialisation and the mini-batch order.
        metric: "auto", "accuracy" or "auroc" (see :func:`resolve_metric`).
        n_boot: bootstrap resamples for the test interval (0: none).
        device: where the heads are trained.
    """

    learning_rates: tuple[float, ...] = (1e-3, 5e-3, 1e-2, 5e-2)
    n_last_blocks: tuple[int, ...] = (1, 4)
    avgpool: tuple[bool, ...] = (False, True)
    epochs: int = 100
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    metric: str = "auto"
    n_boot: int = 1000
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.learning_rates = tuple(float(lr) for lr in self.learning_rates)
        self.n_last_blocks = tuple(int(n) for n in self.n_last_blocks)
        self.avgpool = tuple(str2bool(a) for a in self.avgpool)
        if not (self.learning_rates and self.n_last_blocks and self.avgpool):
            raise ValueError("learning_rates, n_last_blocks and avgpool must each hold at least one value")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}")

    def settings(self) -> list[ProbeSetting]:
        """Every grid point, blocks-major then avgpool then learning rate."""
        return [
            ProbeSetting(n, a, lr)
            for n, a, lr in itertools.product(self.n_last_blocks, self.avgpool, self.learning_rates)
        ]


@dataclass
class ProbeResult:
    """Outcome of :func:`run_linear_probe`.

    Attributes:
        metric: the selection and headline metric ("accuracy" or "auroc").
        grid: one row per trained setting with its validation score (``split`` "val").
        skipped: the settings the features could not support, with the reason.
        chosen: the selected setting.
        val_value: its validation score.
        test: test estimates by metric name (accuracy for single-label tasks, and AUROC).
        test_per_class_auroc: per-class test AUROC (NaN where undefined).
        test_scores: ``[N, C]`` test probabilities (softmax, or sigmoid for multi-label) for ROC plots.
        test_labels: the test labels.
        class_names: the class names.
        train_size: samples in the selection phase's training set.
        retrain_size: samples in the final training set (train + val).
    """

    metric: str
    grid: list[dict[str, Any]]
    skipped: list[str]
    chosen: ProbeSetting
    val_value: float
    test: dict[str, MetricEstimate]
    test_per_class_auroc: dict[str, float]
    test_scores: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    train_size: int
    retrain_size: int

    @property
    def test_value(self) -> float:
        """The test value of the headline metric."""
        return self.test[self.metric].value

    def rows(self) -> list[dict[str, Any]]:
        """Result rows for :mod:`dae.evaluation.report`, the headline metric first."""
        return _result_rows("linear", self.chosen.name, self.metric, self.test, self.test_per_class_auroc)


def _num_outputs(*sets: FeatureSet) -> int:
    """Head width: the label columns (multi-label), else the most classes any of the sets names or holds."""
    return sets[0].labels.shape[1] if sets[0].is_multilabel else max(s.num_classes for s in sets)


def _check_compatible(*sets: FeatureSet) -> None:
    first = sets[0]
    for other in sets[1:]:
        if other.is_multilabel != first.is_multilabel or other.labels.shape[1:] != first.labels.shape[1:]:
            raise ValueError("all splits must share the label layout (single-label, or the same label columns)")
        if other.cls_blocks.shape[1:] != first.cls_blocks.shape[1:]:
            raise ValueError("all splits must share the feature layout [n_max, D]")
        if (other.patch_mean is None) != (first.patch_mean is None):
            raise ValueError("either all splits or none have patch_mean")


def _supported(settings: Iterable[ProbeSetting], features: FeatureSet) -> tuple[list[ProbeSetting], list[str]]:
    kept, skipped = [], []
    for s in settings:
        if s.n_blocks > features.n_max:
            reason = f"n_last_blocks={s.n_blocks} > the {features.n_max} block(s) stored"
        elif s.avgpool and features.patch_mean is None:
            reason = "avgpool needs patch tokens, which these features lack"
        else:
            kept.append(s)
            continue
        skipped.append(f"{s.name}: {reason}")
        logger.info("skipping %s: %s", s.name, reason)
    return kept, skipped


def _make_head(in_dim: int, num_outputs: int, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(in_dim, num_outputs)
    nn.init.normal_(head.weight, mean=0.0, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    return head


def _loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        # Mean over samples and classes: the per-sample sum over classes divided by the number of classes.
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    return F.cross_entropy(logits.float(), targets)


def _probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return logits.sigmoid() if multilabel else logits.softmax(dim=1)


def _train_heads(
    features: FeatureSet, settings: Sequence[ProbeSetting], num_outputs: int, config: LinearProbeConfig
) -> dict[ProbeSetting, nn.Linear]:
    """Train one head per setting on ``features``, all on the same shuffled mini-batches."""
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    inputs = {
        key: features.linear_input(*key).to(device) for key in dict.fromkeys((s.n_blocks, s.avgpool) for s in settings)
    }
    targets = (features.labels.float() if features.is_multilabel else features.labels.long()).to(device)
    heads = {
        s: _make_head(inputs[(s.n_blocks, s.avgpool)].shape[1], num_outputs, generator).to(device) for s in settings
    }
    optimizer = SGD(
        [{"params": heads[s].parameters(), "lr": s.lr} for s in settings],
        lr=settings[0].lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    n = len(features)
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheduler = CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch, eta_min=0.0)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            batch = {key: x[index] for key, x in inputs.items()}
            # Summing the losses trains every head independently: each loss depends on one head only.
            loss = sum(
                _loss(head(batch[(s.n_blocks, s.avgpool)]), targets[index], features.is_multilabel)
                for s, head in heads.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return heads


@torch.no_grad()
def _predict(head: nn.Linear, features: FeatureSet, setting: ProbeSetting, device: torch.device) -> torch.Tensor:
    logits = head(features.linear_input(setting.n_blocks, setting.avgpool).to(device))
    return _probabilities(logits, features.is_multilabel).cpu()


def select_probe_setting(
    train: FeatureSet, val: FeatureSet, config: LinearProbeConfig | None = None
) -> tuple[ProbeSetting, list[dict[str, Any]], list[str]]:
    """Phase 1: train every grid head on ``train`` and choose the setting with the best ``val`` score.

    Only the training and validation sets are used. Ties go to the smaller learning rate, then fewer
    blocks, then no avgpool; a setting whose validation score is undefined (NaN) is never chosen.

    Returns:
        ``(chosen setting, grid rows, skipped settings)``. Each grid row has ``protocol``, ``setting``,
        ``n_blocks``, ``avgpool``, ``lr``, ``split`` ("val"), ``metric`` and ``value``.
    """
    config = config or LinearProbeConfig()
    _check_compatible(train, val)
    num_outputs = _num_outputs(train, val)
    metric = resolve_metric(config.metric, train.is_multilabel, num_outputs)
    settings, skipped = _supported(config.settings(), train)
    if not settings:
        raise ValueError(f"no probe setting fits these features: {skipped}")
    heads = _train_heads(train, settings, num_outputs, config)
    device = torch.device(config.device)
    grid = []
    scores: dict[ProbeSetting, float] = {}
    for s in settings:
        val_scores = _predict(heads[s], val, s, device)
        if torch.isfinite(val_scores).all():
            scores[s] = _metric_value(metric, val_scores, val.labels)
        else:
            logger.warning("%s diverged (non-finite outputs); it cannot be chosen", s.name)
            scores[s] = math.nan
        grid.append(
            {
                "protocol": "linear",
                "setting": s.name,
                "n_blocks": s.n_blocks,
                "avgpool": s.avgpool,
                "lr": s.lr,
                "split": "val",
                "metric": metric,
                "value": scores[s],
            }
        )
        logger.info("val %s %s = %.4f", s.name, metric, scores[s])
    defined = [s for s in settings if not math.isnan(scores[s])]
    if not defined:
        raise ValueError(f"validation {metric} is undefined for every setting (does val hold both outcomes?)")
    chosen = min(defined, key=lambda s: (-scores[s], s.tie_key))
    logger.info("chosen on val: %s (%s = %.4f)", chosen.name, metric, scores[chosen])
    return chosen, grid, skipped


def fit_probe_and_test(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    setting: ProbeSetting,
    config: LinearProbeConfig | None = None,
) -> tuple[dict[str, MetricEstimate], dict[str, float], torch.Tensor]:
    """Phase 2: train ``setting`` from scratch on train + val for ``config.epochs`` and score it once on test.

    Returns:
        ``(test estimates by metric, per-class test AUROC, [N, C] test probabilities)``.
    """
    config = config or LinearProbeConfig()
    _check_compatible(train, val, test)
    num_outputs = _num_outputs(train, val)
    if not test.is_multilabel and len(test) and int(test.labels.max()) >= num_outputs:
        raise ValueError(f"test labels reach {int(test.labels.max())}, but train and val define {num_outputs} classes")
    metric = resolve_metric(config.metric, train.is_multilabel, num_outputs)
    train_val = train.concat(val)
    head = _train_heads(train_val, [setting], num_outputs, config)[setting]
    scores = _predict(head, test, setting, torch.device(config.device))
    estimates, per_class = _test_report(
        metric, scores, test.labels, test.class_names or train.class_names, config.n_boot, config.seed
    )
    return estimates, per_class, scores


def run_linear_probe(
    train: FeatureSet, val: FeatureSet, test: FeatureSet, config: LinearProbeConfig | None = None
) -> ProbeResult:
    """The full linear-probe protocol: grid on train, selection on val, re-training on train + val, one test.

    Settings the features cannot support (more blocks than stored, avgpool without patch tokens, e.g. for
    CNNs) are skipped with a log line.

    Args:
        train: training features.
        val: validation features, used for the selection and then as extra training data.
        test: test features, used once, after the selection.
        config: the grid and optimisation settings.

    Returns:
        The grid table, the chosen setting and the test results.
    """
    config = config or LinearProbeConfig()
    chosen, grid, skipped = select_probe_setting(train, val, config)
    test_estimates, per_class, scores = fit_probe_and_test(train, val, test, chosen, config)
    return ProbeResult(
        metric=grid[0]["metric"],
        grid=grid,
        skipped=skipped,
        chosen=chosen,
        val_value=next(row["value"] for row in grid if row["setting"] == chosen.name),
        test=test_estimates,
        test_per_class_auroc=per_class,
        test_scores=scores,
        test_labels=test.labels.clone(),
        class_names=list(test.class_names or train.class_names),
        train_size=len(train),
        retrain_size=len(train) + len(val),
    )


# ---------------------------------------------------------------------------------------------- fine-tuning


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
        return _result_rows(
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
        scores.append(_probabilities(model(images.to(device)), multilabel).cpu())
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
        fine_tune: train the backbone; strings are read with :func:`str2bool`.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        metric: "auto", "accuracy" or "auroc" (see :func:`resolve_metric`).
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
    train_backbone = resolve_finetune_flag(fine_tune)
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
    head = _make_head(feature_dim, num_classes, torch.Generator().manual_seed(seed)).to(device)
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
            loss = _loss(classifier(images.to(device)), targets, multilabel)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        val_scores, val_labels = _predict_loader(classifier, val_loader, multilabel, device, image_key, label_key)
        value = math.nan
        if torch.isfinite(val_scores).all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # undefined classes are reported once, on the test set
                value = _metric_value(metric, val_scores, val_labels)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), f"val_{metric}": value})
        logger.info("epoch %d: train loss %.4f, val %s %.4f", epoch, total / max(count, 1), metric, value)
        if not math.isnan(value) and value > best_value:
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in trained.state_dict().items()}
    if best_state is None:
        raise ValueError(f"validation {metric} was undefined at every epoch (does val hold both outcomes?)")
    trained.load_state_dict(best_state)

    test_scores, test_labels = _predict_loader(classifier, test_loader, multilabel, device, image_key, label_key)
    estimates, per_class = _test_report(metric, test_scores, test_labels, class_names, n_boot, seed)
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
