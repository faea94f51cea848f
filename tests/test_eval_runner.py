"""The cosine search, the shared test estimates, the k-NN and retrieval protocols, the k-NN monitor and the runner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dae.evaluation import (
    PROTOCOLS,
    FeatureSet,
    KnnMonitor,
    accuracy,
    auroc,
    bootstrap_ci,
    classification_estimates,
    cosine_topk,
    estimate_rows,
    evaluate_backbones,
    extract_features,
    knn_predict,
    run_knn,
    run_retrieval,
)
from dae.evaluation.features import DinoBackboneExtractor
from dae.models import backbone_from_spec, build_backbone, check_backbone_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"kind": "dino", "checkpoint": None, "arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def _set(n: int, seed: int, prefix: str = "s") -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    cls = 2.0 * torch.eye(6)[labels] + torch.randn(n, 6, generator=gen)
    return FeatureSet(cls[:, None], None, labels, [f"{prefix}{i}" for i in range(n)], ["a", "b", "c"])


def _samples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Grey 32 x 32 images whose bright band's position is the class."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = 0.2 * torch.rand(1, 32, 32, generator=gen)
        image[0, 8 * (i % 3) : 8 * (i % 3) + 8] += 0.6
        out.append({"image": image, "label": torch.tensor(i % 3)})
    return out


def _loaders() -> dict[str, DataLoader]:
    sizes = {"training": (24, 0), "validation": (12, 1), "test": (12, 2)}
    return {split: DataLoader(_samples(n, seed), batch_size=8) for split, (n, seed) in sizes.items()}


# ------------------------------------------------------------------------------------------------- neighbours


def test_cosine_topk_chunks_self_exclusion_and_caps():
    gen = torch.Generator().manual_seed(0)
    gallery, query = torch.randn(9, 4, generator=gen), torch.randn(5, 4, generator=gen)
    sims, index = cosine_topk(query, gallery, k=3, chunk_size=2)
    full = F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    expected_sims, expected_index = full.topk(3, dim=1)
    torch.testing.assert_close(sims, expected_sims)
    assert torch.equal(index, expected_index)
    _, own = cosine_topk(gallery, gallery, k=8, exclude_self=True, chunk_size=4)
    assert all(i not in row for i, row in enumerate(own.tolist()))
    with pytest.warns(UserWarning, match="k=12 exceeds the 9"):
        assert cosine_topk(query, gallery, k=12)[1].shape == (5, 9)
    empty_sims, empty_index = cosine_topk(query[:0], gallery, k=2)
    assert empty_sims.shape == (0, 2) and empty_index.dtype == torch.long
    with pytest.raises(ValueError, match="same width"):
        cosine_topk(query[:, :3], gallery, k=1)
    with pytest.raises(ValueError, match="same set"):
        cosine_topk(query, gallery, k=1, exclude_self=True)


# ------------------------------------------------------------------------------------------------- estimates


def test_classification_estimates_and_rows():
    scores, labels = _set(40, seed=0).cls[:, :3].softmax(dim=1), torch.arange(40) % 3
    estimates, per_class = classification_estimates(scores, labels, ["a", "b", "c"], n_boot=50, seed=2)
    assert list(estimates) == ["accuracy", "auroc"] and set(per_class) == {"a", "b", "c"}
    assert tuple(estimates["accuracy"][:3]) == bootstrap_ci(accuracy, scores, labels, n_boot=50, seed=2)
    assert estimates["auroc"].value == auroc(scores, labels)["macro"] and estimates["auroc"].n_boot == 50
    none, _ = classification_estimates(scores, labels, n_boot=0)
    assert math.isnan(none["auroc"].low) and none["auroc"].n_boot == 0
    rows = estimate_rows("linear", "s", "auroc", estimates, per_class)
    assert [r["metric"] for r in rows] == ["auroc", "accuracy"] and rows[0]["per_class"] == per_class
    assert rows[1]["selected_by"] == "auroc" and rows[1]["n_boot"] == 50
    multi, _ = classification_estimates(scores, F.one_hot(labels, 3).float(), n_boot=5)
    assert list(multi) == ["auroc"]


# ------------------------------------------------------------------------------------------------- protocols


def test_run_knn_chooses_k_on_validation_only():
    train, val, test = _set(60, 0), _set(30, 1, "v"), _set(30, 2, "t")
    with pytest.warns(UserWarning, match="k=200 exceeds"):
        rows = run_knn(train, val, test, ks=(1, 5, 200), n_boot=10)
    assert [r["metric"] for r in rows] == ["accuracy", "auroc"] and len({r["k"] for r in rows}) == 1
    assert all(r["val_value"] == rows[0]["val_value"] and "low" in r for r in rows)
    shuffled = FeatureSet(test.cls_blocks, None, test.labels.flip(0), test.ids, test.class_names)
    with pytest.warns(UserWarning, match="k=200 exceeds"):
        assert run_knn(train, val, shuffled, ks=(1, 5, 200), n_boot=0)[0]["k"] == rows[0]["k"]


def test_run_retrieval_skips_cut_offs_beyond_the_gallery(caplog):
    gallery, query = _set(6, 0), _set(4, 1, "q")
    with caplog.at_level("WARNING"):
        rows, index, sims = run_retrieval(gallery, query, ks=(1, 5, 10))
    assert [r["metric"] for r in rows] == ["precision@1", "precision@5"] and "skipped" in caplog.text
    assert index.shape == sims.shape == (4, 5)
    assert run_retrieval(gallery, query, ks=(10,))[0] == []


def test_knn_monitor_is_the_knn_top1_and_auroc_of_the_cls_features():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, in_chans=1)
    probe, val = DataLoader(_samples(18, 0), batch_size=8), DataLoader(_samples(9, 1), batch_size=8)
    extractor = DinoBackboneExtractor(backbone, n_last_blocks=1)
    train_set, val_set = extract_features(extractor, probe), extract_features(extractor, val)
    scores = knn_predict(train_set.cls, train_set.labels, val_set.cls, k=5, temperature=0.1, num_classes=3)
    result = KnnMonitor(probe, val, k=5, temperature=0.1)(backbone)
    assert result == {"knn_top1": accuracy(scores, val_set.labels), "knn_auroc": auroc(scores, val_set.labels)["macro"]}
    assert set(result) == set(KnnMonitor.metrics) and 0.0 <= result["knn_auroc"] <= 1.0
    assert not backbone.training
    with pytest.raises(ValueError, match="amp"):
        KnnMonitor(probe, val, amp="fp8")(backbone)


# ------------------------------------------------------------------------------------------------- runner


def test_factory_accepts_the_callers_keys_only():
    assert check_backbone_spec(TINY_VIT, extra_keys=("n_last_blocks",)) == "dino"
    with pytest.raises(ValueError, match=r"unknown keys \['n_last_blocks'\]"):
        check_backbone_spec({**TINY_VIT, "n_last_blocks": 2})
    assert backbone_from_spec(TINY_VIT).patch_size == 8


def test_evaluate_backbones_rejects_unknown_protocols_and_missing_splits(tmp_path: Path):
    loaders = _loaders()
    with pytest.raises(ValueError, match=r"unknown protocols \['linear'\].*'seg_probe'"):
        evaluate_backbones({"vit": TINY_VIT}, loaders, tmp_path, ["a", "b", "c"], protocols=["linear"])
    with pytest.raises(ValueError, match=r"unknown protocols \['svm'\]"):
        evaluate_backbones({"vit": TINY_VIT}, loaders, tmp_path, ["a", "b", "c"], options={"svm": {}})
    with pytest.raises(ValueError, match=r"missing \['test'\]"):
        evaluate_backbones({"vit": TINY_VIT}, {k: loaders[k] for k in ("training", "validation")}, tmp_path, ["a"])
    with pytest.raises(ValueError, match="amp"):
        evaluate_backbones({"vit": TINY_VIT}, loaders, tmp_path, ["a", "b", "c"], amp="fp32")
    assert list(PROTOCOLS) == ["knn", "linear_probe", "retrieval", "finetune", "seg_probe"]


def test_evaluate_backbones_runs_protocols_in_registry_order(tmp_path: Path):
    torch.manual_seed(0)
    rows = evaluate_backbones(
        {"vit": {**TINY_VIT, "n_last_blocks": 2}},
        _loaders(),
        tmp_path,
        ["a", "b", "c"],
        protocols=["retrieval", "knn"],
        options={"knn": {"ks": (3,)}, "retrieval": {"ks": (1, 3)}, "linear_probe": {"epochs": 1}},
        n_boot=5,
        pictures=2,
    )
    assert [(r["protocol"], r["metric"]) for r in rows] == [
        ("knn", "accuracy"), ("knn", "auroc"), ("retrieval", "precision@1"), ("retrieval", "precision@3"),
    ]  # fmt: skip
    assert all(r["backbone"] == "vit" for r in rows)
    saved = FeatureSet.load(tmp_path / "features" / "vit" / "training.pt")
    assert len(saved) == 24 and saved.n_max == 2 and saved.class_names == ["a", "b", "c"]
    scored = tmp_path / "evaluation" / "test"  # no test set given: the loaders' test split, named test
    assert len(FeatureSet.load(scored / "features" / "vit" / "test.pt")) == 12
    assert {p.name for p in (scored / "pictures").iterdir()} == {"vit_retrieval.png", "vit_patch_pca.png"}
    assert (scored / "results.csv").exists() and (scored / "results.md").read_text().startswith("Test set `test`.")
    assert all(r["test_set"] == "test" for r in rows)


def test_evaluate_backbones_seg_probe_needs_no_features(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)

    def samples(n: int) -> list[dict[str, torch.Tensor]]:
        labels = [torch.zeros(1, 32, 32, dtype=torch.long) for _ in range(n)]
        for i, label in enumerate(labels):
            label[0, 8:24, 4 * (i % 3) : 4 * (i % 3) + 16] = 1
        return [{"image": 0.2 * torch.rand(1, 32, 32, generator=gen) + 0.5 * y.float(), "label": y} for y in labels]

    loaders = {
        split: DataLoader(samples(n), batch_size=4) for split, n in (("training", 8), ("validation", 4), ("test", 4))
    }
    torch.manual_seed(0)
    rows = evaluate_backbones(
        {"vit": TINY_VIT},
        loaders,
        tmp_path,
        ["background", "organ"],
        protocols=["seg_probe"],
        options={"seg_probe": {"learning_rates": (0.1,), "epochs": 1}},
        pictures=2,
    )
    assert [(r["protocol"], r["metric"]) for r in rows] == [("seg_probe", "dice"), ("seg_probe", "iou")]
    assert not (tmp_path / "features").exists()
    assert {p.name for p in (tmp_path / "evaluation" / "test" / "pictures").iterdir()} == {"vit_seg_probe.png"}
