"""Evaluation metrics, retrieval and report writers, checked against small hand-worked examples."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from dae.evaluation import (
    accuracy,
    auroc,
    bootstrap_ci,
    bootstrap_samples,
    dice_iou,
    format_table,
    precision_at_k,
    retrieval_figure,
    retrieve,
    roc_curves,
    roc_figure,
    save_figure,
    save_retrieval_figure,
    write_results,
)

# ------------------------------------------------------------------------------------------------- accuracy


def test_accuracy_from_scores_and_from_predictions():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1])
    # arg-max predictions 0, 1, 0: the last one is wrong.
    assert accuracy(scores, labels) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([0, 1, 0]), labels) == pytest.approx(2 / 3)
    assert accuracy(np.array([0, 1, 1]), np.array([0, 1, 1])) == 1.0
    with pytest.raises(ValueError, match="single-label"):
        accuracy(scores, torch.zeros(3, 2))


# ------------------------------------------------------------------------------------------------- AUROC


def test_binary_auroc_by_counting_pairs():
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4. Of the 4 (positive, negative) pairs the positive
    # ranks higher in 3: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4); not in (0.35, 0.4). AUROC = 3/4.
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(s, y)["macro"] == pytest.approx(0.75)
    assert auroc(s[:, None], y)["macro"] == pytest.approx(0.75)
    two_columns = auroc(torch.stack([1 - s, s], dim=1), y, class_names=["healthy", "sick"])
    assert two_columns == pytest.approx({"macro": 0.75, "sick": 0.75})


def test_multiclass_auroc_one_vs_rest():
    y = torch.tensor([0, 1, 2, 2])
    s = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.1, 0.6, 0.3]])
    # class 0: positive 0.6 beats negatives 0.2, 0.3, 0.1                      -> 1
    # class 1: positive 0.5 beats 0.3 and 0.2, loses to 0.6                       -> 2/3
    # class 2: positives 0.5, 0.3 vs negatives 0.1, 0.3: 3 wins and one tie (1/2) -> 3.5/4
    result = auroc(s, y, class_names=["a", "b", "c"])
    expected = {"a": 1.0, "b": 2 / 3, "c": 0.875}
    assert result == pytest.approx({"macro": sum(expected.values()) / 3, **expected})
    assert result["macro"] == pytest.approx(roc_auc_score(y.numpy(), s.numpy(), multi_class="ovr", average="macro"))


def test_multilabel_macro_auroc_skips_an_undefined_class():
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    s = torch.tensor([[0.9, 0.3, 0.5], [0.2, 0.8, 0.1], [0.6, 0.2, 0.7], [0.4, 0.5, 0.2]])
    # column 0: positives 0.9, 0.6 beat negatives 0.2, 0.4 in all 4 pairs        -> 1
    # column 1: positives 0.8, 0.2 vs negatives 0.3, 0.5: 0.8 wins twice, 0.2 never -> 1/2
    # column 2: no positive, so no AUROC: NaN and left out of the macro.
    with pytest.warns(UserWarning, match="undefined"):
        result = auroc(s, y, class_names=["effusion", "nodule", "hernia"])
    assert result["effusion"] == pytest.approx(1.0)
    assert result["nodule"] == pytest.approx(0.5)
    assert math.isnan(result["hernia"])
    assert result["macro"] == pytest.approx(0.75)


def test_auroc_equals_sklearn_with_ties():
    gen = np.random.default_rng(0)
    y = gen.integers(0, 2, size=(200, 4))
    s = gen.integers(0, 6, size=(200, 4)) / 5.0  # few distinct values: many ties
    result = auroc(s, y)
    for c in range(4):
        assert result[f"class_{c}"] == pytest.approx(roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_roc_curves_match_auroc():
    y = torch.tensor([0, 0, 1, 1])
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    curves = roc_curves(s, y, class_names=["neg", "pos"])
    assert list(curves) == ["pos"]
    assert curves["pos"].auc == pytest.approx(0.75)
    assert curves["pos"].fpr[0] == 0 and curves["pos"].tpr[-1] == 1


# ------------------------------------------------------------------------------------------------- bootstrap


def _macro_auroc(s, y):
    return auroc(s, y)["macro"]


def test_bootstrap_ci_contains_the_point_and_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (80,), generator=gen)
    s = y.float() * 0.8 + torch.rand(80, generator=gen)
    first = bootstrap_ci(_macro_auroc, s, y, n_boot=200, seed=3)
    assert first == bootstrap_ci(_macro_auroc, s, y, n_boot=200, seed=3)
    point, low, high = first
    assert point == pytest.approx(_macro_auroc(s, y))
    assert low <= point <= high and low < high
    assert bootstrap_ci(_macro_auroc, s, y, n_boot=200, seed=4) != first
    # NumPy inputs and accuracy work the same way.
    acc = bootstrap_ci(accuracy, np.stack([1 - s.numpy(), s.numpy()], 1), y.numpy(), n_boot=100, seed=0)
    assert acc[1] <= acc[0] <= acc[2]


def test_bootstrap_skips_resamples_where_the_metric_is_undefined():
    # One positive among 6: about (5/6)^6 = 1/3 of the resamples hold no positive and have no AUROC.
    y = torch.tensor([0, 0, 0, 0, 0, 1])
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    values = bootstrap_samples(_macro_auroc, s, y, n_boot=300, seed=0)
    assert 100 < values.size < 300
    assert np.isfinite(values).all()
    with pytest.warns(UserWarning, match="undefined on"):
        point, low, high = bootstrap_ci(_macro_auroc, s, y, n_boot=300, seed=0)
    assert point == 1.0 and low == high == 1.0


# ------------------------------------------------------------------------------------------------- Dice / IoU


def test_dice_iou_on_a_2x3_map():
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    target = torch.tensor([[[0, 1, 0], [2, 2, 2]]])
    # class 1: pred 2 pixels, target 1, overlap 1 -> Dice 2*1/(2+1) = 2/3, IoU 1/(2+1-1) = 1/2
    # class 2: pred 2 pixels, target 3, overlap 2 -> Dice 2*2/(2+3) = 4/5, IoU 2/(2+3-2) = 2/3
    # class 3: in neither -> NaN, not in the macro
    result = dice_iou(pred, target, num_classes=4)
    assert result["dice"]["class_1"] == pytest.approx(2 / 3)
    assert result["dice"]["class_2"] == pytest.approx(0.8)
    assert result["iou"]["class_1"] == pytest.approx(0.5)
    assert result["iou"]["class_2"] == pytest.approx(2 / 3)
    assert math.isnan(result["dice"]["class_3"]) and math.isnan(result["iou"]["class_3"])
    assert result["dice"]["macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["iou"]["macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert "class_0" not in result["dice"]
    # background: pred 2 pixels, target 2, overlap 1 -> Dice 1/2, IoU 1/3
    with_background = dice_iou(pred, target, num_classes=3, ignore_background=False, class_names=["bg", "a", "b"])
    assert with_background["dice"]["bg"] == pytest.approx(0.5)
    assert with_background["iou"]["bg"] == pytest.approx(1 / 3)


def test_dice_iou_excludes_empty_pairs_but_counts_false_positives():
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]])
    target = torch.tensor([[[0, 1, 0], [2, 2, 2]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    result = dice_iou(pred, target, num_classes=3)
    # Image 2 has neither class: left out. Image 3 predicts class 1 where there is none: Dice 0.
    assert result["dice"]["class_1"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["dice"]["class_2"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------------- retrieval


def test_retrieve_nearest_by_cosine():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [3.0, 3.0]])
    query = torch.tensor([[2.0, 0.1], [0.1, 1.0]])
    index, sims = retrieve(query, gallery, k=2, chunk_size=1)
    assert index.tolist() == [[0, 3], [1, 3]]
    assert sims[0, 1] == pytest.approx(float(torch.nn.functional.cosine_similarity(query[:1], gallery[3:])))
    self_index, _ = retrieve(gallery, gallery, k=3, exclude_self=True)
    assert all(i not in row for i, row in enumerate(self_index.tolist()))
    with pytest.warns(UserWarning, match="exceeds"):
        assert retrieve(query, gallery, k=9)[0].shape == (2, 4)


def test_precision_at_k_single_and_multi_label():
    gallery_labels = torch.tensor([0, 0, 1, 1, 2])
    query_labels = torch.tensor([0, 1])
    indices = torch.tensor([[0, 2, 1], [4, 3, 2]])
    # query 0 (label 0) retrieves labels 0, 1, 0: P@1 = 1, P@2 = 1/2, P@3 = 2/3
    # query 1 (label 1) retrieves labels 2, 1, 1: P@1 = 0, P@2 = 1/2, P@3 = 2/3
    result = precision_at_k(query_labels, gallery_labels, indices, ks=(1, 2, 3))
    assert result == pytest.approx({"precision@1": 0.5, "precision@2": 0.5, "precision@3": 2 / 3})
    with pytest.raises(ValueError, match="cut-offs"):
        precision_at_k(query_labels, gallery_labels, indices, ks=(5,))

    g = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    q = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    # query 0 (positives 0 and 2) retrieves gallery 0 (shares label 2), 1 and 2 (share nothing): 1, 1/2, 1/3.
    # query 1 has no positive label: gallery 2 (none either) matches, gallery 3 does not:     1, 1/2, 1/3.
    multi = precision_at_k(q, g, torch.tensor([[0, 1, 2], [2, 3, 3]]), ks=(1, 2, 3))
    assert multi == pytest.approx({"precision@1": 1.0, "precision@2": 0.5, "precision@3": 1 / 3})


def test_retrieval_figure(tmp_path):
    gen = torch.Generator().manual_seed(0)
    grey = torch.rand(5, 1, 8, 8, generator=gen)
    index, sims = retrieve(grey.flatten(1), grey.flatten(1), k=2, exclude_self=True)
    fig = retrieval_figure(grey, grey, index, sims, torch.tensor([0, 1, 0, 1, 1]), torch.tensor([0, 1, 0, 1, 1]),
                           class_names=["normal", "fracture"], max_queries=3)  # fmt: skip
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * 3
    assert fig.axes[1].get_title().startswith(("normal", "fracture"))
    rgb = torch.rand(2, 3, 8, 8, generator=gen)
    path = save_retrieval_figure(tmp_path / "retrieval.png", rgb, rgb, torch.tensor([[1], [0]]), torch.ones(2, 1))
    assert path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------- report


def test_write_results_gives_three_files_with_the_same_rows(tmp_path):
    rows = [
        {"backbone": "vit_small", "protocol": "knn", "setting": "k=20", "metric": "accuracy", "value": 0.912,
         "low": 0.881, "high": 0.94},
        {"backbone": "vit_small", "protocol": "linear", "metric": "auroc", "value": np.float32(0.5),
         "low": math.nan, "high": math.nan, "per_class": {"effusion": 0.75, "hernia": math.nan}},
    ]  # fmt: skip
    paths = write_results(rows, tmp_path / "out", "results")
    assert sorted(paths) == ["csv", "json", "md"] and all(p.exists() for p in paths.values())

    columns = ["backbone", "protocol", "setting", "metric", "value", "low", "high", "per_class.effusion",
               "per_class.hernia"]  # fmt: skip
    with paths["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == columns
    loaded = json.loads(paths["json"].read_text())
    assert [list(r) for r in loaded] == [columns[:7], [c for c in columns if c != "setting"]]
    assert len(csv_rows) == len(loaded) == 2
    for csv_row, json_row in zip(csv_rows, loaded):
        for key, value in json_row.items():
            if isinstance(value, float) or value is None:
                expected = math.nan if value is None else value
                assert float(csv_row[key]) == pytest.approx(expected, nan_ok=True)
            else:
                assert csv_row[key] == str(value)
    assert loaded[1]["low"] is None and loaded[1]["value"] == 0.5

    md = paths["md"].read_text().splitlines()
    assert len(md) == 2 + 2
    assert "0.9120 [0.8810, 0.9400]" in md[2] and "| knn |" in md[2]
    assert "per_class.effusion" in md[0] and "low" not in md[0]


def test_format_table_shows_the_interval():
    table = format_table([{"backbone": "resnet50", "protocol": "linear", "metric": "auroc", "value": 0.912,
                           "low": 0.881, "high": 0.94, "n_boot": 1000}])  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "| backbone | protocol | metric | value |"
    assert lines[2] == "| resnet50 | linear | auroc | 0.912 [0.881, 0.940] |"


def test_roc_figure_and_save(tmp_path):
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    s = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = roc_figure(s, y, class_names=["a", "b", "c"], title="test")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert len(labels) == 3 and labels[0].startswith("a (")
    path = save_figure(fig, tmp_path / "figs" / "roc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
