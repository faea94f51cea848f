"""Segmentation evaluation on a test set of one's own, with the settings read from the run folder.

A tiny trained run folder is written here as training leaves it (``config.yaml`` with the run's settings, a
``best.pt`` of that architecture), without running the training; the FeTA bundle's evaluate.yaml runs on it
in-process (``monai.bundle.run``, as the command line does), without the overlay the run was trained with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import monai.data
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import run as bundle_run
from monai.networks.nets import SwinUNETR

from dae.bundle import culprit, save_run_record
from dae.errors import ConfigError, DataError
from dae.utils.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "feta_finetune" / "configs"
EVALUATE = [str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")]
SHAPE = (48, 48, 48)
CLASSES = {str(i): f"class{i}" for i in range(8)}
FAST = {"num_workers": 0, "cache_num_workers": 1, "amp": "none", "data_check": "basic", "eval_hd95": False}
"""Evaluation speed settings, none of them a setting of the run."""

RUN = {
    "spacing": [3.0, 3.0, 3.0],
    "roi_size": [64, 64, 64],
    "feature_size": 12,
    "num_heads": [1, 2, 3, 4],
    "mr_percentiles": [1.0, 99.0],
    "use_checkpoint": False,
}
"""What the tiny run was trained with, on top of train.yaml (as a demo run has demo.yaml)."""


def _volume(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return str(path)


def _entries(root: Path, prefix: str, count: int, absolute: bool) -> list[dict]:
    entries = []
    for i in range(count):
        rng = np.random.default_rng(i)
        image = _volume(root / f"{prefix}{i}_t2.nii.gz", rng.uniform(0, 100, SHAPE).astype(np.float32))
        label = _volume(root / f"{prefix}{i}_seg.nii.gz", rng.integers(0, 8, SHAPE, dtype=np.uint8))
        paths = (image, label) if absolute else (Path(image).name, Path(label).name)
        entries.append({"image": paths[0], "label": paths[1], "modality": "T2"})
    return entries


@dataclass
class TinyRun:
    """A run folder as a fine-tuning run leaves it, its data, and a test set in another folder."""

    run: Path
    data: Path
    external: Path


@pytest.fixture(scope="module")
def tiny_run(module_tmp_path: Path) -> TinyRun:
    root = module_tmp_path
    data, elsewhere, run = root / "data", root / "elsewhere", root / "run"
    for folder in (data, elsewhere):
        folder.mkdir()
    train, val = _entries(data, "train", 1, absolute=False), _entries(data, "val", 1, absolute=False)
    datalist = data / "seg.json"  # no "test" list: evaluation falls back to "validation"
    datalist.write_text(json.dumps({"labels": CLASSES, "training": train, "validation": val}))
    external = elsewhere / "hospital_b.json"  # absolute paths, scored from its "test" list
    external.write_text(json.dumps({"labels": CLASSES, "test": _entries(elsewhere, "test", 2, absolute=True)}))
    overlay = root / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({**RUN, "dataset_dir": str(data), "datalist": str(datalist)}))
    config = monai.bundle.ConfigParser.load_config_files([str(CONFIGS / "train.yaml"), str(overlay)])
    save_run_record(run, {**config, "output_dir": str(run)})  # what training writes before its first epoch
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=8, feature_size=12, num_heads=(1, 2, 3, 4), use_v2=False)
    save_checkpoint({"model": network.state_dict(), "epoch": 1}, run / "checkpoints" / "best.pt")
    return TinyRun(run, data, external)


@pytest.fixture(scope="module")
def first_evaluation(tiny_run: TinyRun) -> Path:
    """The run evaluated on its own datalist, with nothing but the run folder (and speed settings) given."""
    bundle_run(config_file=EVALUATE, output_dir=str(tiny_run.run), **FAST)
    return tiny_run.run / "evaluation" / "seg_validation"


@pytest.mark.slow
def test_the_runs_settings_are_used_and_the_fallback_is_noted(first_evaluation: Path) -> None:
    # train.yaml's network (feature_size 48) could not load best.pt: the run's 12 came from config.yaml.
    summary = json.loads((first_evaluation / "summary.json").read_text())
    assert summary["test_set"] == "seg_validation" and summary["split"] == "validation"
    assert summary["num_cases"] == 1 and 0.0 <= summary["mean_dice"] <= 1.0
    assert "no 'test' list" in summary["note"] and summary["datalist"].endswith("seg.json")
    assert "no 'test' list" in (first_evaluation / "summary.md").read_text()
    assert len((first_evaluation / "per_case.csv").read_text().splitlines()) == 1 + 7


@pytest.mark.slow
def test_an_external_list_with_absolute_paths_gets_its_own_folder(tiny_run: TinyRun, first_evaluation: Path) -> None:
    before = (first_evaluation / "summary.json").read_text()
    bundle_run(config_file=EVALUATE, output_dir=str(tiny_run.run), test_datalist=str(tiny_run.external), **FAST)
    external = tiny_run.run / "evaluation" / "hospital_b_test"
    summary = json.loads((external / "summary.json").read_text())
    assert summary["test_set"] == "hospital_b_test" and summary["split"] == "test" and "note" not in summary
    assert summary["num_cases"] == 2
    cases = {row.split(",")[0] for row in (external / "per_case.csv").read_text().splitlines()[1:]}
    assert all(Path(case).parent == tiny_run.external.parent for case in cases)  # scored from where they lie
    assert (first_evaluation / "summary.json").read_text() == before  # the first test set's results are kept


def _no_caching(self, *args, **kwargs):
    raise AssertionError("a dataset cache started filling before the error")


def _error_of(monkeypatch: pytest.MonkeyPatch, **overrides) -> BaseException:
    monkeypatch.setattr(monai.data.CacheDataset, "_fill_cache", _no_caching)
    with pytest.raises(Exception) as caught:
        bundle_run(config_file=EVALUATE, **{**FAST, **overrides})
    return culprit(caught.value)


def test_a_command_line_value_that_contradicts_the_run_is_an_error(tiny_run: TinyRun, monkeypatch) -> None:
    error = _error_of(monkeypatch, output_dir=str(tiny_run.run), feature_size=24, roi_size=[64, 64, 64])
    assert isinstance(error, ConfigError)
    message = str(error)
    assert "feature_size" in message and "24" in message and "12" in message
    assert str(tiny_run.run / "config.yaml") in message
    assert "roi_size" not in message  # given, but as the run had it


def test_a_run_folder_without_config_yaml_is_named(tiny_run: TinyRun, tmp_path, monkeypatch) -> None:
    error = _error_of(monkeypatch, output_dir=str(tmp_path), test_datalist=str(tiny_run.external))
    assert isinstance(error, ConfigError)
    assert str(tmp_path / "config.yaml") in str(error) and "demo.yaml" in error.advice


def test_the_test_list_is_checked_before_caching(tiny_run: TinyRun, tmp_path, monkeypatch) -> None:
    content = json.loads(tiny_run.external.read_text())
    content["test"][1]["label"] = _volume(tmp_path / "label9.nii.gz", np.full(SHAPE, 9, np.uint8))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    error = _error_of(monkeypatch, output_dir=str(tiny_run.run), test_datalist=str(bad), data_check="deep")
    assert isinstance(error, DataError)
    assert "label9.nii.gz" in str(error) and "9" in str(error)


# ---------------------------------------------------------------- adopt_run_settings on a config of its own

BUNDLE = """
imports:
  - $import json
  - $import dae
  - $import dae.bundle
output_dir: {out}
root: /data
folder: "$@root + '/images'"
width: 48
names: "$['background', @folder]"
transform:
  _target_: ScaleIntensityRanged
  keys: image
  a_min: "$@window[0]"
  a_max: "$@window[1]"
  b_min: 0.0
  b_max: 1.0
window: [-100.0, 200.0]
initialize:
  - "$dae.bundle.adopt_run_settings(['width', 'names', 'transform', 'window'], ['folder'])"
run:
  - "$open(@output_dir + '/seen.json', 'w').write(json.dumps([@width, @names, @folder, @transform.scaler.a_min]))"
"""


@pytest.fixture
def small_bundle(tmp_path) -> tuple[list[str], Path]:
    out = tmp_path / "run"
    base = tmp_path / "train.yaml"
    base.write_text(BUNDLE.format(out=out))
    return [str(base)], out


def _save_run(out: Path, **changes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(changes))


def _seen(out: Path) -> list:
    return json.loads((out / "seen.json").read_text())


def test_saved_expressions_nested_items_and_overridable_keys(small_bundle) -> None:
    files, out = small_bundle
    transform = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "$@window[1]", "a_max": 300.0}
    _save_run(out, width=12, window=[0.0, 50.0], transform=transform, folder="$@root + '/run_images'", root="/data")
    bundle_run(config_file=files)
    assert _seen(out) == [12, ["background", "/data/run_images"], "/data/run_images", 50.0]
    bundle_run(config_file=files, folder="/moved", width=12)  # a data location may be given; a setting as saved
    assert _seen(out) == [12, ["background", "/moved"], "/moved", 50.0]


def test_a_saved_expression_whose_references_changed_is_refused(small_bundle) -> None:
    files, out = small_bundle
    _save_run(out, names="$['background', @root]", root="/elsewhere")
    with pytest.raises(Exception) as caught:
        bundle_run(config_file=files)
    error = culprit(caught.value)
    assert isinstance(error, ConfigError)
    assert "names" in str(error) and "'root'" in str(error) and "/elsewhere" in str(error)


def test_without_config_yaml_the_settings_an_overlay_gives_are_used(small_bundle, caplog) -> None:
    files, out = small_bundle
    overlay = Path(files[0]).with_name("demo.yaml")
    overlay.write_text("width: 24\n")
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="dae.bundle.run_settings"):
        bundle_run(config_file=[*files, str(overlay)])
    assert _seen(out)[0] == 24 and "config.yaml does not exist" in caplog.text
    with pytest.raises(Exception) as caught:
        bundle_run(config_file=files)
    assert "config.yaml does not exist" in str(culprit(caught.value))
