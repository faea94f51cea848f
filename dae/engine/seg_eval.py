"""Whole-volume segmentation evaluation: sliding-window inference, per-class Dice and HD95, tables, overlays."""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import affine_to_spacing
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from dae.engine.trainer import AMP_DTYPES
from dae.utils.checkpoint import load_checkpoint
from dae.utils.dist import get_world_size, is_distributed, is_main_process
from dae.utils.state_dict import load_state_dict_with_report
from dae.utils.tensors import autocast, plain_tensor

__all__ = [
    "evaluate_segmentation",
    "label_overlay",
    "load_model_weights",
    "run_evaluation",
    "summarise_cases",
    "write_tables",
]

# Label colours for overlays (class 1, 2, ...), cycled for more classes.
_PALETTE = torch.tensor(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
        [170, 110, 40], [128, 0, 0], [170, 255, 195],
    ],
    dtype=torch.float32,
) / 255.0  # fmt: skip


def _case_name(batch: dict[str, Any], key: str) -> str:
    meta = getattr(batch[key], "meta", {})
    name = meta.get("filename_or_obj", ["case"])
    return str(name[0] if isinstance(name, (list, tuple)) else name)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    loader: DataLoader,
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    hd95: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    picture_case: int = 0,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Segment every volume of ``loader`` whole and score it against its label.

    Dice and the 95th-percentile Hausdorff distance (in mm, from the image's spacing) are computed per
    foreground class on the grid the loader delivers. A class absent from a case's label gets NaN for that
    case (MONAI's ``ignore_empty``), so it does not count in the means; HD95 is NaN when the class is absent
    from the label or the prediction. Under DDP each rank evaluates its shard and the cases of all ranks are
    returned on every rank (duplicates added by a padding sampler removed).

    Args:
        model: network mapping (B, C_in, X, Y, Z) to (B, num_classes, X, Y, Z) logits.
        loader: yields one volume per batch with ``image_key`` and ``label_key`` (B=1).
        inferer: e.g. ``monai.inferers.SlidingWindowInferer``; called as ``inferer(images, model)``.
        num_classes: output channels including background.
        device: where to run.
        amp_dtype: autocast dtype, or None.
        hd95: also compute HD95 (slower).
        image_key: batch key of the image.
        label_key: batch key of the integer label map (B, 1, X, Y, Z).
        picture_case: index (on this rank) of the case drawn as an overlay picture; -1 for none.

    Returns:
        Per-case records ``{"case", "dice": [num_classes - 1], "hd95": [...]}`` and the overlay picture of
        ``picture_case`` (3, H, W), or None.
    """
    model.eval()
    cases: list[dict[str, Any]] = []
    picture = None
    for i, batch in enumerate(loader):
        image = batch[image_key]
        affine = getattr(image, "affine", None)
        spacing = None if affine is None else affine_to_spacing(affine[0] if affine.ndim == 3 else affine, r=3).tolist()
        images = plain_tensor(image).to(device).float()
        label = batch[label_key]
        labels = plain_tensor(label).to(device).long()
        with autocast(device, amp_dtype):
            logits = inferer(images, model)
        pred = logits.float().argmax(dim=1, keepdim=True)
        pred_onehot = F.one_hot(pred[:, 0], num_classes).movedim(-1, 1)
        label_onehot = F.one_hot(labels[:, 0].clamp(0, num_classes - 1), num_classes).movedim(-1, 1)
        dice = compute_dice(pred_onehot, label_onehot, include_background=False, ignore_empty=True)[0]
        record: dict[str, Any] = {"case": _case_name(batch, image_key), "dice": dice.cpu().tolist()}
        if hd95:
            with warnings.catch_warnings():  # absent classes warn; they are NaN here by design
                warnings.simplefilter("ignore", UserWarning)
                dist = compute_hausdorff_distance(
                    pred_onehot, label_onehot, include_background=False, percentile=95, spacing=spacing
                )[0]
            record["hd95"] = [float(d) if math.isfinite(float(d)) else math.nan for d in dist.cpu()]
        cases.append(record)
        if i == picture_case:
            picture = label_overlay(images[0], labels[0, 0], pred[0, 0])
    if is_distributed():
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(get_world_size())]
        torch.distributed.all_gather_object(gathered, cases)
        unique = {c["case"]: c for rank_cases in gathered for c in rank_cases}
        cases = list(unique.values())
    return cases, picture


def summarise_cases(cases: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """Mean per class over cases (NaNs skipped) and the mean over classes.

    Args:
        cases: records from :func:`evaluate_segmentation`.
        class_names: names of the foreground classes (background excluded), in label order.

    Returns:
        ``{"mean_dice", "dice/<class>", "mean_hd95", "hd95/<class>"}`` (HD95 keys only when computed).
    """
    summary: dict[str, float] = {}
    for metric in ("dice", "hd95"):
        if not cases or metric not in cases[0]:
            continue
        values = np.array([c[metric] for c in cases], dtype=np.float64)
        if values.shape[1] != len(class_names):
            raise ValueError(f"{values.shape[1]} {metric} values per case but {len(class_names)} class names")
        with np.errstate(all="ignore"):
            per_class = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in values.T]
        for name, value in zip(class_names, per_class):
            summary[f"{metric}/{name}"] = value
        finite = [v for v in per_class if math.isfinite(v)]
        summary[f"mean_{metric}"] = float(np.mean(finite)) if finite else math.nan
    return summary


def write_tables(
    cases: Sequence[dict[str, Any]], summary: dict[str, float], class_names: Sequence[str], out_dir: str | Path
) -> Path:
    """Write ``per_case.csv`` (one row per case and class), ``summary.json`` and ``summary.md`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_hd95 = bool(cases) and "hd95" in cases[0]
    with (out / "per_case.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "class", "dice", *(["hd95"] if with_hd95 else [])])
        for case in cases:
            for i, name in enumerate(class_names):
                hd = [f"{case['hd95'][i]:.4f}"] if with_hd95 else []
                writer.writerow([case["case"], name, f"{case['dice'][i]:.6f}", *hd])
    (out / "summary.json").write_text(json.dumps({"num_cases": len(cases), **summary}, indent=2) + "\n")
    header = ["| class | Dice | HD95 (mm) |", "|---|---|---|"] if with_hd95 else ["| class | Dice |", "|---|---|"]
    lines = list(header)
    for name in [*class_names, "mean"]:
        dice = summary.get("mean_dice" if name == "mean" else f"dice/{name}", math.nan)
        row = f"| {'**mean**' if name == 'mean' else name} | {dice:.4f} |"
        if with_hd95:
            row += f" {summary.get('mean_hd95' if name == 'mean' else f'hd95/{name}', math.nan):.2f} |"
        lines.append(row)
    (out / "summary.md").write_text(f"Whole-volume evaluation of {len(cases)} cases\n\n" + "\n".join(lines) + "\n")
    return out


def label_overlay(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, size: int = 192) -> torch.Tensor:
    """Axial mid-slice (through the label's centre) of the image with the label (left) and prediction (right).

    Args:
        image: (C, X, Y, Z) image in about [0, 1] (first channel drawn).
        label: (X, Y, Z) integer label map.
        pred: (X, Y, Z) integer prediction.
        size: tile size in pixels.

    Returns:
        (3, size, 2 * size) RGB picture in [0, 1].
    """
    fg = torch.nonzero(label > 0)
    z = int(fg[:, 2].float().mean()) if len(fg) else label.shape[2] // 2
    gray = image[0, :, :, z].float().cpu()
    lo, hi = float(gray.min()), float(gray.max())
    gray = ((gray - lo) / (hi - lo if hi > lo else 1.0)).clamp(0, 1)
    tiles = []
    for seg in (label[:, :, z].cpu(), pred[:, :, z].cpu()):
        rgb = gray[None].repeat(3, 1, 1)
        colours = _PALETTE[(seg.clamp(min=1) - 1) % len(_PALETTE)].permute(2, 0, 1)
        rgb = torch.where(seg[None] > 0, 0.45 * rgb + 0.55 * colours, rgb)
        # Transpose and flip so anterior is up and the patient's right is on the left, as radiologists read.
        tiles.append(F.interpolate(rgb.transpose(1, 2).flip(1).flip(2)[None], size=(size, size), mode="nearest")[0])
    return torch.cat(tiles, dim=2)


def load_model_weights(network: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a fine-tuned checkpoint (``{"model": state_dict}`` or a bare state dict) completely into ``network``.

    Raises:
        ValueError: when keys are missing, unexpected or of another shape (a checkpoint of another network).
    """
    state = load_checkpoint(checkpoint)
    weights = state.get("model", state)
    report = load_state_dict_with_report(network, weights, name=str(checkpoint))
    if report.missing or report.unexpected:
        raise ValueError(f"{checkpoint} does not match the network: {report.summary()}")
    return network


def run_evaluation(
    network: nn.Module,
    checkpoint: str | Path,
    loader: DataLoader,
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
    class_names: Sequence[str],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    amp: str = "none",
    hd95: bool = True,
) -> dict[str, float]:
    """Evaluate a checkpoint on whole volumes; write tables and TensorBoard; return the summary.

    Writes ``per_case.csv``, ``summary.json`` and ``summary.md`` to ``output_dir`` and, in
    ``output_dir/tensorboard``, the per-class scores and the overlay of the first case.

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
    """
    device = torch.device(device)
    network = load_model_weights(network, checkpoint).to(device)
    cases, picture = evaluate_segmentation(
        network, loader, inferer, len(class_names), device, amp_dtype=AMP_DTYPES[amp], hd95=hd95
    )
    summary = summarise_cases(cases, list(class_names)[1:])
    if is_main_process():
        out = write_tables(cases, summary, list(class_names)[1:], output_dir)
        with SummaryWriter(str(out / "tensorboard")) as writer:
            for key, value in summary.items():
                writer.add_scalar(f"eval/{key}", value, 0)
            if picture is not None:
                writer.add_image("eval/label_vs_prediction", picture, 0, dataformats="CHW")
        logging.getLogger(__name__).info("%s\n%s", checkpoint, (out / "summary.md").read_text())
    return summary
