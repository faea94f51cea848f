"""Segmentation probe on frozen patch grids, in the style of DINOv2ForRadiology's ``segmentation.py``.

A head of :mod:`dae.models.seg_heads` (``"linear"``: 1x1 convolution and bilinear upsampling; ``"unet"``: a small
up-sampling decoder) is trained on the last block's patch grid of a frozen 2D :class:`FeatureExtractor`.

Protocol (:func:`run_seg_probe`): one head per learning rate is trained simultaneously on the training set
with MONAI's ``DiceCELoss`` (softmax, one-hot targets) in float32, SGD with momentum 0.9 (or AdamW) and a
per-iteration cosine schedule to 0; the learning rate is chosen on the validation set's mean foreground
Dice only; a fresh head with that rate is trained on train + val and scored once on the test set.
:meth:`SegProbeResult.rows` gives the report rows and :func:`seg_probe_picture` the test overlays.

Dice and IoU are the project's one Dice (:func:`dae.evaluation.metrics.dice_iou_per_case`): per image and class,
averaged over the images where the class is present in the label or the prediction, then over the foreground
classes (background excluded), as :func:`dae.evaluation.metrics.dice_iou`. Batches are dicts (``image_key``,
``label_key``) or ``(image, label)`` tuples with images ``[B, C, H, W]`` and integer labels ``[B, 1, H, W]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn

from dae.engine.step import backward_step
from dae.evaluation.features import FeatureExtractor, unpack_batch
from dae.evaluation.seg_metrics import dice_iou_from_counts, overlap_counts
from dae.models.seg_heads import DECODERS, build_seg_head
from dae.utils.pictures import overlay_rows
from dae.utils.precision import amp_dtype
from dae.utils.tensors import autocast, plain_tensor

__all__ = ["SegProbeResult", "first_samples", "run_seg_probe", "seg_probe_picture"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("sgd", "adamw")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SegProbeResult:
    """Outcome of :func:`run_seg_probe`.

    Attributes:
        decoder: ``"linear"`` or ``"unet"``.
        learning_rate: the rate chosen on validation (the only one when a single rate was given).
        val_dice: mean foreground validation Dice of each rate's head trained on the training set (empty when
            a single rate was given, as nothing is selected).
        test: ``{"dice": {"macro": ..., <class>: ...}, "iou": {...}}`` of the final head on the test set,
            foreground classes only.
        train_losses: mean loss per epoch of the final head (trained on train + val).
        head: the final head.
    """

    decoder: str
    learning_rate: float
    val_dice: dict[float, float]
    test: dict[str, dict[str, float]]
    train_losses: list[float] = field(default_factory=list)
    head: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        """The results without the head, JSON-serialisable (learning rates as strings)."""
        return {
            "decoder": self.decoder,
            "learning_rate": self.learning_rate,
            "val_dice": {f"{lr:g}": value for lr, value in self.val_dice.items()},
            "test": self.test,
            "train_losses": list(self.train_losses),
        }

    def rows(self) -> list[dict[str, Any]]:
        """Report rows: mean foreground Dice, then IoU, with the per-class values.

        Each row has ``protocol`` ``"seg_probe"``, ``setting`` ``"<decoder>:lr=<rate>"``, ``metric`` ``"dice"``
        or ``"iou"``, ``value`` (the mean over the foreground classes), ``per_class`` and, when a rate was
        chosen, ``val_dice``: its validation Dice.
        """
        rows = []
        for metric in ("dice", "iou"):
            per_class = dict(self.test[metric])
            row: dict[str, Any] = {
                "protocol": "seg_probe",
                "setting": f"{self.decoder}:lr={self.learning_rate:g}",
                "metric": metric,
                "value": per_class.pop("macro"),
                "per_class": per_class,
            }
            if self.val_dice:
                row["val_dice"] = self.val_dice[self.learning_rate]
            rows.append(row)
        return rows


def _labels(raw: Any, num_classes: int) -> torch.Tensor:
    label = plain_tensor(raw)
    if label.ndim == 3:
        label = label[:, None]
    if label.ndim != 4 or label.shape[1] != 1:
        raise ValueError(f"labels must be [B, 1, H, W] class indices, got shape {tuple(label.shape)}")
    label = label.long()
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(label.min())}, {int(label.max())}]"
        )
    return label


class _GridSource:
    """(patch grid, label) batches, either computed from loaders on the fly or served from a cache."""

    def __init__(
        self,
        grids: Callable[[torch.Tensor], torch.Tensor],
        loaders: Sequence[Iterable[Any]],
        keys: tuple[str, str],
        num_classes: int,
        cache: bool,
        batch_size: int,
    ) -> None:
        self._grids, self._loaders, self._keys = grids, list(loaders), keys
        self.num_classes, self.batch_size = num_classes, batch_size
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None
        if cache:
            pairs = [(grid.cpu(), label) for grid, label in self._stream()]
            labels = torch.cat([lab for _, lab in pairs])
            if num_classes <= 256:
                labels = labels.to(torch.uint8)  # 8x less memory; widened again per batch
            self.cached = (torch.cat([g for g, _ in pairs]), labels)

    def _stream(self) -> Iterator[Batch]:
        for batch in chain.from_iterable(self._loaders):
            images, labels = unpack_batch(batch, *self._keys)
            if labels is None:
                raise ValueError("the segmentation probe needs labels in every batch")
            yield self._grids(plain_tensor(images)), _labels(labels, self.num_classes)

    def __len__(self) -> int:
        if self.cached is not None:
            return math.ceil(self.cached[0].shape[0] / self.batch_size)
        return sum(len(loader) for loader in self._loaders)

    def batches(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """One pass; cached samples are shuffled with ``generator`` when given (loaders shuffle themselves)."""
        if self.cached is None:
            yield from self._stream()
            return
        grids, labels = self.cached
        n = grids.shape[0]
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield grids[index], labels[index]

    def merged(self, other: _GridSource) -> _GridSource:
        """This source followed by ``other`` (train + val)."""
        merged = _GridSource(
            self._grids, self._loaders + other._loaders, self._keys, self.num_classes, False, self.batch_size
        )
        if self.cached is not None and other.cached is not None:
            merged.cached = tuple(torch.cat(pair) for pair in zip(self.cached, other.cached))
        return merged


def _train_heads(
    make_head: Callable[[], nn.Module],
    learning_rates: Sequence[float],
    source: _GridSource,
    epochs: int,
    optimizer: str,
    weight_decay: float,
    device: torch.device,
    seed: int,
) -> tuple[list[nn.Module], list[float]]:
    """Train one head per learning rate on the same batches; returns the heads and the first head's epoch losses."""
    heads = []
    for _ in learning_rates:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads.append(make_head().to(device).train())
    groups = [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, learning_rates)]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(source)), eta_min=0.0)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for grid, label in source.batches(generator):
            grid, label = grid.to(device, torch.float32), label.to(device, torch.long)
            losses = [loss_fn(head(grid, label.shape[-2:]), label) for head in heads]
            backward_step(torch.stack(losses).sum(), opt)
            schedule.step()
            total += losses[0].item()
            steps += 1
        epoch_losses.append(total / max(steps, 1))
        logger.debug("seg probe epoch %d/%d: loss %.4f", epoch + 1, epochs, epoch_losses[-1])
    return heads, epoch_losses


@torch.no_grad()
def _score(
    heads: Sequence[nn.Module], source: _GridSource, class_names: Sequence[str], device: torch.device
) -> list[dict[str, dict[str, float]]]:
    """Dice and IoU of each head on ``source``, from the overlap counts of every image."""
    counts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in heads]
    for head in heads:
        head.eval()
    for grid, label in source.batches():
        grid, label = grid.to(device, torch.float32), label.to(device, torch.long)
        for head, head_counts in zip(heads, counts):
            pred = head(grid, label.shape[-2:]).argmax(dim=1)
            head_counts.append(overlap_counts(pred, label[:, 0], len(class_names)))
    return [
        dice_iou_from_counts(torch.cat([i for i, _ in c]), torch.cat([t for _, t in c]), class_names) for c in counts
    ]


def run_seg_probe(
    extractor: FeatureExtractor,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    test_loader: Iterable[Any],
    num_classes: int,
    decoder: str = "linear",
    learning_rates: Sequence[float] = (1e-4, 1e-3, 1e-2),
    epochs: int = 10,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    cache_features: bool = True,
    class_names: Sequence[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device = "cpu",
    amp: str = "none",
    seed: int = 0,
) -> SegProbeResult:
    """Train and evaluate a segmentation head on the frozen patch grids of ``extractor``.

    The extractor runs in eval mode without gradients (under ``amp`` autocast); heads and
    losses are float32. With ``cache_features`` every split's grids are computed once and kept in CPU memory
    (D x h x w float32 per image, about 4.2 MB for RAD-DINO at 518 px; images of one size per split), and
    training batches of ``batch_size`` are reshuffled each epoch; turn it off when the training loader augments,
    so each epoch sees new views (the loader then does the batching and must have a ``len``).

    Args:
        extractor: a 2D feature extractor (its ``patch_grid`` is used).
        train_loader: training batches.
        val_loader: validation batches, used only to choose the learning rate, then added to training.
        test_loader: test batches, used once at the end.
        num_classes: classes including background (label 0).
        decoder: ``"linear"`` or ``"unet"`` (:data:`~dae.models.seg_heads.DECODERS`).
        learning_rates: candidate rates; one head each is trained in parallel.
        epochs: passes over the training data, for both phases.
        optimizer: ``"sgd"`` (momentum 0.9, as DINOv2ForRadiology) or ``"adamw"``.
        weight_decay: weight decay of the head (0 in DINOv2ForRadiology).
        batch_size: batch size with cached features; default the training loader's ``batch_size`` (else 8).
        cache_features: compute the grids once (no augmentation) instead of every epoch.
        class_names: names of the ``num_classes`` classes (default ``class_<i>``).
        image_key: key of the images in dict batches.
        label_key: key of the labels in dict batches.
        device: where the extractor and heads run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast of the extractor.
        seed: seed of the head initialisation (the same for every rate) and of the shuffling.

    Returns:
        The :class:`SegProbeResult`.

    Raises:
        ValueError: for a 3D extractor, an unknown decoder, optimizer or ``amp``, no learning rate, ``epochs < 1``,
            ``num_classes < 2``, wrong class names, labels out of range, or a validation set without any
            foreground to select on.
    """
    if extractor.spatial_dims != 2:
        raise ValueError("the segmentation probe needs a 2D extractor")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {_OPTIMIZERS}")
    if not learning_rates or epochs < 1 or num_classes < 2:
        raise ValueError("need at least one learning rate, epochs >= 1 and num_classes >= 2 (background included)")
    names = list(class_names) if class_names else [f"class_{c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    device, dtype = torch.device(device), amp_dtype(amp)
    extractor.to(device).eval()

    @torch.no_grad()
    def grids(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return extractor(images.to(device))["patch_grid"].float()

    def make_head() -> nn.Module:
        return build_seg_head(decoder, extractor.embed_dim, num_classes, extractor.patch_size)

    size = batch_size or getattr(train_loader, "batch_size", None) or 8
    keys = (image_key, label_key)
    train = _GridSource(grids, [train_loader], keys, num_classes, cache_features, size)
    val = _GridSource(grids, [val_loader], keys, num_classes, cache_features, size)
    fit = (epochs, optimizer, weight_decay, device, seed)

    val_dice: dict[float, float] = {}
    chosen = float(learning_rates[0])
    if len(learning_rates) > 1:
        heads, _ = _train_heads(make_head, learning_rates, train, *fit)
        for lr, scores in zip(learning_rates, _score(heads, val, names, device)):
            val_dice[float(lr)] = scores["dice"]["macro"]
            logger.info("seg probe (%s) lr %g: validation mean Dice %.4f", decoder, lr, val_dice[float(lr)])
        if all(math.isnan(v) for v in val_dice.values()):
            raise ValueError("no foreground class in the validation labels or predictions: cannot choose a rate")
        chosen = max(val_dice, key=lambda lr: -math.inf if math.isnan(val_dice[lr]) else val_dice[lr])

    (head,), losses = _train_heads(make_head, [chosen], train.merged(val), *fit)
    test = _GridSource(grids, [test_loader], keys, num_classes, cache_features, size)
    (scores,) = _score([head], test, names, device)
    logger.info(
        "seg probe (%s) lr %g on train+val: test mean Dice %.4f, IoU %.4f",
        decoder,
        chosen,
        scores["dice"]["macro"],
        scores["iou"]["macro"],
    )
    return SegProbeResult(decoder, chosen, val_dice, scores, losses, head.cpu())


def first_samples(
    loader: Iterable[Any], n: int, image_key: str, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images ``[n, C, H, W]`` and labels ``[n, 1, H, W]`` of a loader (for pictures).

    Raises:
        ValueError: for labels that are not ``[B, 1, H, W]`` class indices in ``[0, num_classes)``.
    """
    images, labels = [], []
    for batch in loader:
        image, label = unpack_batch(batch, image_key, label_key)
        images.append(plain_tensor(image).float())
        labels.append(_labels(label, num_classes))
        if sum(len(i) for i in images) >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


@torch.no_grad()
def seg_probe_picture(
    extractor: FeatureExtractor,
    result: SegProbeResult,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    device: str | torch.device = "cpu",
    amp: str = "none",
) -> torch.Tensor:
    """The final head's test predictions as a picture: one row per image, ground truth left, prediction right.

    Args:
        extractor: the extractor the probe was trained on.
        result: the probe's result (its ``head`` is used).
        images: ``[N, C, H, W]`` images, e.g. from :func:`first_samples`.
        labels: ``[N, 1, H, W]`` integer labels.
        class_names: the names of all classes (their number fixes the colours).
        device: where the extractor and head run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast of the extractor.

    Returns:
        A ``(3, H', W')`` picture in [0, 1] (:func:`dae.utils.pictures.overlay_rows`).

    Raises:
        ValueError: when the result has no head.
    """
    if result.head is None:
        raise ValueError("the probe result has no head to draw predictions with")
    device = torch.device(device)
    head = result.head.to(device).eval()
    with autocast(device, amp_dtype(amp)):
        grid = extractor.to(device).eval()(images.to(device))["patch_grid"]
    preds = head(grid.float(), labels.shape[-2:]).argmax(dim=1).cpu()
    result.head.cpu()
    return overlay_rows(images.cpu(), labels[:, 0].cpu(), preds, num_classes=len(class_names))
