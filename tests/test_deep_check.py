"""Tests of the deep datalist check, the entry-naming CacheDataset and required labels (tiny files in tmp_path)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, LoadImaged, RandFlipd, SelectItemsd
from PIL import Image

import dae.data.deep_check as deep_check_module
from dae.cli import main
from dae.data import (
    CacheDataset,
    DatalistError,
    ModalitySummary,
    check_data,
    deep_check_lists,
    load_datalist,
    load_splits,
)
from dae.errors import ConfigError, DataError

SHAPE = (8, 9, 10)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return str(path)


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _label(values: tuple[int, ...] = (0, 1, 2), shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.resize(np.array(values, dtype=np.uint8), shape)


def _png(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 14), dtype=np.uint8)).save(path)
    return str(path)


def _write(path: Path, content: Mapping) -> str:
    path.write_text(json.dumps(content))
    return str(path)


def _clean_files(tmp_path: Path) -> dict[str, list[dict]]:
    """Two CTs (one NIfTI, one NRRD with a NIfTI label flipped along y, same grid) and an MR without a label."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    flipped = affine.copy()
    flipped[1, 1], flipped[1, 3] = -2.0, 2.0 * (SHAPE[1] - 1)  # y runs the other way over the same world grid
    nrrd = sitk.GetImageFromArray(np.transpose(_volume(1), (2, 1, 0)))  # ITK arrays are (z, y, x)
    nrrd.SetSpacing((2.0, 2.0, 3.0))
    nrrd.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # LPS: the same voxels as the RAS affine
    sitk.WriteImage(nrrd, str(tmp_path / "ct1.nrrd"))
    return {
        "training": [
            {
                "image": _nifti(tmp_path / "ct0.nii.gz", _volume(0) * 100),
                "label": _nifti(tmp_path / "ct0_seg.nii.gz", _label()),
                "modality": "CT",
            },
            {
                "image": str(tmp_path / "ct1.nrrd"),
                "label": _nifti(tmp_path / "ct1_seg.nii.gz", _label()[:, ::-1].copy(), flipped),
                "modality": "CT",
            },
        ],
        "validation": [{"image": _nifti(tmp_path / "mr.nii.gz", _volume(2) + 5), "modality": "T2"}],
    }


def _loaded(lists: Mapping[str, list[dict]], tmp_path: Path) -> dict[str, list[dict]]:
    path = _write(tmp_path / "list.json", lists)
    return {key: load_datalist(path, key=key, validate=False) for key in lists}


# ------------------------------------------------------------------------------------------- deep check
def test_every_fault_reported_at_once(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", _volume())
    truncated = tmp_path / "truncated.nii.gz"
    data = Path(_nifti(truncated, _volume(3))).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    nan = _volume(4)
    nan[1, 2, 3] = np.nan
    entries = [
        {"image": good, "label": _nifti(tmp_path / "good_seg.nii.gz", _label()), "modality": "CT"},
        {"image": str(truncated), "modality": "CT"},
        {"image": _nifti(tmp_path / "nan.nii.gz", nan), "modality": "CT"},
        {"image": _nifti(tmp_path / "constant.nii.gz", np.zeros(SHAPE, np.float32)), "modality": "MR"},
        {"image": good, "label": _nifti(tmp_path / "high_seg.nii.gz", _label((0, 1, 7))), "modality": "CT"},
        {"image": good, "label": _nifti(tmp_path / "small_seg.nii.gz", _label(shape=(8, 9, 9))), "modality": "CT"},
    ]
    other = [{"image": good, "label": str(tmp_path / "good_seg.nii.gz"), "modality": "CT", "id_table": "atlas"}]
    lists = _loaded({"training": entries, "validation": other}, tmp_path)
    with pytest.raises(DatalistError) as info:
        check_data(lists, "deep", num_classes=3, label_maps={"totalseg": {1: 1}}, workers=2, source="list.json")
    lines = str(info.value).splitlines()
    assert lines[0] == "Data check of list.json ('training', 'validation'): 6 of 7 entries are invalid:"
    assert lines[1].startswith(f"  [training 1] {truncated}: cannot decode image (EOFError: ")
    assert lines[2] == f"  [training 2] {tmp_path / 'nan.nii.gz'}: 1 of 720 voxels are not finite (NaN or Inf)"
    assert lines[3] == f"  [training 3] {tmp_path / 'constant.nii.gz'}: constant image (every voxel is 0)"
    assert (
        lines[4]
        == f"  [training 4] {good}: label {tmp_path / 'high_seg.nii.gz'}: values [7] are outside the classes 0..2"
    )
    assert lines[5] == f"  [training 5] {good}: label shape (8, 9, 9) differs from image shape (8, 9, 10)"
    assert lines[6] == f"  [validation 0] {good}: id_table 'atlas' is not a key of label_maps (keys: totalseg)"
    assert len(lines) == 7 and info.value.advice.startswith("fix or remove the named entries")


def test_label_grid_values_and_channels(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "image.nii.gz", _volume())
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 1.0
    lists = {
        "training": [
            {"image": image, "label": _nifti(tmp_path / "shifted.nii.gz", _label(), shifted), "modality": "CT"},
            {"image": image, "label": _nifti(tmp_path / "half.nii.gz", _label() / 2), "modality": "CT"},
            {"image": _nifti(tmp_path / "rgb.nii.gz", np.ones((*SHAPE, 3), np.float32)), "modality": "CT"},
            {"image": image, "label": _nifti(tmp_path / "ts.nii.gz", _label((0, 5, 9))), "modality": "CT"},
        ]
    }
    lists["training"][3]["id_table"] = "ts"
    with pytest.raises(DatalistError) as info:
        deep_check_lists(lists, num_classes=3, label_maps={"ts": {5: 1}}, workers=0)
    message = str(info.value)
    assert f"[training 0] {image}: label grid differs from the image's by up to 1 mm" in message
    assert f"label {tmp_path / 'half.nii.gz'}: values must be integers, found 0.5" in message
    assert f"[training 2] {tmp_path / 'rgb.nii.gz'}: 3 channels (shape (8, 9, 10, 3)); expected one" in message
    assert ": values [9] are neither 0 nor ids of label_maps['ts']" in message


def test_clean_lists_pass_with_summaries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lists = _loaded(_clean_files(tmp_path), tmp_path)
    with caplog.at_level(logging.INFO, logger="dae.data.deep_check"):
        summaries = check_data(lists, "deep", num_classes=3, require_label=False, workers=2)
    assert sorted(summaries) == ["CT", "T2"]
    ct = summaries["CT"]
    assert isinstance(ct, ModalitySummary) and ct.count == 2
    assert ct.shape == ((8, 8), (9, 9), (10, 10)) and ct.spacing == ((2, 2, 2), (2, 2, 2), (3, 3, 3))
    assert ct.intensity["min"][0] < ct.intensity["p1"][0] < ct.intensity["median"][1] < ct.intensity["max"][1]
    assert summaries["T2"].intensity["median"][0] == pytest.approx(5, abs=0.5)
    assert "3 entries OK, 3 files decoded, 0 results from the cache" in caplog.text
    assert "CT: 2 images" in caplog.text and "shape: 8 x 9 x 10" in caplog.text
    assert "spacing mm (min/median/max per axis): 2/2/2 x 2/2/2 x 3/3/3" in caplog.text


def test_cache_skips_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = _loaded(_clean_files(tmp_path), tmp_path)
    first = check_data(lists, "deep", output_dir=str(tmp_path / "run"), workers=0)
    assert (tmp_path / "run" / "data_check.json").is_file()
    decoded = []
    inspect = deep_check_module.inspect_entry
    monkeypatch.setattr(deep_check_module, "inspect_entry", lambda *args: decoded.append(args[0]) or inspect(*args))
    assert check_data(lists, "deep", output_dir=str(tmp_path / "run"), workers=0) == first
    assert decoded == []
    _nifti(tmp_path / "mr.nii.gz", _volume(5) + 5)  # rewritten: new size or modification time
    check_data(lists, "deep", output_dir=str(tmp_path / "run"), workers=0)
    assert decoded == [str(tmp_path / "mr.nii.gz")]


def test_levels(tmp_path: Path) -> None:
    lists = {"training": [{"image": str(tmp_path / "gone.nii.gz"), "modality": "CT", "label": 4}]}
    assert check_data(lists, "off") == {} and check_data(lists, False) == {}
    with pytest.raises(DatalistError, match=r"image does not exist; class label 4 is outside 0\.\.1"):
        check_data(lists, "basic", num_classes=2)
    with pytest.raises(ConfigError, match=r"data_check must be one of deep, basic, off, got 'full'"):
        check_data(lists, "full")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lists = _clean_files(tmp_path)
    lists["test"] = [{"image": lists["validation"][0]["image"], "label": lists["training"][0]["label"]}]
    lists["test"][0]["modality"] = "CT"
    lists["labels"] = {"0": "background", "1": "a", "2": "b"}
    path = _write(tmp_path / "list.json", lists)
    assert main(["validate-datalist", path, "--deep", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "CT: 3 images" in out and "T2: 1 images" in out
    assert all(f"[{key}]" in out for key in ("training", "validation", "test"))
    assert main(["validate-datalist", path, "--deep", "--workers", "0", "--num-classes", "2"]) == 1
    err = capsys.readouterr().err
    assert (
        "[training 0]" in err and "[test 0]" in err and "ct0_seg.nii.gz: values [2] are outside the classes 0..1" in err
    )
    lists["test"][0]["image"] = str(tmp_path / "missing.nii.gz")
    path = _write(tmp_path / "list.json", lists)
    assert main(["validate-datalist", path]) == 1  # the header check of every split, test included
    assert "(key 'test')" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- CacheDataset
@pytest.mark.parametrize("cache_rate", [1.0, 0.0])
def test_cache_dataset_names_the_entry(tmp_path: Path, cache_rate: float) -> None:
    good = _nifti(tmp_path / "good.nii.gz", _volume())
    data = [
        {"image": good, "label": _nifti(tmp_path / "seg.nii.gz", _label())},
        {"image": good, "label": str(tmp_path / "absent_seg.nii.gz")},
    ]
    transform = Compose([LoadImaged(["image", "label"], image_only=True), RandFlipd(["image", "label"], prob=0.5)])
    with pytest.raises(DataError) as info:
        dataset = CacheDataset(data, transform, cache_rate=cache_rate, progress=False)
        assert dataset[0]["image"].shape == SHAPE
        dataset[1]
    message = str(info.value)
    assert message.startswith(f"Cannot prepare dataset entry 1 (image {good}, label {tmp_path / 'absent_seg.nii.gz'})")
    assert "in transform LoadImaged" in message and "absent_seg.nii.gz" in message
    assert info.value.__cause__ is not None


def test_cache_dataset_names_a_missing_key() -> None:
    dataset = CacheDataset([{"image": 1, "label": 0}, {"image": 2}], Compose([SelectItemsd(["image", "label"])]), 0.0)
    with pytest.raises(DataError, match=r"entry 1 \(image 2\) in transform SelectItemsd: KeyError: .*Key `label`"):
        dataset[1]


# ------------------------------------------------------------------------------------------- required labels
def test_missing_xray_labels_named(tmp_path: Path) -> None:
    entries = [{"image": _png(tmp_path / f"{i}.png", i), "modality": "XR", "label": i % 2} for i in range(3)]
    del entries[1]["label"]
    entries[2]["label"] = "mask.png"
    path = _write(tmp_path / "xray.json", {"training": entries[:1], "validation": entries})
    assert load_datalist(path, key="validation", validate=False)[1].get("label") is None  # optional by default
    with pytest.raises(DatalistError) as info:
        load_datalist(path, key="validation", require_label="class")
    lines = str(info.value).splitlines()
    assert lines[0] == f"Datalist '{path}' (key 'validation'): 2 of 3 entries are invalid:"
    assert lines[1:] == [
        f"  [1] {entries[1]['image']}: no 'label' (an integer class index is required)",
        f"  [2] {entries[2]['image']}: 'label' must be an integer class index, got 'mask.png'",
    ]
    with pytest.raises(DatalistError, match=r"\(key 'validation'\).*\n  \[1\] .*1\.png: no 'label'"):
        load_splits(path, None, splits=("training", "validation"))
    with pytest.raises(ValueError, match="require_label must be one of"):
        load_datalist(path, key="training", require_label="yes")
