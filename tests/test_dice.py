"""The project's one Dice (`dae.evaluation.metrics`), on hand-worked cases and against MONAI's two conventions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from dae.evaluation.seg_metrics import dice_iou, dice_iou_from_counts, dice_iou_per_case, mean_per_class, overlap_counts

NAN = math.nan
# Two cases of 8 pixels, 4 classes (0 = background):
# case 0: class 1 perfect (3 px); class 2 a false positive (2 px predicted, none in the label); class 3 nowhere
# case 1: class 1 partial (label 4 px, prediction 3 px, 2 of them shared): Dice 2*2/(3+4) = 4/7, IoU 2/(3+4-2) = 2/5;
#         class 2 perfect (1 px); class 3 nowhere
TARGET = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 2, 0, 0, 0]])
PRED = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [0, 0, 1, 1, 2, 1, 0, 0]])


def _equal_with_nan(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


def test_per_case_dice_and_iou_by_hand() -> None:
    intersections, totals = overlap_counts(PRED, TARGET, 4)
    assert intersections.tolist() == [[3, 3, 0, 0], [2, 2, 1, 0]]
    assert totals.tolist() == [[8, 6, 2, 0], [7, 7, 2, 0]]  # |P| + |T|
    dice, iou = dice_iou_per_case(intersections, totals)
    # background: case 0 label 5 px, prediction 3 px, shared 3 -> 6/8; case 1 label 3, prediction 4, shared 2 -> 4/7
    _equal_with_nan(dice, [[6 / 8, 1.0, 0.0, NAN], [4 / 7, 4 / 7, 1.0, NAN]])
    _equal_with_nan(iou, [[3 / 5, 1.0, 0.0, NAN], [2 / 5, 2 / 5, 1.0, NAN]])


def test_false_positive_of_an_absent_class_costs_here_but_not_in_monai_ignore_empty() -> None:
    dice, _ = dice_iou_per_case(*overlap_counts(PRED, TARGET, 4))
    assert dice[0, 2] == 0.0  # class 2 predicted in case 0, whose label has none
    one_hot = [F.one_hot(x, 4).movedim(-1, 1) for x in (PRED, TARGET)]
    monai_ignore = compute_dice(*one_hot, include_background=True, ignore_empty=True).double()
    assert math.isnan(monai_ignore[0, 2])  # MONAI ignore_empty=True: the false positive is not scored at all
    monai_count = compute_dice(*one_hot, include_background=True, ignore_empty=False).double()
    assert monai_count[0, 2] == 0.0 and monai_count[0, 3] == 1.0  # ignore_empty=False rewards "absent from both"
    # where the class is in the label, all three agree
    defined = ~torch.isnan(monai_ignore)
    torch.testing.assert_close(dice[defined], monai_ignore[defined])


def test_absent_from_both_is_undefined_and_left_out_of_the_means() -> None:
    dice, _ = dice_iou_per_case(*overlap_counts(PRED, TARGET, 4))
    assert torch.isnan(dice[:, 3]).all()
    per_class, mean = mean_per_class(dice[:, 1:])
    assert per_class[:2] == pytest.approx([(1.0 + 4 / 7) / 2, (0.0 + 1.0) / 2])
    assert math.isnan(per_class[2])
    assert mean == pytest.approx(((1.0 + 4 / 7) / 2 + 0.5) / 2)  # the mean over the two defined classes
    per_class, mean = mean_per_class([[NAN, NAN], [NAN, NAN]])
    assert all(math.isnan(v) for v in per_class) and math.isnan(mean)  # nothing defined anywhere


def test_perfect_match_and_reductions_agree() -> None:
    dice, iou = dice_iou_per_case(*overlap_counts(TARGET, TARGET, 4))
    _equal_with_nan(dice, [[1.0, 1.0, NAN, NAN], [1.0, 1.0, 1.0, NAN]])
    _equal_with_nan(iou, [[1.0, 1.0, NAN, NAN], [1.0, 1.0, 1.0, NAN]])
    names = ["bg", "a", "b", "c"]
    scores = dice_iou(PRED, TARGET, 4, class_names=names)
    assert scores["dice"] == pytest.approx(
        {"macro": ((1 + 4 / 7) / 2 + 0.5) / 2, "a": (1 + 4 / 7) / 2, "b": 0.5, "c": NAN}, nan_ok=True
    )
    assert scores["iou"] == pytest.approx(
        {"macro": ((1 + 2 / 5) / 2 + 0.5) / 2, "a": 0.7, "b": 0.5, "c": NAN}, nan_ok=True
    )
    # streaming: counts of separate batches, concatenated, reduce to the same numbers
    counts = [overlap_counts(PRED[i : i + 1], TARGET[i : i + 1], 4) for i in range(2)]
    streamed = dice_iou_from_counts(torch.cat([c[0] for c in counts]), torch.cat([c[1] for c in counts]), names)
    for metric in ("dice", "iou"):
        assert streamed[metric] == pytest.approx(scores[metric], nan_ok=True)
