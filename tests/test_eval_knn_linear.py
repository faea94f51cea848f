"""Feature sets, weighted k-NN, the linear-probe protocol (selection on val only) and fine-tuning."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dae.evaluation.linear_probe as lp
from dae.evaluation import (
    FeatureSet,
    LinearProbeConfig,
    ProbeSetting,
    knn_evaluate,
    knn_predict,
    resolve_metric,
    run_finetune,
    run_linear_probe,
    select_probe_setting,
)
from dae.utils.config import resolve_flag, str2bool

DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_set(
    n: int,
    seed: int,
    num_classes: int = 3,
    n_max: int = 4,
    multilabel: bool = False,
    patch: bool = True,
    prefix: str = "s",
) -> FeatureSet:
    """Linearly separable features: class centres 3 * e_c (summed for multi-label samples) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(DIM)[:num_classes]
    if multilabel:
        labels = (torch.rand(n, num_classes, generator=gen) < 0.5).float()
        labels[:num_classes] = torch.eye(num_classes)  # every class has positives and negatives
        labels[num_classes] = 0
        mean = labels @ centres
    else:
        labels = torch.arange(n) % num_classes
        mean = centres[labels]
    cls_blocks = mean[:, None, :] + 0.3 * torch.randn(n, n_max, DIM, generator=gen)
    patch_mean = mean + 0.3 * torch.randn(n, DIM, generator=gen) if patch else None
    return FeatureSet(
        cls_blocks=cls_blocks,
        patch_mean=patch_mean,
        labels=labels,
        ids=[f"{prefix}{i}" for i in range(n)],
        class_names=[f"c{i}" for i in range(num_classes)],
    )


FAST = LinearProbeConfig(epochs=8, batch_size=32, n_boot=20)

# ------------------------------------------------------------------------------------------------- FeatureSet


def test_featureset_linear_input_subset_concat_and_files(tmp_path):
    fs = make_set(6, seed=0, n_max=3)
    assert fs.cls.shape == (6, DIM) and torch.equal(fs.cls, fs.cls_blocks[:, -1])
    x = fs.linear_input(2, avgpool=True)
    assert x.shape == (6, 3 * DIM)
    assert torch.equal(x[:, :DIM], fs.cls_blocks[:, 1]) and torch.equal(x[:, DIM : 2 * DIM], fs.cls_blocks[:, 2])
    assert torch.equal(x[:, 2 * DIM :], fs.patch_mean)
    with pytest.raises(ValueError, match="block"):
        fs.linear_input(4, avgpool=False)
    cnn = make_set(6, seed=0, n_max=1, patch=False)
    with pytest.raises(ValueError, match="patch"):
        cnn.linear_input(1, avgpool=True)
    with pytest.raises(ValueError, match="patch_mean"):
        fs.concat(make_set(2, seed=1, n_max=3, patch=False))

    part = fs.subset([4, 1])
    assert part.ids == ["s4", "s1"] and part.labels.tolist() == [1, 1]
    joined = part.concat(fs.subset([0]))
    assert len(joined) == 3 and joined.ids == ["s4", "s1", "s0"]
    assert not fs.is_multilabel and make_set(5, seed=0, multilabel=True).is_multilabel

    path = fs.save(tmp_path / "f" / "train.pt")
    assert set(torch.load(path, weights_only=True)) >= {"cls_blocks", "patch_mean", "labels", "ids", "class_names"}
    loaded = FeatureSet.load(path)
    assert torch.equal(loaded.cls_blocks, fs.cls_blocks) and loaded.ids == fs.ids
    assert loaded.class_names == fs.class_names and torch.equal(loaded.patch_mean, fs.patch_mean)
    npy = fs.save_npy(tmp_path / "train_cls")
    assert npy.name == "train_cls.npy" and np.load(npy).shape == (6, DIM)


# ------------------------------------------------------------------------------------------------- k-NN


TRAIN_X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
TRAIN_Y = torch.tensor([0, 1, 2, 1])


def test_knn_hand_checked_weights_on_seven_test_images():
    test = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [1.0, 0.9], [0.2, -1.0], [-0.5, 0.5], [1.0, 0.0]])
    scores = knn_predict(TRAIN_X, TRAIN_Y, test, k=2, temperature=0.5, chunk_size=3)
    assert scores.shape == (7, 3)
    # Test 0 = (3, 0), normalised (1, 0): cosine 1 with train 0 (class 0) and 1/sqrt(2) with train 3 (class 1);
    # weights exp(1/0.5) and exp(0.7071/0.5), so class 0 gets e^2 / (e^2 + e^1.4142) = sigmoid(2 - 1.4142).
    p0 = 1 / (1 + math.exp(-(2 - 2 / math.sqrt(2))))
    assert scores[0].tolist() == pytest.approx([p0, 1 - p0, 0.0], abs=1e-6)
    assert scores[6].tolist() == pytest.approx([p0, 1 - p0, 0.0], abs=1e-6)  # same direction, same scores
    assert torch.allclose(scores.sum(1), torch.ones(7))
    # The chunking does not change anything, and a single test image works.
    assert torch.allclose(scores, knn_predict(TRAIN_X, TRAIN_Y, test, k=2, temperature=0.5))
    assert torch.allclose(knn_predict(TRAIN_X, TRAIN_Y, test[:1], k=2, temperature=0.5), scores[:1])
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=2, num_classes=5).shape == (7, 5)
    assert scores.argmax(1).tolist()[:4] == [0, 1, 2, 1]


def test_knn_k_larger_than_train_set_is_capped():
    test = torch.tensor([[1.0, 0.2], [-1.0, 0.0]])
    with pytest.warns(UserWarning, match="k=10 exceeds"):
        capped = knn_predict(TRAIN_X, TRAIN_Y, test, k=10)
    assert torch.allclose(capped, knn_predict(TRAIN_X, TRAIN_Y, test, k=4))


def test_knn_multilabel_scores_are_weighted_label_shares():
    labels = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.float32)
    scores = knn_predict(TRAIN_X, labels, torch.tensor([[1.0, 0.0]]), k=2, temperature=0.5)
    # Neighbours train 0 (labels 1, 0; weight e^2) and train 3 (labels 1, 1; weight e^1.4142).
    p3 = 1 / (1 + math.exp(2 - 2 / math.sqrt(2)))
    assert scores[0].tolist() == pytest.approx([1.0, p3], abs=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(TRAIN_X, labels, TRAIN_X, k=2, num_classes=3)


def test_knn_evaluate_rows():
    train, test = make_set(30, seed=0), make_set(7, seed=1)
    with pytest.warns(UserWarning, match="exceeds"):
        rows = knn_evaluate(train, test, ks=(5, 100), n_boot=10)
    assert [(r["k"], r["k_used"], r["metric"]) for r in rows] == [
        (5, 5, "accuracy"), (5, 5, "auroc"), (100, 30, "accuracy"), (100, 30, "auroc"),
    ]  # fmt: skip
    assert rows[0]["value"] == 1.0 and rows[1]["low"] <= rows[1]["value"] <= rows[1]["high"]
    assert set(rows[1]["per_class"]) == {"c0", "c1", "c2"}
    multi = knn_evaluate(make_set(30, seed=0, multilabel=True), make_set(9, seed=1, multilabel=True), ks=(5,))
    assert [r["metric"] for r in multi] == ["auroc"] and multi[0]["value"] > 0.9


# ------------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_features():
    train, val, test = make_set(90, seed=0), make_set(45, seed=1, prefix="v"), make_set(45, seed=2, prefix="t")
    result = run_linear_probe(train, val, test, FAST)
    assert result.metric == "accuracy"
    assert len(result.grid) == 16 and not result.skipped
    assert result.test_value >= 0.95
    est = result.test["accuracy"]
    assert est.low <= est.value <= est.high and est.n_boot == 20
    assert set(result.test_per_class_auroc) == {"c0", "c1", "c2"}
    assert result.test_scores.shape == (45, 3)
    best = max(row["value"] for row in result.grid)
    assert result.val_value == best
    assert [r["metric"] for r in result.rows()] == ["accuracy", "auroc"]
    assert result.rows()[0]["setting"] == result.chosen.name


def test_linear_probe_multilabel_uses_auroc():
    sets = [make_set(n, seed=s, multilabel=True, prefix=p) for n, s, p in ((120, 0, "s"), (60, 1, "v"), (60, 2, "t"))]
    result = run_linear_probe(*sets, LinearProbeConfig(epochs=15, batch_size=32, n_boot=20, n_last_blocks=(1,)))
    assert result.metric == "auroc" and "accuracy" not in result.test
    assert result.test_value > 0.95
    assert set(result.test_per_class_auroc) == {"c0", "c1", "c2"}
    assert ((result.test_scores >= 0) & (result.test_scores <= 1)).all()


def test_selection_ignores_the_test_set():
    train, val, test = make_set(90, seed=0), make_set(45, seed=1, prefix="v"), make_set(45, seed=2, prefix="t")
    reference = run_linear_probe(train, val, test, FAST)
    gen = torch.Generator().manual_seed(5)
    corrupted = FeatureSet(
        cls_blocks=torch.randn(test.cls_blocks.shape, generator=gen),
        patch_mean=torch.randn(test.patch_mean.shape, generator=gen),
        labels=test.labels[torch.randperm(len(test), generator=gen)],
        ids=test.ids,
        class_names=test.class_names,
    )
    other = run_linear_probe(train, val, corrupted, FAST)
    assert other.grid == reference.grid
    assert other.chosen == reference.chosen
    assert other.test_value != reference.test_value


class _Spy(FeatureSet):
    """A feature set that records every read of its data in a shared event list."""

    events: list[str]

    def __getattribute__(self, name: str):
        if name in ("cls_blocks", "patch_mean", "labels"):
            object.__getattribute__(self, "events").append(f"test.{name}")
        return object.__getattribute__(self, name)


def test_test_set_is_not_read_before_the_selection(monkeypatch):
    train, val = make_set(60, seed=0), make_set(30, seed=1, prefix="v")
    base = make_set(30, seed=2, prefix="t")
    events: list[str] = []
    _Spy.events = events
    test = _Spy(base.cls_blocks, base.patch_mean, base.labels, base.ids, base.class_names)
    events.clear()

    original = lp.select_probe_setting

    def recording_select(*args, **kwargs):
        assert all(a is not test for a in args) and all(v is not test for v in kwargs.values())
        out = original(*args, **kwargs)
        events.append("selected")
        return out

    monkeypatch.setattr(lp, "select_probe_setting", recording_select)
    run_linear_probe(train, val, test, LinearProbeConfig(epochs=2, batch_size=32, n_boot=5, learning_rates=(0.01,)))
    assert "selected" in events and "test.labels" in events
    assert events.index("selected") < min(i for i, e in enumerate(events) if e.startswith("test."))


def test_retrain_on_train_plus_val(monkeypatch):
    train, val, test = make_set(60, seed=0), make_set(30, seed=1, prefix="v"), make_set(30, seed=2, prefix="t")
    calls = []
    original = lp._train_heads

    def recording_train(features, settings, num_outputs, config):
        calls.append((list(features.ids), list(settings)))
        return original(features, settings, num_outputs, config)

    monkeypatch.setattr(lp, "_train_heads", recording_train)
    result = run_linear_probe(train, val, test, FAST)
    assert len(calls) == 2
    assert calls[0] == (train.ids, FAST.settings())
    assert calls[1] == (train.ids + val.ids, [result.chosen])
    assert (result.train_size, result.retrain_size) == (60, 90)


def test_unsupported_settings_are_skipped(caplog):
    cnn = [
        make_set(n, seed=s, n_max=1, patch=False, prefix=p) for n, s, p in ((60, 0, "s"), (30, 1, "v"), (30, 2, "t"))
    ]
    with caplog.at_level("INFO", logger="dae.evaluation.linear_probe"):
        result = run_linear_probe(*cnn, FAST)
    assert [(r["n_blocks"], r["avgpool"]) for r in result.grid] == [(1, False)] * 4
    assert len(result.skipped) == 12
    assert sum("avgpool needs patch tokens" in s for s in result.skipped) == 4
    assert sum("n_last_blocks=4 > the 1 block(s)" in s for s in result.skipped) == 8
    assert "skipping linear:blocks=4:avgpool=False:lr=0.001" in caplog.text

    two_blocks = make_set(60, seed=0, n_max=2), make_set(30, seed=1, n_max=2, prefix="v")
    _, grid, skipped = select_probe_setting(*two_blocks, FAST)
    assert {r["n_blocks"] for r in grid} == {1} and len(grid) == 8 and len(skipped) == 8


def test_ties_go_to_the_smaller_lr_and_fewer_blocks(monkeypatch):
    train, val = make_set(60, seed=0), make_set(30, seed=1, prefix="v")
    monkeypatch.setattr(lp, "metric_value", lambda metric, scores, labels: 0.5)
    chosen, grid, _ = select_probe_setting(train, val, FAST)
    assert chosen == ProbeSetting(n_blocks=1, avgpool=False, lr=1e-3)
    assert {r["value"] for r in grid} == {0.5}
    monkeypatch.setattr(lp, "metric_value", lambda metric, scores, labels: math.nan)
    with pytest.raises(ValueError, match="undefined for every setting"):
        select_probe_setting(train, val, FAST)


def test_metric_resolution():
    assert resolve_metric("auto", multilabel=False, num_classes=2) == "auroc"
    assert resolve_metric("auto", multilabel=False, num_classes=5) == "accuracy"
    assert resolve_metric("auto", multilabel=True, num_classes=14) == "auroc"
    with pytest.raises(ValueError, match="multi-label"):
        resolve_metric("accuracy", multilabel=True, num_classes=3)
    with pytest.raises(ValueError, match="metric"):
        LinearProbeConfig(metric="f1")


# ------------------------------------------------------------------------------------------------- booleans


def test_str2bool_and_the_fine_tune_flag():
    for text in ("true", "True", " YES ", "1", "on"):
        assert str2bool(text) is True
    for text in ("false", "False", "no", "0", "OFF"):
        assert str2bool(text) is False
    assert str2bool(False) is False
    with pytest.raises(ValueError, match="maybe"):
        str2bool("maybe")
    with pytest.raises(TypeError):
        str2bool(None)
    parser = argparse.ArgumentParser()
    parser.add_argument("--fine-tune", type=str2bool, default=False)
    assert parser.parse_args(["--fine-tune", "False"]).fine_tune is False
    assert parser.parse_args(["--fine-tune", "true"]).fine_tune is True
    assert resolve_flag("False", "fine_tune") is False and resolve_flag(True, "fine_tune") is True
    with pytest.raises(ValueError, match="fine_tune"):
        resolve_flag("maybe", "fine_tune")


# ------------------------------------------------------------------------------------------------- fine-tuning


class _Counting:
    """A loader wrapper that counts how often it is iterated."""

    def __init__(self, loader):
        self.loader = loader
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.2 * torch.randn(n, 1, 4, 4, generator=gen)
    images.view(n, -1)[torch.arange(n), labels * 5] += 2.0  # a bright pixel whose position is the class
    return images, labels


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8))


def _loaders(test_labels_shuffled: bool = False):
    x, y = _images(96, seed=0)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = _Counting(DataLoader(TensorDataset(*_images(30, seed=1)), batch_size=16))
    tx, ty = _images(30, seed=2)
    if test_labels_shuffled:
        ty = ty[torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    test = _Counting(DataLoader(TensorDataset(tx, ty), batch_size=16))
    return train, val, test


def test_finetune_selects_the_epoch_on_val_and_tests_once():
    train, val, test = _loaders()
    model = _backbone()
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = {
        "num_classes": 3,
        "head_lr": 0.1,
        "backbone_lr": 0.01,
        "epochs": 3,
        "n_boot": 10,
        "class_names": ["a", "b", "c"],
    }
    result = run_finetune(model, train, val, test, **kwargs)
    assert result.fine_tuned and result.metric == "accuracy"
    assert len(result.history) == 3 and val.passes == 3 and test.passes == 1
    values = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == values.index(max(values)) and result.val_value == max(values)
    assert result.test_value > 0.9
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    train, val, shuffled_test = _loaders(test_labels_shuffled=True)
    other = run_finetune(_backbone(), train, val, shuffled_test, **kwargs)
    assert other.history == result.history and other.best_epoch == result.best_epoch

    train, val, test = _loaders()
    frozen = _backbone()
    before = [p.detach().clone() for p in frozen.parameters()]
    result = run_finetune(frozen, train, val, test, **{**kwargs, "fine_tune": "False"})
    assert not result.fine_tuned
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))


def test_finetune_with_dict_batches_and_multilabel():
    x, y = _images(48, seed=0)
    multi = torch.nn.functional.one_hot(y, 3).float()
    batches = [{"image": x[i : i + 16], "label": multi[i : i + 16]} for i in range(0, 48, 16)]
    result = run_finetune(
        _backbone(), batches, batches, batches, num_classes=3, multilabel=True, head_lr=0.1, epochs=2, n_boot=5
    )
    assert result.metric == "auroc" and result.test_scores.shape == (48, 3)
    assert [r["metric"] for r in result.rows()] == ["auroc"] and result.rows()[0]["protocol"] == "finetune"
