"""Evaluation of the dictation-to-mask pipeline over a labelled datalist, with bootstrap intervals.

Per case (an image, its tumour mask and class, optionally a dictation as audio or text):

- **prompt**: the class the pipeline extracted from the dictation against the dictated class (``dictated_class``,
  default the image's class; a dictation that names no tumour expects ``healthy``);
- **detection** with the image's true class as the prompt: box IoU with the true box, recall at IoU 0.5, and the
  detector's own classification (the class whose prompt scores highest) where it has one;
- **segmentation** three ways: the segmenter prompted with the detected box, prompted with the true box, and the
  true box filled (the baseline a box alone gives);
- **end to end**: the pipeline's mask from the dictation against the true mask; a case whose dictation expects no
  tumour is correct when no mask comes out.

Means come with 95% percentile-bootstrap intervals over cases. ``summary.json`` / ``summary.md`` hold the table,
``cases.csv`` one row per case; ``cases/`` the masks, overlays and JSON records of :func:`write_case`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dae.evaluation.metrics import MetricEstimate
from dae.logsam.classes import HEALTHY
from dae.logsam.data import EmbeddingCache, read_grey
from dae.logsam.metrics import box_iou, box_mask, mask_dice_iou, mean_estimate, rate_estimate
from dae.logsam.pipeline import DictationToMask, overlay_picture, write_case

__all__ = ["CaseScores", "evaluate_pipeline", "summary_rows"]

logger = logging.getLogger(__name__)


@dataclass
class CaseScores:
    """The measures of one case (NaN where a measure does not apply to it)."""

    id: str
    true_class: str
    dictated_class: str
    prompt_source: str  # "audio", "text" or "label" (no dictation: the class caption was the prompt)
    predicted_class: str
    outcome: str
    detector_class: str
    box_iou: float
    dice_predicted_box: float
    iou_predicted_box: float
    dice_true_box: float
    iou_true_box: float
    dice_filled_box: float
    iou_filled_box: float
    dice_end_to_end: float
    end_to_end_correct: bool


def _dictation(entry: Mapping[str, Any], pipeline: DictationToMask) -> tuple[str, dict[str, Any]]:
    """Where the case's prompt comes from, and the pipeline's dictation arguments."""
    if entry.get("dictation") and pipeline.transcriber is not None:
        return "audio", {"audio": str(entry["dictation"])}
    if entry.get("report"):
        return "text", {"text": str(entry["report"])}
    return "label", {"text": pipeline.table.caption(entry["class"])}


def _score_case(
    entry: Mapping[str, Any], pipeline: DictationToMask, cache: EmbeddingCache
) -> tuple[CaseScores, dict[str, Any]]:
    image_path = Path(entry["image"])
    image = read_grey(image_path)
    true_mask = read_grey(entry["mask"]) > 0
    true_class = str(entry["class"])
    true_box = np.asarray(entry["box"], dtype=np.float64)
    dictated = str(entry.get("dictated_class", true_class))
    embedding = cache.get(image_path)
    source, dictation = _dictation(entry, pipeline)
    result = pipeline(image, language=entry.get("language"), embedding=embedding, **dictation)

    # The detection with the true class as prompt: the pipeline's own when the dictation named that class.
    reuse = result.detection is not None and result.prompt.tumour_class == true_class
    detection = result.detection if reuse else pipeline.detector.detect(image, true_class, embedding=embedding)
    predicted_mask = result.mask if reuse else None
    boxes = [true_box] if detection.best is None or predicted_mask is not None else [detection.best.box, true_box]
    segmented = pipeline.segmenter.segment(embedding, np.stack(boxes))
    dice_true, iou_true = mask_dice_iou(segmented.masks[-1], true_mask)
    if detection.best is None:
        dice_pred, iou_pred = 0.0, 0.0
    else:
        dice_pred, iou_pred = mask_dice_iou(
            predicted_mask if predicted_mask is not None else segmented.masks[0], true_mask
        )
    dice_fill, iou_fill = mask_dice_iou(box_mask(true_box, true_mask.shape), true_mask)
    scores = detection.class_scores
    if dictated == HEALTHY:
        end_correct, dice_end = result.mask is None, math.nan
    else:
        dice_end = mask_dice_iou(result.mask, true_mask)[0] if result.mask is not None else 0.0
        end_correct = result.mask is not None and result.prompt.tumour_class == dictated
    case = CaseScores(
        id=str(entry.get("id") or Path(entry["image"]).stem),
        true_class=true_class,
        dictated_class=dictated,
        prompt_source=source,
        predicted_class=result.prompt.tumour_class,
        outcome=result.outcome,
        detector_class=max(scores, key=scores.get) if scores else "",
        box_iou=box_iou(detection.best.box, true_box) if detection.best is not None else 0.0,
        dice_predicted_box=dice_pred,
        iou_predicted_box=iou_pred,
        dice_true_box=dice_true,
        iou_true_box=iou_true,
        dice_filled_box=dice_fill,
        iou_filled_box=iou_fill,
        dice_end_to_end=dice_end,
        end_to_end_correct=end_correct,
    )
    extra = {
        "true_class": true_class,
        "dictated_class": dictated,
        "true_box": true_box.tolist(),
        "image": str(image_path),
    }
    return case, {"result": result, "image": image, "extra": extra}


def summary_rows(cases: Sequence[CaseScores], n_boot: int = 1000, seed: int = 0) -> dict[str, MetricEstimate]:
    """The table's measures with intervals; rows without a case to measure are left out.

    Keys: ``dictation_class_accuracy`` (cases with a dictation), ``detector_class_accuracy`` (detectors that
    classify), ``box_iou`` and ``recall_iou50`` (true-class prompt), ``dice_/iou_predicted_box``,
    ``dice_/iou_true_box``, ``dice_/iou_filled_box``, ``dice_end_to_end`` (dictations naming a tumour) and
    ``no_mask_when_no_tumour_dictated`` (dictations naming none).
    """
    dictated = [c for c in cases if c.prompt_source != "label"]
    tumour = [c for c in cases if c.dictated_class != HEALTHY]
    healthy = [c for c in cases if c.dictated_class == HEALTHY]
    classified = [c for c in cases if c.detector_class]
    rows = {
        "dictation_class_accuracy": rate_estimate(
            [c.predicted_class == c.dictated_class for c in dictated], n_boot, seed
        ),
        "detector_class_accuracy": rate_estimate([c.detector_class == c.true_class for c in classified], n_boot, seed),
        "box_iou": mean_estimate([c.box_iou for c in cases], n_boot, seed),
        "recall_iou50": rate_estimate([c.box_iou >= 0.5 for c in cases], n_boot, seed),
    }
    for measure in ("dice", "iou"):
        for way in ("predicted_box", "true_box", "filled_box"):
            key = f"{measure}_{way}"
            rows[key] = mean_estimate([getattr(c, key) for c in cases], n_boot, seed)
    rows["dice_end_to_end"] = mean_estimate([c.dice_end_to_end for c in tumour], n_boot, seed)
    rows["no_mask_when_no_tumour_dictated"] = rate_estimate([c.end_to_end_correct for c in healthy], n_boot, seed)
    counts = {
        "dictation_class_accuracy": len(dictated),
        "detector_class_accuracy": len(classified),
        "dice_end_to_end": len(tumour),
        "no_mask_when_no_tumour_dictated": len(healthy),
    }
    return {k: v for k, v in rows.items() if counts.get(k, len(cases)) > 0}


_LABELS = {
    "dictation_class_accuracy": "class from the dictation (accuracy)",
    "detector_class_accuracy": "class from the detector alone (accuracy)",
    "box_iou": "box IoU, true-class prompt",
    "recall_iou50": "recall at box IoU 0.5",
    "dice_predicted_box": "Dice, segmenter with the detected box",
    "iou_predicted_box": "IoU, segmenter with the detected box",
    "dice_true_box": "Dice, segmenter with the true box",
    "iou_true_box": "IoU, segmenter with the true box",
    "dice_filled_box": "Dice, true box filled (no segmenter)",
    "iou_filled_box": "IoU, true box filled (no segmenter)",
    "dice_end_to_end": "Dice, dictation to mask (tumour dictated)",
    "no_mask_when_no_tumour_dictated": "no mask when no tumour dictated",
}


def _markdown(rows: Mapping[str, MetricEstimate], name: str, count: int) -> str:
    lines = [f"# {name}: {count} cases", "", "| measure | value | 95% interval |", "|---|---|---|"]
    for key, (value, low, high, _) in rows.items():
        lines.append(f"| {_LABELS[key]} | {value:.3f} | [{low:.3f}, {high:.3f}] |")
    return "\n".join(lines) + "\n"


def _per_class(cases: Sequence[CaseScores]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in sorted({c.true_class for c in cases}):
        mine = [c for c in cases if c.true_class == name]
        table[name] = {
            "cases": len(mine),
            "box_iou": float(np.mean([c.box_iou for c in mine])),
            "dice_predicted_box": float(np.mean([c.dice_predicted_box for c in mine])),
            "dice_true_box": float(np.mean([c.dice_true_box for c in mine])),
            "dice_filled_box": float(np.mean([c.dice_filled_box for c in mine])),
        }
    return table


def evaluate_pipeline(
    pipeline: DictationToMask,
    entries: Sequence[Mapping[str, Any]],
    cache: EmbeddingCache,
    output_dir: str | Path,
    name: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    tensorboard_pictures: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every entry, write the tables and the per-case files, and return the summary.

    Args:
        pipeline: the pipeline to evaluate (its segmenter computes ``cache``'s embeddings).
        entries: checked datalist entries, paths resolved (:func:`dae.logsam.data.load_logsam_datalist`).
        cache: the image-embedding cache of the pipeline's segmenter.
        output_dir: where ``summary.json``, ``summary.md``, ``cases.csv``, ``cases/`` and ``tensorboard/`` go.
        name: the set's name in the tables.
        n_boot: bootstrap resamples of the intervals.
        seed: seed of the resampling.
        tensorboard_pictures: overlays of this many cases also go to TensorBoard (0: none).
        progress: show a progress bar.

    Returns:
        ``{"name", "cases", "measures": {key: {"value", "low", "high"}}, "per_class"}``.

    Raises:
        ValueError: for an empty list.
    """
    if not entries:
        raise ValueError(f"no case to evaluate in {name!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cases: list[CaseScores] = []
    writer = SummaryWriter(str(output_dir / "tensorboard")) if tensorboard_pictures > 0 else None
    for index, entry in enumerate(tqdm(entries, desc=f"evaluate {name}", disable=not progress)):
        case, written = _score_case(entry, pipeline, cache)
        cases.append(case)
        write_case(written["result"], written["image"], output_dir / "cases", case.id, written["extra"])
        if writer is not None and index < tensorboard_pictures:
            picture = overlay_picture(
                written["image"], written["result"].mask, written["result"].box, np.asarray(entry["box"])
            )
            writer.add_image(f"{name}/{case.id}", torch.from_numpy(picture).permute(2, 0, 1), 0)
    if writer is not None:
        writer.close()
    rows = summary_rows(cases, n_boot=n_boot, seed=seed)
    summary = {
        "name": name,
        "cases": len(cases),
        "measures": {k: {"value": v.value, "low": v.low, "high": v.high} for k, v in rows.items()},
        "per_class": _per_class(cases),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(_markdown(rows, name, len(cases)))
    with open(output_dir / "cases.csv", "w", newline="") as f:
        fields = list(asdict(cases[0]))
        writer_csv = csv.DictWriter(f, fieldnames=fields)
        writer_csv.writeheader()
        writer_csv.writerows(asdict(c) for c in cases)
    logger.info("%s", _markdown(rows, name, len(cases)))
    return summary
