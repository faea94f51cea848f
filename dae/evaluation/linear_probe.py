"""Linear probing of frozen features with a hyper-parameter grid, and the linear head it shares with fine-tuning.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from dae.engine.step import backward_step
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.metrics import METRICS, MetricEstimate, classification_estimates, metric_value, resolve_metric
from dae.evaluation.report import estimate_rows
from dae.utils.config import str2bool

__all__ = [
    "LinearProbeConfig",
    "ProbeResult",
    "ProbeSetting",
    "classification_loss",
    "fit_probe_and_test",
    "linear_head",
    "probabilities",
    "run_linear_probe",
    "select_probe_setting",
]

logger = logging.getLogger(__name__)


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
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")

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
        return estimate_rows("linear", self.chosen.name, self.metric, self.test, self.test_per_class_auroc)


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


def linear_head(in_dim: int, num_outputs: int, generator: torch.Generator) -> nn.Linear:
    """A linear head with N(0, 0.01) weights drawn from ``generator`` and zero bias (as DINO's)."""
    head = nn.Linear(in_dim, num_outputs)
    nn.init.normal_(head.weight, mean=0.0, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    return head


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy on class indices, or binary cross-entropy on multi-hot targets, in float32."""
    if multilabel:
        # Mean over samples and classes: the per-sample sum over classes divided by the number of classes.
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    return F.cross_entropy(logits.float(), targets)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax probabilities, or per-class sigmoids for multi-label tasks."""
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
        s: linear_head(inputs[(s.n_blocks, s.avgpool)].shape[1], num_outputs, generator).to(device) for s in settings
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
                classification_loss(head(batch[(s.n_blocks, s.avgpool)]), targets[index], features.is_multilabel)
                for s, head in heads.items()
            )
            # No clipping; and no norm measured over all heads, which a diverging head would make non-finite.
            backward_step(loss, optimizer)
            scheduler.step()
    return heads


@torch.no_grad()
def _predict(head: nn.Linear, features: FeatureSet, setting: ProbeSetting, device: torch.device) -> torch.Tensor:
    logits = head(features.linear_input(setting.n_blocks, setting.avgpool).to(device))
    return probabilities(logits, features.is_multilabel).cpu()


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
            scores[s] = metric_value(metric, val_scores, val.labels)
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
    class_names = test.class_names or train.class_names
    estimates, per_class = classification_estimates(scores, test.labels, class_names, config.n_boot, config.seed)
    logger.info("test %s = %.4f [%.4f, %.4f]", metric, *estimates[metric][:3])
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
