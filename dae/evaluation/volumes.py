"""Whole-volume segmentation evaluation: sliding-window inference, per-class Dice and HD95, tables, overlays.

:func:`evaluate_segmentation` segments and scores every volume of a loader, :func:`summarise_cases` averages
the cases and :func:`write_tables` writes them. Two entry points put them together:
:class:`SegmentationEvaluator` validates inside :class:`~dae.engine.segmentation.SegmentationTrainer`, and
:func:`run_evaluation` scores a fine-tuned checkpoint (the bundles' ``evaluate.yaml``).

Dice is the project's one Dice (:func:`dae.evaluation.metrics.dice_iou_per_case`): per case and foreground
class, NaN where the class is absent from both the label and the prediction (left out of the means), 0 where
it is predicted but absent from the label. HD95 is reported per class as computed (NaN where the class is
absent from the label or the prediction) and averaged two ways: ``mean_hd95`` over the finite values only,
and ``mean_hd95_penalised`` with a missed or false-positive class counted as the image diagonal
(:func:`dae.evaluation.seg_metrics.penalised_hd95`), so that models missing different classes compare.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.data.utils import affine_to_spacing
from monai.metrics import compute_hausdorff_distance
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from dae.evaluation.report import format_table, write_results, write_summary
from dae.evaluation.seg_metrics import (
    dice_iou_per_case,
    image_diagonal,
    mean_per_class,
    overlap_counts,
    penalised_hd95,
)
from dae.models.pretrained import load_model_weights
from dae.utils.dist import get_world_size, is_distributed, is_main_process
from dae.utils.pictures import label_overlay
from dae.utils.precision import amp_dtype
from dae.utils.tensors import autocast, plain_tensor

if TYPE_CHECKING:
    from dae.data.test_sets import TestSet

__all__ = ["SegmentationEvaluator", "evaluate_segmentation", "run_evaluation", "summarise_cases", "write_tables"]

Inferer = Callable[[torch.Tensor, nn.Module], torch.Tensor]


def _case_name(batch: dict[str, Any], key: str) -> str:
    meta = getattr(batch[key], "meta", {})
    name = meta.get("filename_or_obj", ["case"])
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def _hd95(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: list[float] | None
) -> tuple[list[float], list[float]]:
    """HD95 in mm of each foreground class of one case (``[1, X, Y, Z]`` maps), raw and penalised.

    Returns:
        ``(raw, penalised)``: NaN where a side is empty, and :func:`~dae.evaluation.seg_metrics.penalised_hd95`
        with the diagonal of this grid.
    """
    pred_onehot = F.one_hot(pred, num_classes).movedim(-1, 1)
    label_onehot = F.one_hot(label, num_classes).movedim(-1, 1)
    with warnings.catch_warnings():  # absent classes warn; they are NaN here by design
        warnings.simplefilter("ignore", UserWarning)
        dist = compute_hausdorff_distance(
            pred_onehot, label_onehot, include_background=False, percentile=95, spacing=spacing
        )[0]
    raw = [float(d) if math.isfinite(float(d)) else math.nan for d in dist.cpu()]
    in_pred, in_label = (onehot[0, 1:].flatten(1).any(dim=1).tolist() for onehot in (pred_onehot, label_onehot))
    return raw, penalised_hd95(raw, in_pred, in_label, image_diagonal(pred.shape[1:], spacing))


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    inferer: Inferer,
    num_classes: int,
    device: str | torch.device,
    amp: str = "none",
    hd95: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    picture_case: int = 0,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Segment every volume of ``loader`` whole and score it against its label.

    Dice (the one Dice of :func:`~dae.evaluation.metrics.dice_iou_per_case`) and the 95th-percentile
    Hausdorff distance (in mm, from the image's spacing; MONAI's) are computed per foreground class on the
    grid the loader delivers. HD95 is NaN when the class is absent from the label or the prediction; its
    penalised form (for ``mean_hd95_penalised``) counts a class present on one side only as the diagonal of
    that grid (from its shape and the image's spacing), and a class absent from both as NaN. Under DDP
    each rank evaluates its shard and the cases of all ranks are returned on every rank (duplicates added by a
    padding sampler removed).

    Args:
        model: network mapping (B, C_in, X, Y, Z) to (B, num_classes, X, Y, Z) logits.
        loader: yields one volume per batch with ``image_key`` and ``label_key`` (B=1).
        inferer: e.g. ``monai.inferers.SlidingWindowInferer``; called as ``inferer(images, model)``.
        num_classes: output channels including background.
        device: where to run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast of the inference.
        hd95: also compute HD95 (slower).
        image_key: batch key of the image.
        label_key: batch key of the integer label map (B, 1, X, Y, Z).
        picture_case: index (on this rank) of the case drawn as an overlay picture; -1 for none.

    Returns:
        Per-case records ``{"case", "dice": [num_classes - 1], "hd95": [...], "hd95_penalised": [...]}`` (HD95
        keys only with ``hd95``) and the overlay picture of ``picture_case`` (3, H, W), or None.
    """
    device, dtype = torch.device(device), amp_dtype(amp)
    model.eval()
    cases: list[dict[str, Any]] = []
    picture = None
    for i, batch in enumerate(loader):
        image = batch[image_key]
        affine = getattr(image, "affine", None)
        spacing = None if affine is None else affine_to_spacing(affine[0] if affine.ndim == 3 else affine, r=3).tolist()
        images = plain_tensor(image).to(device).float()
        labels = plain_tensor(batch[label_key]).to(device).long()[:, 0].clamp(0, num_classes - 1)
        with autocast(device, dtype):
            logits = inferer(images, model)
        pred = logits.float().argmax(dim=1)
        dice, _ = dice_iou_per_case(*overlap_counts(pred, labels, num_classes))
        record: dict[str, Any] = {"case": _case_name(batch, image_key), "dice": dice[0, 1:].tolist()}
        if hd95:
            record["hd95"], record["hd95_penalised"] = _hd95(pred, labels, num_classes, spacing)
        cases.append(record)
        if i == picture_case:
            picture = label_overlay(images[0], labels[0], pred[0], num_classes=num_classes)
    if is_distributed():
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(get_world_size())]
        torch.distributed.all_gather_object(gathered, cases)
        unique = {c["case"]: c for rank_cases in gathered for c in rank_cases}
        cases = list(unique.values())
    return cases, picture


def summarise_cases(cases: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """Mean per class over the cases where defined (NaNs skipped) and the mean over classes.

    ``mean_hd95`` averages only the finite HD95 values, so a class never predicted does not count against a
    model; ``mean_hd95_penalised`` averages the same way the penalised values (a class missed in a case, or
    predicted where the label has none, counts as the image diagonal; absent from both: skipped), which
    compares models that miss different classes.

    Args:
        cases: records from :func:`evaluate_segmentation`.
        class_names: names of the foreground classes (background excluded), in label order.

    Returns:
        ``{"dice/<class>", "mean_dice", "hd95/<class>", "mean_hd95", "mean_hd95_penalised"}`` (HD95 keys only
        when computed).
    """
    summary: dict[str, float] = {}
    for metric in ("dice", "hd95"):
        if not cases or metric not in cases[0]:
            continue
        values = [c[metric] for c in cases]
        if len(values[0]) != len(class_names):
            raise ValueError(f"{len(values[0])} {metric} values per case but {len(class_names)} class names")
        per_class, mean = mean_per_class(values)
        summary.update({f"{metric}/{name}": value for name, value in zip(class_names, per_class)})
        summary[f"mean_{metric}"] = mean
    if cases and "hd95_penalised" in cases[0]:
        summary["mean_hd95_penalised"] = mean_per_class([c["hd95_penalised"] for c in cases])[1]
    return summary


def write_tables(
    cases: Sequence[dict[str, Any]],
    summary: dict[str, float],
    class_names: Sequence[str],
    out_dir: str | Path,
    about: Mapping[str, str] | None = None,
) -> Path:
    """Write the per-case table and the summary to ``out_dir``; returns ``out_dir``.

    ``per_case.{csv,json,md}`` hold one row per case and class (``case, class, dice[, hd95]``);
    ``summary.json`` the number of cases and the summary; ``summary.md`` a table of Dice (and HD95) per class
    and their mean, with the penalised HD95 mean and its definition when the summary has it. ``about`` (what
    was scored, e.g. ``{"test_set": ..., "note": ...}``) goes first in ``summary.json`` and as a list above the
    table of ``summary.md``.
    """
    out = Path(out_dir)
    with_hd95 = bool(cases) and "hd95" in cases[0]
    rows = []
    for case in cases:
        for i, name in enumerate(class_names):
            rows.append({"case": case["case"], "class": name, "dice": case["dice"][i]})
            if with_hd95:
                rows[-1]["hd95"] = case["hd95"][i]
    write_results(rows, out, "per_case")
    keys = [(name, f"dice/{name}", f"hd95/{name}") for name in class_names] + [("**mean**", "mean_dice", "mean_hd95")]
    table = []
    for name, dice, hd in keys:
        table.append({"class": name, "Dice": summary.get(dice, math.nan)})
        if with_hd95:
            table[-1]["HD95 (mm)"] = f"{summary.get(hd, math.nan):.2f}"
    penalised = with_hd95 and "mean_hd95_penalised" in summary
    if penalised:
        table.append({"class": "**mean, penalised**", "Dice": None})
        table[-1]["HD95 (mm)"] = f"{summary['mean_hd95_penalised']:.2f}"
    about = dict(about or {})
    listed = "".join(f"- {key}: {value}\n" for key, value in about.items())
    markdown = f"Whole-volume evaluation of {len(cases)} cases\n\n" + (f"{listed}\n" if listed else "")
    markdown += f"{format_table(table, digits=4)}\n"
    if penalised:
        markdown += (
            "\nHD95 **mean** (`mean_hd95`): over the finite values only; **mean, penalised** (`mean_hd95_penalised`):"
            " a class missed in a case, or predicted where the label has none, counts as the image diagonal in mm,"
            " and a class absent from both is skipped.\n"
        )
    write_summary({**about, "num_cases": len(cases), **summary}, markdown, out)
    return out


class SegmentationEvaluator:
    """Whole-volume validation of a segmentation network, for :class:`~dae.engine.segmentation.SegmentationTrainer`.

    ``evaluator(model)`` runs :func:`evaluate_segmentation` on ``loader``, writes the tables to ``output_dir``
    on the main process (:func:`write_tables`) and returns the metrics (``mean_dice`` [``mean_hd95``,
    ``mean_hd95_penalised``] and ``dice/<class>`` [``hd95/<class>``]) and the pictures
    (``{"<tag_prefix>/label_vs_prediction": overlay}``).

    Args:
        loader: whole validation volumes with labels, one per batch (the trainer's ``val_loader``).
        inferer: sliding-window inferer.
        class_names: all class names, background first.
        output_dir: where the tables go, e.g. ``<run>/validation``.
        device: where to run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
        hd95: also compute HD95 (slower).
        image_key: batch key of the images.
        label_key: batch key of the label maps.
        tag_prefix: TensorBoard tag prefix of the picture ("val" in training, "eval" in run_evaluation).
        about: what is scored, written with the tables (:func:`write_tables`).

    Raises:
        ValueError: for fewer than two class names or an unknown ``amp``.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        inferer: Inferer,
        class_names: Sequence[str],
        output_dir: str | Path,
        device: str | torch.device = "cpu",
        amp: str = "none",
        hd95: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        tag_prefix: str = "val",
        about: Mapping[str, str] | None = None,
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"class_names must list the background and at least one class, got {class_names}")
        amp_dtype(amp)
        self.loader, self.inferer, self.class_names = loader, inferer, list(class_names)
        self.output_dir, self.device, self.amp, self.hd95 = Path(output_dir), torch.device(device), amp, hd95
        self.image_key, self.label_key, self.tag_prefix = image_key, label_key, tag_prefix
        self.about = dict(about or {})

    def __call__(self, model: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Evaluate ``model``; returns ``(metrics, pictures)``."""
        cases, picture = evaluate_segmentation(
            model,
            self.loader,
            self.inferer,
            len(self.class_names),
            self.device,
            amp=self.amp,
            hd95=self.hd95,
            image_key=self.image_key,
            label_key=self.label_key,
        )
        summary = summarise_cases(cases, self.class_names[1:])
        if is_main_process():
            write_tables(cases, summary, self.class_names[1:], self.output_dir, self.about)
        metrics = {k: v for k, v in summary.items() if k.startswith("mean_")}
        metrics.update({k: v for k, v in summary.items() if "/" in k})
        return metrics, {} if picture is None else {f"{self.tag_prefix}/label_vs_prediction": picture}


def run_evaluation(
    network: nn.Module,
    checkpoint: str | Path,
    loader: Iterable[dict[str, Any]],
    inferer: Inferer,
    class_names: Sequence[str],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    amp: str = "none",
    hd95: bool = True,
    test_set: TestSet | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint on whole volumes; write tables and TensorBoard; return the summary.

    Writes the tables of :func:`write_tables` to ``output_dir`` and, in ``output_dir/tensorboard``, the
    per-class scores and the overlay of the first case. With ``test_set``, ``summary.json`` and ``summary.md``
    name it (``test_set``, ``datalist``, ``split``) and carry its ``note`` when another list than the one asked
    for was scored.

    Args:
        network: the segmentation network (architecture of the checkpoint).
        checkpoint: fine-tuned weights, e.g. ``checkpoints/best.pt`` of a fine-tuning run.
        loader: whole volumes with labels, one per batch.
        inferer: sliding-window inferer.
        class_names: all class names, background first.
        output_dir: where the tables go.
        device: where to run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
        hd95: compute HD95 as well as Dice.
        test_set: the scored list (:func:`dae.data.load_test_set`), the volumes ``loader`` yields.
    """
    about = {}
    if test_set is not None:
        about = {"test_set": test_set.name, "datalist": test_set.datalist, "split": test_set.split}
        if test_set.note:
            about["note"] = test_set.note
    evaluator = SegmentationEvaluator(
        loader, inferer, class_names, output_dir, device=device, amp=amp, hd95=hd95, tag_prefix="eval", about=about
    )
    network = load_model_weights(network, checkpoint).to(evaluator.device)
    summary, pictures = evaluator(network)
    if is_main_process():
        out = evaluator.output_dir
        with SummaryWriter(str(out / "tensorboard")) as writer:
            for key, value in summary.items():
                writer.add_scalar(f"eval/{key}", value, 0)
            for tag, picture in pictures.items():
                writer.add_image(tag, picture, 0, dataformats="CHW")
        logging.getLogger(__name__).info("%s\n%s", checkpoint, (out / "summary.md").read_text())
    return summary
