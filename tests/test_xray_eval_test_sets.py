"""Bring your own test set: the ``xray_eval`` bundle scores any labelled list, each into its own results folder.

The runs are in-process (``monai.bundle.run``, as the command line does) on a few of the shipped X-rays at
32 x 32, with one random ViT-T/16 and the k-NN protocol only, all into one output folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import monai.data
import pytest
import torch
from monai.bundle import run as bundle_run

from dae.bundle import culprit
from dae.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "bundles" / "xray_eval" / "configs" / "evaluate.yaml")]
BACKBONE = "random_vit_tiny16"
QUICK = {
    "dataset_dir": str(REPO / "data"),
    "backbones": {BACKBONE: {"kind": "dino", "checkpoint": None, "arch": "vit_tiny", "patch_size": 16}},
    "protocols": ["knn"],
    "knn_ks": [1, 3],
    "n_boot": 20,
    "image_size": 32,
    "device": "cpu",
}

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),  # MONAI's notice on trusting configs
]


def _write(path: Path, content: dict) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> dict[str, str]:
    """A training datalist without a test list, and test lists of other shipped X-rays in other files.

    ``external``: paths relative to ``external_dir``, a copy of 3 images per class; ``absolute``: absolute paths
    of 2 other images per class; ``swapped``: those of ``absolute`` with the two class names swapped.
    """
    root = tmp_path_factory.mktemp("test_sets")
    full = json.loads((REPO / "jsons" / "xray_demo.json").read_text())
    labels = full["labels"]

    def pick(split: str, start: int, n: int) -> list[dict]:
        return [e for label in (0, 1) for e in [e for e in full[split] if e["label"] == label][start : start + n]]

    external_dir = root / "external"
    external = []
    for entry in pick("test", 0, 3):
        image = Path(str(entry["label"])) / Path(entry["image"]).name
        (external_dir / image.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "data" / entry["image"], external_dir / image)
        external.append({"image": str(image), "label": entry["label"], "modality": "XR"})
    absolute = [{**e, "image": str(REPO / "data" / e["image"])} for e in pick("test", 3, 2)]
    train = {"labels": labels, "training": pick("training", 0, 4), "validation": pick("validation", 0, 2)}
    return {
        "train": _write(root / "train.json", train),
        "external": _write(root / "external.json", {"labels": labels, "test": external}),
        "external_dir": str(external_dir),
        "absolute": _write(root / "hospital_b.json", {"labels": labels, "test": absolute}),
        "swapped": _write(root / "swapped.json", {"labels": {"0": labels["1"], "1": labels["0"]}, "test": absolute}),
    }


def _evaluate(lists: dict[str, str], out: Path, **overrides) -> Path:
    bundle_run(config_file=CONFIGS, datalist=lists["train"], output_dir=str(out), **QUICK, **overrides)
    return out / "evaluation"


def _results(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())


def _test_ids(folder: Path) -> list[str]:
    return torch.load(folder / "features" / BACKBONE / "test.pt", weights_only=True)["ids"]


@pytest.mark.slow
def test_external_test_sets_are_scored_into_their_own_folders(lists, tmp_path):
    out = tmp_path / "run"
    evaluation = _evaluate(lists, out, test_datalist=lists["external"], test_dataset_dir=lists["external_dir"])
    external = evaluation / "external_test"
    first = {name: (external / name).read_bytes() for name in ("results.json", "results.csv", "results.md")}
    assert {r["test_set"] for r in _results(external)} == {"external_test"}
    assert len(_test_ids(external)) == 6
    assert first["results.md"].decode().startswith(f"Test set `external_test`: list `test` of `{lists['external']}`")
    assert (external / "pictures" / f"{BACKBONE}_patch_pca.png").is_file()

    _evaluate(lists, out, test_datalist=lists["absolute"])  # absolute paths: test_dataset_dir is not used
    hospital_b = evaluation / "hospital_b_test"
    assert sorted(p.name for p in evaluation.iterdir()) == ["external_test", "hospital_b_test"]
    assert {r["test_set"] for r in _results(hospital_b)} == {"hospital_b_test"}
    assert len(_test_ids(hospital_b)) == 4 and len(_test_ids(external)) == 6
    assert all((external / name).read_bytes() == data for name, data in first.items()), "the first test set changed"
    assert "hospital_b.json" in (hospital_b / "config.yaml").read_text()
    assert "external.json" in (external / "config.yaml").read_text()
    training = torch.load(out / "features" / BACKBONE / "training.pt", weights_only=True)
    assert len(training["ids"]) == 8  # the heads' lists stay shared under <output_dir>/features
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_a_missing_test_list_falls_back_to_validation_with_a_note(lists, tmp_path, capsys):
    validation = _evaluate(lists, tmp_path / "run") / "train_validation"  # train.json has no test list
    note = f"'{lists['train']}' has no 'test' list: its 'validation' list is scored instead"
    assert f"Note: {note}." in (validation / "results.md").read_text()
    assert {r["test_set"] for r in _results(validation)} == {"train_validation"}
    assert len(_test_ids(validation)) == 4
    log = capsys.readouterr().out
    assert f"test set train_validation: {note}" in log
    assert "4 of the 4 images of test set train_validation are in the training or validation list" in log


def test_a_test_set_with_another_class_map_fails_before_caching(lists, tmp_path, monkeypatch):
    def no_caching(self, *args, **kwargs):
        raise AssertionError("a dataset cache started filling before the error")

    monkeypatch.setattr(monai.data.CacheDataset, "_fill_cache", no_caching)
    with pytest.raises(Exception) as caught:
        _evaluate(lists, tmp_path / "run", test_datalist=lists["swapped"])
    error = culprit(caught.value)
    assert isinstance(error, DataError), f"{type(error).__name__}: {error}"
    assert lists["swapped"] in str(error) and lists["train"] in str(error)
    assert "'labels' map" in error.advice
    assert not (tmp_path / "run" / "evaluation").exists()
