"""The penalised HD95 aggregate (`mean_hd95_penalised`): a missed class counts as the image diagonal."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from torch import nn

from dae.evaluation.seg_metrics import image_diagonal, penalised_hd95
from dae.evaluation.volumes import evaluate_segmentation, summarise_cases, write_tables

SIZE, SPACING = 16, (1.0, 2.0, 3.0)
DIAGONAL = math.sqrt((16 * 1.0) ** 2 + (16 * 2.0) ** 2 + (16 * 3.0) ** 2)  # the box is 16 x 32 x 48 mm
NAMES = ["a", "b", "c"]


class Echo(nn.Module):
    """Predicts the integer map it is given as image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float()


def evaluate(pred: torch.Tensor, label: torch.Tensor, num_classes: int = 4) -> list[dict]:
    """Per-case records of one volume whose prediction is ``pred``, on a grid of ``SPACING`` mm voxels."""
    affine = torch.diag(torch.tensor([*SPACING, 1.0]))
    batch = {"image": MetaTensor(pred[None, None].float(), affine=affine), "label": label[None, None]}
    inferer = SlidingWindowInferer(roi_size=(SIZE,) * 3)
    cases, _ = evaluate_segmentation(Echo(num_classes), [batch], inferer, num_classes, "cpu", picture_case=-1)
    return cases


def three_organs() -> torch.Tensor:
    label = torch.zeros(SIZE, SIZE, SIZE, dtype=torch.long)
    label[1:5, 1:5, 1:5] = 1
    label[8:12, 1:5, 1:5] = 2
    label[1:5, 8:12, 8:12] = 3
    return label


def test_image_diagonal_and_penalty_rules():
    assert image_diagonal((240, 240, 155)) == pytest.approx(373.13, abs=0.01)  # BraTS' 1 mm grid
    assert image_diagonal((SIZE,) * 3, SPACING) == pytest.approx(DIAGONAL)
    with pytest.raises(ValueError, match="2 spacings"):
        image_diagonal((4, 4, 4), (1.0, 1.0))
    values = penalised_hd95(
        [1.5, math.nan, math.nan, math.nan], [True, False, True, False], [True, True, False, False], 10.0
    )
    assert values[:3] == [1.5, 10.0, 10.0] and math.isnan(values[3])  # kept, missed, false positive, skipped


def test_missed_class_counts_as_the_diagonal_and_absent_class_is_skipped(tmp_path):
    label = three_organs()
    label[label == 3] = 0  # class 3 absent from the label and the prediction
    pred = label.clone()
    pred[pred == 2] = 0  # class 2 missed
    (record,) = evaluate(pred, label)
    assert record["hd95"][0] == pytest.approx(0.0)
    assert math.isnan(record["hd95"][1]) and math.isnan(record["hd95"][2])  # raw values: NaN as before
    assert record["hd95_penalised"][:2] == [pytest.approx(0.0), pytest.approx(DIAGONAL)]
    assert math.isnan(record["hd95_penalised"][2])

    summary = summarise_cases([record], NAMES)
    assert summary["mean_hd95"] == pytest.approx(0.0)  # only the finite class
    assert summary["mean_hd95_penalised"] == pytest.approx(DIAGONAL / 2)  # classes a and b; c skipped
    assert math.isnan(summary["hd95/b"]) and math.isnan(summary["hd95/c"])  # per-class table unchanged

    out = write_tables([record], summary, NAMES, tmp_path)
    assert (out / "per_case.csv").read_text().splitlines()[0] == "case,class,dice,hd95"
    written = json.loads((out / "summary.json").read_text())
    assert written["mean_hd95"] == pytest.approx(0.0) and written["hd95/b"] is None
    assert written["mean_hd95_penalised"] == pytest.approx(DIAGONAL / 2)
    markdown = (out / "summary.md").read_text()
    assert f"| **mean, penalised** |  | {DIAGONAL / 2:.2f} |" in markdown
    assert "counts as the image diagonal" in markdown


def test_false_positive_class_counts_as_the_diagonal():
    label = three_organs()
    label[label == 3] = 0
    pred = three_organs()  # class 3 predicted where the label has none
    (record,) = evaluate(pred, label)
    assert math.isnan(record["hd95"][2]) and record["hd95_penalised"][2] == pytest.approx(DIAGONAL)


def test_models_missing_different_classes_compare():
    label = three_organs()
    rough = torch.roll(label, shifts=1, dims=0)  # every organ found, one voxel (1 mm) off
    misses = label.clone()
    misses[misses == 3] = 0  # perfect on a and b, class c never predicted
    rough_summary = summarise_cases(evaluate(rough, label), NAMES)
    misses_summary = summarise_cases(evaluate(misses, label), NAMES)
    assert misses_summary["mean_hd95"] < rough_summary["mean_hd95"]  # the finite mean prefers the model that misses
    assert 0 < rough_summary["mean_hd95_penalised"] == pytest.approx(rough_summary["mean_hd95"])  # nothing missed
    assert misses_summary["mean_hd95_penalised"] == pytest.approx(DIAGONAL / 3)
    assert misses_summary["mean_hd95_penalised"] > rough_summary["mean_hd95_penalised"]


def test_summary_without_the_penalised_values_is_as_before(tmp_path):
    cases = [{"case": "a", "dice": [1.0, math.nan], "hd95": [0.0, math.nan]}]
    summary = summarise_cases(cases, ["x", "y"])
    assert "mean_hd95_penalised" not in summary
    markdown = (write_tables(cases, summary, ["x", "y"], tmp_path) / "summary.md").read_text()
    assert "penalised" not in markdown and "| **mean** | 1.0000 | 0.00 |" in markdown
