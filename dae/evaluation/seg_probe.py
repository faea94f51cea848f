"""Segmentation probe on frozen patch grids, in the style of DINOv2ForRadiology's ``segmentation.py``.

A small head is trained on the last block's patch grid of a frozen 2D :class:`FeatureExtractor`:

``"linear"`` (:class:`LinearSegHead`)
    a 1x1 convolution (weights N(0, 0.01), zero bias) followed by bilinear upsampling to the image size;
``"unet"`` (:class:`UNetSegHead`)
    a small up-sampling decoder (transposed convolutions and conv-BN-ReLU blocks) on the same grid.

Protocol (:func:`run_seg_probe`): one head per learning rate is trained simultaneously on the training set
with MONAI's ``DiceCELoss`` (softmax, one-hot targets) in float32, SGD with momentum 0.9 (or AdamW) and a
per-iteration cosine schedule to 0; the learning rate is chosen on the validation set's mean foreground
Dice only; a fresh head with that rate is trained on train + val and scored once on the test set.

Dice and IoU are computed per image and class and averaged over the images where the class is present in
the label or the prediction, then over the foreground classes (background excluded), the definition of
:func:`dae.evaluation.metrics.dice_iou`. Batches are dicts (``image_key``, ``label_key``) or ``(image,
label)`` tuples with images ``[B, C, H, W]`` and integer labels ``[B, 1, H, W]``.

:func:`evaluate_seg_probe` runs the protocol for several backbones (specs as in
:func:`dae.evaluation.runner.evaluate_backbones`) and writes one results table with overlay pictures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from dae.evaluation.features import FeatureExtractor, unpack_batch
from dae.evaluation.metrics import dice_iou_from_counts, overlap_counts
from dae.evaluation.report import format_table, save_figure, write_results
from dae.evaluation.runner import SPLITS, adapted_extractor
from dae.utils.tensors import autocast, min_max, plain_tensor

__all__ = ["DECODERS", "LinearSegHead", "SegProbeResult", "UNetSegHead", "evaluate_seg_probe", "run_seg_probe"]

logger = logging.getLogger(__name__)

DECODERS = ("linear", "unet")
_OPTIMIZERS = ("sgd", "adamw")

Batch = tuple[torch.Tensor, torch.Tensor]


class LinearSegHead(nn.Module):
    """1x1 convolution on the patch grid, then bilinear upsampling of the logits to the image size.

    Args:
        in_dim: channels of the patch grid (the extractor's ``embed_dim``).
        num_classes: output classes, background included.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, num_classes, *size]`` of a grid ``[B, in_dim, h, w]``."""
        return F.interpolate(self.conv(grid), size=tuple(size), mode="bilinear", align_corners=False)


class UNetSegHead(nn.Module):
    """A small up-sampling decoder on the last patch grid (U-Net-like, without skips: there is one grid).

    Each of ``num_up_blocks`` blocks doubles the resolution with ``ConvTranspose2d(k=2, s=2)`` and refines with
    ``Conv3x3 + BatchNorm + ReLU``; widths go ``hidden_dim, hidden_dim / 2, ...`` (at least ``min_dim``). A 1x1
    convolution gives the logits, bilinearly resized to the image size (exact for patch sizes that are powers
    of two with ``log2(patch)`` blocks; otherwise the last factor, e.g. 14 / 8, is interpolated). With the
    defaults it has about 0.44 M parameters on a ViT-S grid (D = 384), 0.63 M on ViT-B (D = 768).

    Args:
        in_dim: channels of the patch grid.
        num_classes: output classes, background included.
        num_up_blocks: number of x2 up-sampling blocks.
        hidden_dim: width after the first block.
        min_dim: smallest width.

    Raises:
        ValueError: for ``num_up_blocks < 1``.
    """

    def __init__(
        self, in_dim: int, num_classes: int, num_up_blocks: int = 4, hidden_dim: int = 128, min_dim: int = 16
    ) -> None:
        super().__init__()
        if num_up_blocks < 1:
            raise ValueError(f"num_up_blocks must be >= 1, got {num_up_blocks}")
        blocks: list[nn.Module] = []
        width = in_dim
        for index in range(num_up_blocks):
            out = max(hidden_dim // 2**index, min_dim)
            blocks.append(
                nn.Sequential(
                    nn.ConvTranspose2d(width, out, kernel_size=2, stride=2),
                    nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, num_classes, *size]`` of a grid ``[B, in_dim, h, w]``."""
        logits = self.classifier(self.blocks(grid))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


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


class _DiceIoU:
    """Accumulates :func:`~dae.evaluation.metrics.overlap_counts` over batches; reduced like ``dice_iou``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.intersections: list[torch.Tensor] = []
        self.totals: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of label maps ``[B, ...]`` (the same shape, values in ``[0, num_classes)``)."""
        intersections, totals = overlap_counts(pred, target, self.num_classes)
        self.intersections.append(intersections)
        self.totals.append(totals)

    def compute(self, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{"dice": {"macro", <class>...}, "iou": {...}}`` over the foreground classes."""
        return dice_iou_from_counts(torch.cat(self.intersections), torch.cat(self.totals), class_names)


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
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            opt.step()
            schedule.step()
            total += losses[0].item()
            steps += 1
        epoch_losses.append(total / max(steps, 1))
        logger.debug("seg probe epoch %d/%d: loss %.4f", epoch + 1, epochs, epoch_losses[-1])
    return heads, epoch_losses


@torch.no_grad()
def _score(
    heads: Sequence[nn.Module], source: _GridSource, num_classes: int, class_names: Sequence[str], device: torch.device
) -> list[dict[str, dict[str, float]]]:
    meters = [_DiceIoU(num_classes) for _ in heads]
    for head in heads:
        head.eval()
    for grid, label in source.batches():
        grid, label = grid.to(device, torch.float32), label.to(device, torch.long)
        for head, meter in zip(heads, meters):
            meter.update(head(grid, label.shape[-2:]).argmax(dim=1), label[:, 0])
    return [meter.compute(class_names) for meter in meters]


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
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> SegProbeResult:
    """Train and evaluate a segmentation head on the frozen patch grids of ``extractor``.

    The extractor runs in eval mode without gradients (under ``amp_dtype`` autocast if given); heads and
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
        decoder: ``"linear"`` or ``"unet"``.
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
        amp_dtype: autocast dtype for the extractor, or None.
        seed: seed of the head initialisation (the same for every rate) and of the shuffling.

    Returns:
        The :class:`SegProbeResult`.

    Raises:
        ValueError: for a 3D extractor, an unknown decoder or optimizer, no learning rate, ``epochs < 1``,
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
    device = torch.device(device)
    extractor.to(device).eval()

    @torch.no_grad()
    def grids(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return extractor(images.to(device))["patch_grid"].float()

    def make_head() -> nn.Module:
        if decoder == "linear":
            return LinearSegHead(extractor.embed_dim, num_classes)
        num_up = min(4, max(1, int(math.log2(extractor.patch_size))))
        return UNetSegHead(extractor.embed_dim, num_classes, num_up_blocks=num_up)

    size = batch_size or getattr(train_loader, "batch_size", None) or 8
    keys = (image_key, label_key)
    train = _GridSource(grids, [train_loader], keys, num_classes, cache_features, size)
    val = _GridSource(grids, [val_loader], keys, num_classes, cache_features, size)
    fit = (epochs, optimizer, weight_decay, device, seed)

    val_dice: dict[float, float] = {}
    chosen = float(learning_rates[0])
    if len(learning_rates) > 1:
        heads, _ = _train_heads(make_head, learning_rates, train, *fit)
        for lr, scores in zip(learning_rates, _score(heads, val, num_classes, names, device)):
            val_dice[float(lr)] = scores["dice"]["macro"]
            logger.info("seg probe (%s) lr %g: validation mean Dice %.4f", decoder, lr, val_dice[float(lr)])
        if all(math.isnan(v) for v in val_dice.values()):
            raise ValueError("no foreground class in the validation labels or predictions: cannot choose a rate")
        chosen = max(val_dice, key=lambda lr: -math.inf if math.isnan(val_dice[lr]) else val_dice[lr])

    (head,), losses = _train_heads(make_head, [chosen], train.merged(val), *fit)
    test = _GridSource(grids, [test_loader], keys, num_classes, cache_features, size)
    (scores,) = _score([head], test, num_classes, names, device)
    logger.info(
        "seg probe (%s) lr %g on train+val: test mean Dice %.4f, IoU %.4f",
        decoder,
        chosen,
        scores["dice"]["macro"],
        scores["iou"]["macro"],
    )
    return SegProbeResult(decoder, chosen, val_dice, scores, losses, head.cpu())


def _result_rows(result: SegProbeResult) -> list[dict[str, Any]]:
    """Report rows of one backbone's probe: mean foreground Dice, then IoU, with the per-class values."""
    rows = []
    for metric in ("dice", "iou"):
        per_class = dict(result.test[metric])
        row: dict[str, Any] = {
            "protocol": "seg_probe",
            "setting": f"{result.decoder}:lr={result.learning_rate:g}",
            "metric": metric,
            "value": per_class.pop("macro"),
            "per_class": per_class,
        }
        if result.val_dice:
            row["val_dice"] = result.val_dice[result.learning_rate]
        rows.append(row)
    return rows


def _first_samples(
    loader: Iterable[Any], n: int, image_key: str, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images ``[n, C, H, W]`` and labels ``[n, 1, H, W]`` of a loader."""
    images, labels = [], []
    for batch in loader:
        image, label = unpack_batch(batch, image_key, label_key)
        images.append(plain_tensor(image).float())
        labels.append(_labels(label, num_classes))
        if sum(len(i) for i in images) >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def _class_colours(num_classes: int) -> list[tuple[float, float, float]]:
    """One colour per class (tab10, then tab20 for more classes; repeated beyond 20)."""
    colours = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"].colors
    return [tuple(colours[(c - 1) % len(colours)]) for c in range(num_classes)]


@torch.no_grad()
def _overlay_figure(
    model: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    title: str,
) -> Figure:
    """Rows of (image, ground truth overlaid, prediction overlaid) with each image's mean foreground Dice."""
    head = head.to(device).eval()
    with autocast(device, amp_dtype):
        grid = model(images.to(device))["patch_grid"]
    preds = head(grid.float(), labels.shape[-2:]).argmax(dim=1).cpu()
    colours = _class_colours(len(class_names))

    def overlay(mask: torch.Tensor) -> np.ndarray:
        rgba = np.zeros((*mask.shape, 4))
        for c in range(1, len(class_names)):
            rgba[mask.numpy() == c] = (*colours[c], 0.5)
        return rgba

    fig = Figure(figsize=(6.6, 2.2 * len(images) + 0.8))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, label, pred) in enumerate(zip(images, labels[:, 0], preds)):
        grey = min_max(image.mean(dim=0))
        meter = _DiceIoU(len(class_names))
        meter.update(pred[None], label[None])
        dice = meter.compute(class_names)["dice"]["macro"]
        panels = (("image", None), ("ground truth", label), (f"prediction (Dice {dice:.2f})", pred))
        for ax, (name, mask) in zip(axes[row], panels):
            ax.imshow(grey.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            if mask is not None:
                ax.imshow(overlay(mask))
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    handles = [Patch(color=colours[c], alpha=0.5, label=class_names[c]) for c in range(1, len(class_names))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
    return fig


def evaluate_seg_probe(
    backbones: Mapping[str, Mapping[str, Any]],
    loaders: Mapping[str, Iterable[Any]],
    output_dir: str | Path,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    decoder: str = "linear",
    learning_rates: Sequence[float] = (1e-4, 1e-3, 1e-2),
    epochs: int = 10,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    image_key: str = "image",
    label_key: str = "label",
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    pictures: int = 4,
) -> list[dict[str, Any]]:
    """Run :func:`run_seg_probe` for every backbone and write ``results.{csv,json,md}`` and pictures to ``output_dir``.

    Each backbone's extractor gets its input adapter (:class:`~dae.evaluation.runner.BackboneInput`: resize to
    ``input_size``, grey to its channels, ``mean`` / ``std``), then the probe chooses the learning rate on the
    validation split, retrains on training + validation and scores the test split once. Pictures (PNG files
    ``pictures/<backbone>_seg_probe.png`` and TensorBoard under ``tensorboard/``): the first ``pictures`` test
    images with the ground truth and the prediction overlaid; TensorBoard also gets the final head's training loss.

    Args:
        backbones: name -> extractor spec (see :func:`~dae.evaluation.features.build_extractor`), plus optional
            ``input_size``, ``mean`` and ``std``; 2D extractors with patch tokens or feature maps.
        loaders: ``training``, ``validation`` and ``test`` loaders of ``[B, 1 or 3, H, W]`` images in [0, 1] with
            integer label maps ``[B, 1, H, W]`` (one image size per split); not shuffled.
        output_dir: where results and pictures go.
        num_classes: classes including background (label 0).
        class_names: names of the ``num_classes`` classes (default ``class_<i>``).
        decoder: ``"linear"`` or ``"unet"`` (see :data:`DECODERS`).
        learning_rates: candidate rates, chosen on validation.
        epochs: passes over the training data, for both phases.
        optimizer: ``"sgd"`` or ``"adamw"``.
        weight_decay: weight decay of the head.
        image_key / label_key: batch keys.
        device: where the extractors and heads run.
        amp_dtype: autocast dtype for the extractors, or None.
        seed: seed of the head initialisation and of the shuffling.
        pictures: test images shown per backbone (0: no pictures).

    Returns:
        The result rows (``backbone``, ``protocol`` ``"seg_probe"``, ``setting`` ``"<decoder>:lr=<rate>"``,
        ``metric`` ``"dice"`` or ``"iou"`` (mean over the foreground classes), ``value``, ``per_class`` and, when
        a rate was chosen, ``val_dice``: its validation Dice).

    Raises:
        ValueError: for a missing split, wrong class names, or any error of :func:`run_seg_probe`.
    """
    missing = [s for s in SPLITS if s not in loaders]
    if missing:
        raise ValueError(f"the segmentation probe needs the {list(SPLITS)} splits; missing {missing}")
    names = list(class_names) if class_names else [f"class_{c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    out = Path(output_dir)
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        for name, full_spec in backbones.items():
            model = adapted_extractor(full_spec)
            logger.info("backbone %s: %s", name, dict(full_spec))
            result = run_seg_probe(
                model,
                loaders["training"],
                loaders["validation"],
                loaders["test"],
                num_classes,
                decoder=decoder,
                learning_rates=learning_rates,
                epochs=epochs,
                optimizer=optimizer,
                weight_decay=weight_decay,
                class_names=names,
                image_key=image_key,
                label_key=label_key,
                device=device,
                amp_dtype=amp_dtype,
                seed=seed,
            )
            rows += [{"backbone": name, **row} for row in _result_rows(result)]
            for epoch, loss in enumerate(result.train_losses, start=1):
                writer.add_scalar(f"{name}/seg_probe_train_loss", loss, epoch)
            if pictures > 0:
                images, labels = _first_samples(loaders["test"], pictures, image_key, label_key, num_classes)
                figure = _overlay_figure(model, result.head, images, labels, names, device, amp_dtype, name)
                save_figure(figure, out / "pictures" / f"{name}_seg_probe.png")
                writer.add_figure(f"{name}/seg_probe_test", figure)
    finally:
        writer.close()
    paths = write_results(rows, out, "results")
    logger.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    print(format_table(rows))
    return rows
