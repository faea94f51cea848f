"""Whole-volume segmentation scoring (`dae.evaluation.volumes`): Dice/HD95 on hand-built cases, tables, overlays."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from torch import nn

from dae.evaluation.volumes import (
    SegmentationEvaluator,
    evaluate_segmentation,
    run_evaluation,
    summarise_cases,
    write_tables,
)
from dae.models.pretrained import load_model_weights
from dae.utils.pictures import label_overlay


class LabelEcho(nn.Module):
    """A 'network' whose prediction is the integer map it is given as image (a perfect or chosen predictor)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float() * 10


def case(pred: torch.Tensor, label: torch.Tensor, spacing: float = 2.0) -> dict:
    affine = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0]))
    return {
        "image": MetaTensor(pred[None, None].float(), affine=affine, meta={"filename_or_obj": ["case.nii.gz"]}),
        "label": label[None, None].long(),
    }


def test_perfect_and_known_imperfect_predictions():
    label = torch.zeros(32, 32, 32, dtype=torch.long)
    label[4:12, 4:12, 4:12] = 1  # 512 voxels
    label[20:28, 20:28, 20:28] = 2
    pred = label.clone()
    pred[4:12, 4:12, 4:8] = 0  # class 1: half of it found -> Dice 2*256/(256+512) = 2/3
    inferer = SlidingWindowInferer(roi_size=(32, 32, 32))
    cases, picture = evaluate_segmentation(
        LabelEcho(4), [case(pred, label)], inferer, num_classes=4, device=torch.device("cpu"), hd95=True
    )
    (record,) = cases
    assert record["case"] == "case.nii.gz"
    assert record["dice"][0] == pytest.approx(2 / 3)
    assert record["dice"][1] == pytest.approx(1.0)
    assert math.isnan(record["dice"][2])  # class 3 absent from the label and the prediction: not scored
    # Class 1's missing half is 4 voxels deep: its farthest boundary voxels are 4 voxels * 2 mm = 8 mm away.
    assert 0 < record["hd95"][0] <= 8.0 + 1e-6
    assert record["hd95"][1] == pytest.approx(0.0)
    assert picture is not None and picture.shape == (3, 192, 384)


def test_summary_skips_nans_and_checks_names(tmp_path):
    cases = [
        {"case": "a", "dice": [1.0, math.nan], "hd95": [0.0, math.nan]},
        {"case": "b", "dice": [0.5, 0.25], "hd95": [4.0, 2.0]},
    ]
    summary = summarise_cases(cases, ["liver", "spleen"])
    assert summary["dice/liver"] == pytest.approx(0.75)
    assert summary["dice/spleen"] == pytest.approx(0.25)
    assert summary["mean_dice"] == pytest.approx(0.5)
    assert summary["hd95/liver"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="3 class names"):
        summarise_cases(cases, ["a", "b", "c"])

    out = write_tables(cases, summary, ["liver", "spleen"], tmp_path / "eval")
    rows = (out / "per_case.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,hd95" and len(rows) == 1 + 2 * 2
    assert json.loads((out / "summary.json").read_text())["num_cases"] == 2
    assert "| **mean** | 0.5000 | 2.00 |" in (out / "summary.md").read_text()


def test_label_overlay_colours_labels_only():
    image = torch.rand(1, 16, 16, 8)
    label = torch.zeros(16, 16, 8, dtype=torch.long)
    label[2:6, 2:6, 4] = 1
    pred = torch.zeros_like(label)
    picture = label_overlay(image, label, pred, size=16)
    assert picture.shape == (3, 16, 32)
    left, right = picture[:, :, :16], picture[:, :, 16:]
    assert not torch.allclose(left[0], left[1])  # a coloured label on the left
    assert torch.allclose(right[0], right[1]) and torch.allclose(right[1], right[2])  # grey: nothing predicted


def test_false_positive_of_an_absent_class_scores_zero():
    label = torch.zeros(16, 16, 16, dtype=torch.long)
    label[2:6, 2:6, 2:6] = 1
    pred = label.clone()
    pred[10:12, 10:12, 10:12] = 2  # class 2 predicted, absent from the label: Dice 0 (MONAI ignore_empty: NaN)
    cases, _ = evaluate_segmentation(
        LabelEcho(3), [case(pred, label)], SlidingWindowInferer(roi_size=(16, 16, 16)), 3, "cpu", hd95=False
    )
    assert cases[0]["dice"] == [1.0, 0.0]
    assert summarise_cases(cases, ["a", "b"])["mean_dice"] == pytest.approx(0.5)


def test_evaluator_returns_trainer_metrics_and_writes_tables(tmp_path):
    label = torch.zeros(16, 16, 16, dtype=torch.long)
    label[2:10, 2:10, 2:10] = 1
    pred = label.clone()
    pred[2:10, 2:10, 2:6] = 0  # half of class 1 found: Dice 2/3; class 2 nowhere: NaN
    evaluator = SegmentationEvaluator(
        [case(pred, label)], SlidingWindowInferer(roi_size=(16, 16, 16)), ["bg", "a", "b"], tmp_path / "validation"
    )
    metrics, pictures = evaluator(LabelEcho(3))
    assert list(metrics) == ["mean_dice", "dice/a", "dice/b"]
    assert metrics["mean_dice"] == pytest.approx(2 / 3) and math.isnan(metrics["dice/b"])
    assert list(pictures) == ["val/label_vs_prediction"] and pictures["val/label_vs_prediction"].shape == (3, 192, 384)
    assert json.loads((tmp_path / "validation" / "summary.json").read_text())["dice/b"] is None  # NaN as null
    assert (tmp_path / "validation" / "per_case.csv").read_text().splitlines()[0] == "case,class,dice"
    with pytest.raises(ValueError, match="class_names"):
        SegmentationEvaluator([], SlidingWindowInferer(roi_size=(16, 16, 16)), ["bg"], tmp_path)


def test_run_evaluation_loads_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    network = nn.Conv3d(1, 3, kernel_size=1)
    torch.save({"model": network.state_dict()}, tmp_path / "best.pt")
    label = torch.zeros(16, 16, 16, dtype=torch.long)
    label[4:12, 4:12, 4:12] = 1
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16))
    summary = run_evaluation(
        nn.Conv3d(1, 3, kernel_size=1), tmp_path / "best.pt", [case(label, label)], inferer, ["bg", "a", "b"], tmp_path
    )
    expected, _ = evaluate_segmentation(network, [case(label, label)], inferer, 3, "cpu")
    assert summary == pytest.approx(summarise_cases(expected, ["a", "b"]), nan_ok=True)
    assert {"per_case.csv", "summary.json", "summary.md", "tensorboard"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="does not match"):  # the checkpoint has a bias the network lacks
        load_model_weights(nn.Conv3d(1, 3, kernel_size=1, bias=False), tmp_path / "best.pt")
