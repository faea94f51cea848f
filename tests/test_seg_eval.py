"""Whole-volume segmentation scoring: Dice/HD95 against hand-built cases, summaries, tables and overlays."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from torch import nn

from dae.engine import evaluate_segmentation, label_overlay, summarise_cases, write_tables


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
    assert math.isnan(record["dice"][2])  # class 3 absent from the label: not scored
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
