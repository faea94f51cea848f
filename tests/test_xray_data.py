"""Tests of the 2D X-ray data layer: reader, DAX preprocessing, X-ray datalists (multi-crop: test_multicrop.py)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ScaleIntensityd
from PIL import Image
from scipy.ndimage import gaussian_filter

import dae.data.xray as xray_module
from dae.cli import main
from dae.data import (
    DatalistError,
    DAXPreprocessd,
    LoadXRayd,
    RandDAXPreprocessd,
    dax_preprocess,
    list_loaders,
    load_datalist,
    load_splits,
    make_xray_datalist,
    read_xray,
    xray_preprocessing,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
KERMANY = DATA / "xray" / "kermany"
XRAY_LIST = REPO / "jsons" / "xray_demo.json"
JPEGS = [KERMANY / "NORMAL" / "IM-0642-0001.jpeg", KERMANY / "PNEUMONIA" / "person275_bacteria_1293.jpeg"]


def _write_dicom(path: Path, array: np.ndarray, tags: dict[str, str], monochrome1: bool = False) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.2, 0.3))  # x (columns), y (rows)
    for key, value in tags.items():
        image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)
    if monochrome1:  # SimpleITK always writes MONOCHROME2; patch the tag (same length)
        data = path.read_bytes()
        assert data.count(b"MONOCHROME2 ") == 1
        path.write_bytes(data.replace(b"MONOCHROME2 ", b"MONOCHROME1 "))


# ----------------------------------------------------------------------------------------------- reader


def test_read_shipped_jpegs() -> None:
    for path in JPEGS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # R = G = B: no luminance warning
            array, meta = read_xray(path)
        expected = np.asarray(Image.open(path))[..., 0]
        assert array.dtype == np.float32 and array.shape == (224, 224)
        np.testing.assert_array_equal(array, expected)
        assert meta["format"] == "JPEG" and meta["bit_depth"] == 8 and meta["max_value"] == 255.0
        assert meta["photometric_interpretation"] == "RGB" and not meta["inverted"]
        assert all(math.isnan(s) for s in meta["spacing"]) and meta["filename_or_obj"] == str(path)


def test_read_16bit_png_and_tiffs(tmp_path: Path) -> None:
    values = (np.arange(12 * 20).reshape(12, 20) * 271).astype(np.uint16)  # up to 64769, not a multiple of 257
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "a.tif")
    floats = np.linspace(-0.5, 3.25, 12 * 20, dtype=np.float32).reshape(12, 20)
    Image.fromarray(floats).save(tmp_path / "f.tiff")
    for name in ("a.png", "a.tif"):
        array, meta = read_xray(tmp_path / name)
        np.testing.assert_array_equal(array, values.astype(np.float32))
        assert (meta["bit_depth"], meta["max_value"]) == (16, 65535.0)
        assert meta["photometric_interpretation"] == "MONOCHROME2"
    array, meta = read_xray(tmp_path / "f.tiff")
    np.testing.assert_array_equal(array, floats)
    assert meta["format"] == "TIFF" and meta["bit_depth"] == 32 and math.isnan(meta["max_value"])


def test_colour_image_becomes_luminance_with_warning(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match="unequal channels"):
        array, _ = read_xray(tmp_path / "c.png")
    np.testing.assert_allclose(array, 0.299 * 100 + 0.587 * 50 + 0.114 * 200, rtol=1e-6)


def test_read_dicom_rescale_spacing_and_monochrome1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = (np.arange(6 * 8).reshape(6, 8) * 20).astype(np.uint16)
    # Stored values are (value - intercept) / slope; the reader must give the values back.
    _write_dicom(tmp_path / "m2.dcm", values, {"0028|1052": "-100", "0028|1053": "2"})
    array, meta = read_xray(tmp_path / "m2.dcm")
    np.testing.assert_array_equal(array, values)
    raw = np.frombuffer((tmp_path / "m2.dcm").read_bytes()[-values.size * 2 :], dtype=np.uint16).reshape(6, 8)
    np.testing.assert_array_equal(raw, (values.astype(int) + 100) // 2)
    assert meta["format"] == "DICOM" and meta["bit_depth"] == 16 and not meta["inverted"]
    assert meta["max_value"] == 2 * 65535 - 100
    assert meta["spacing"] == pytest.approx((0.3, 0.2))  # (row, column)

    # MONOCHROME1: low stored values are shown white; after reading, the "bone" (stored 0) is the brightest.
    stored = np.full((6, 8), 30000, dtype=np.uint16)
    stored[2:4, 3:6] = 0
    _write_dicom(tmp_path / "m1.dcm", stored, {"0008|0060": "DX"}, monochrome1=True)
    array, meta = read_xray(tmp_path / "m1.dcm")
    assert meta["photometric_interpretation"] == "MONOCHROME1" and meta["inverted"]
    np.testing.assert_array_equal(array, 65535.0 - stored)
    assert array[2:4, 3:6].min() > array.max() - 1 and meta["spacing"] == pytest.approx((0.3, 0.2))
    # With a SimpleITK that leaves MONOCHROME1 as stored, read_xray inverts within the nominal range itself.
    monkeypatch.setattr(xray_module, "_sitk_inverts_monochrome1", lambda: False)
    as_read = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m1.dcm")))[0]
    np.testing.assert_array_equal(read_xray(tmp_path / "m1.dcm")[0], 65535.0 - as_read)


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.png"):
        read_xray(tmp_path / "nothere.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        read_xray(tmp_path / "broken.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint16)), str(tmp_path / "vol.mha"))
    with pytest.raises(ValueError, match=r"vol\.mha.*3-D"):
        read_xray(tmp_path / "vol.mha")
    frames = [Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in range(2)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"stack\.tif.*2 frames"):
        read_xray(tmp_path / "stack.tif")


def test_read_mha_2d_and_load_transform(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(4, 5))
    image.SetSpacing((0.5, 0.25))
    sitk.WriteImage(image, str(tmp_path / "x.mha"))
    array, meta = read_xray(tmp_path / "x.mha")
    np.testing.assert_array_equal(array, np.arange(20).reshape(4, 5))
    assert meta["format"] == "MetaImage" and meta["spacing"] == (0.25, 0.5) and meta["max_value"] == 32767.0
    out = LoadXRayd("image")({"image": str(JPEGS[0]), "label": 0})
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, 224, 224)
    assert out["image"].dtype == torch.float32 and out["image"].meta["bit_depth"] == 8 and out["label"] == 0


# ----------------------------------------------------------------------------------------------- DAX preprocessing


def _hand_image() -> np.ndarray:
    """8x8: a 1-pixel border of 100 around a 6x6 ROI (margin 8 // 8 = 1) of eighteen 10s and eighteen 30s."""
    img = np.full((8, 8), 100.0, dtype=np.float32)
    roi = np.array([10.0, 30.0] * 18, dtype=np.float32).reshape(6, 6)
    img[1:7, 1:7] = roi
    return img


def test_dax_preprocess_by_hand() -> None:
    img = _hand_image()
    # ROI median = (10 + 30) / 2 = 20, std = 10, so cval = 20 + 3 * 10 = 50 and min(x, 50) / 50 gives
    # 0.2 (10), 0.6 (30) and 1.0 (border); neglog gives ln 5, ln(5/3) and 0. ROI min-max: (x - ln(5/3)) / ln 3.
    out = dax_preprocess(img)
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out[1:7, 1:7], np.where(img[1:7, 1:7] == 10, 1.0, 0.0), atol=1e-6)
    assert np.all(out[0] == 0) and np.all(out[:, 0] == 0)  # (0 - ln(5/3)) / ln 3 < 0, clipped
    # c = 1: cval = 30, so 10 -> 1/3, 30 -> 1, border -> 1; neglog ln 3, 0, 0; ROI range [0, ln 3].
    np.testing.assert_allclose(dax_preprocess(img, contrast_factor=1.0)[1:7, 1:7], out[1:7, 1:7], atol=1e-6)
    # Without the negative log (DAX v2's other branch): raw ROI min-max, 10 -> 0, 30 -> 1, border clipped to 1.
    raw = dax_preprocess(img, neglog=False)
    np.testing.assert_allclose(raw, np.where(img == 10, 0.0, 1.0))

    # Low-pass subtraction happens after the neglog, before the ROI min-max.
    x = -np.log(np.minimum(img, 50) / 50)
    x = x - gaussian_filter(x, 2.0)
    lo, hi = x[1:7, 1:7].min(), x[1:7, 1:7].max()
    expected = np.clip((x - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(dax_preprocess(img, subtract_lowpass=True, lowpass_sigma=2.0), expected, atol=1e-5)


def test_dax_preprocess_non_square_tensor_and_degenerate_inputs() -> None:
    wide = np.full((8, 16), 100.0, dtype=np.float32)
    wide[1:7, 2:14] = np.array([10.0, 30.0] * 36).reshape(6, 12)  # margins 8 // 8 = 1 and 16 // 8 = 2
    tensor = MetaTensor(torch.from_numpy(wide)[None], meta={"bit_depth": 16})
    out = dax_preprocess(tensor)
    assert isinstance(out, MetaTensor) and out.shape == (1, 8, 16) and out.dtype == torch.float32
    assert out.meta["bit_depth"] == 16
    np.testing.assert_allclose(out[0, 1:7, 2:14].numpy(), np.where(wide[1:7, 2:14] == 10, 1.0, 0.0), atol=1e-6)

    constant = dax_preprocess(np.full((8, 8), 7.0, dtype=np.float32))
    assert constant.dtype == np.float32 and np.all(constant == 0)
    assert np.all(dax_preprocess(np.full((8, 8), 7.0), neglog=False) == 0)
    zeros = np.zeros((8, 8), dtype=np.uint16)
    zeros[0, 0] = 500  # outside the ROI: the ROI is all zero, so cval = 0
    with pytest.warns(UserWarning, match="not positive"):
        out = dax_preprocess(torch.from_numpy(zeros.astype(np.int32)))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and torch.all(out == 0)
    with pytest.raises(ValueError, match="shape"):
        dax_preprocess(np.zeros((2, 8, 8)))


def test_rand_dax_preprocess_is_seeded() -> None:
    img = _hand_image()
    img[1, 1] = 17.0  # makes the neglog output depend on the contrast factor
    transform = RandDAXPreprocessd("image")
    transform.set_random_state(seed=3)
    outputs = [transform({"image": img})["image"] for _ in range(12)]
    state = np.random.RandomState(3)
    for out in outputs:
        do_neglog = state.rand() < 0.5
        contrast = state.uniform(2.0, 3.5)
        np.testing.assert_array_equal(out, dax_preprocess(img, contrast_factor=contrast, neglog=do_neglog))
    raw = dax_preprocess(img, neglog=False)
    branches = {bool(np.array_equal(out, raw)) for out in outputs}
    assert branches == {True, False}  # both branches occur in 12 draws with this seed
    again = RandDAXPreprocessd("image").set_random_state(seed=3)
    np.testing.assert_array_equal(again({"image": img})["image"], outputs[0])


def test_preprocessing_factory() -> None:
    assert isinstance(xray_preprocessing("dax", contrast_factor=2.5), DAXPreprocessd)
    assert isinstance(xray_preprocessing("dax_v2", prob=1.0), RandDAXPreprocessd)
    minmax = xray_preprocessing("minmax")
    assert isinstance(minmax, ScaleIntensityd)
    image = LoadXRayd("image")({"image": str(JPEGS[0])})["image"]
    out = minmax({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.min() == 0 and out.max() == 1 and out.meta["bit_depth"] == 8
    assert torch.all(minmax({"image": torch.full((1, 4, 4), 9.0)})["image"] == 0)
    with pytest.raises(ValueError, match="Unknown"):
        xray_preprocessing("clahe")
    with pytest.raises(ValueError, match="no options"):
        xray_preprocessing("minmax", contrast_factor=3.0)
    with pytest.raises(ValueError, match="subtract_lowpass"):
        xray_preprocessing("minmax", subtract_lowpass=True)
    assert isinstance(xray_preprocessing("dax_v2", deterministic=True), DAXPreprocessd)
    assert xray_preprocessing("dax", subtract_lowpass=True).kwargs["subtract_lowpass"] is True
    assert isinstance(xray_preprocessing("minmax", deterministic=True, subtract_lowpass=False), ScaleIntensityd)


def test_splits_are_checked_before_caching_and_loaded_in_order(tmp_path: Path) -> None:
    transform = Compose([LoadXRayd("image"), xray_preprocessing("minmax")])
    loaders = list_loaders(
        load_splits(XRAY_LIST, REPO / "data", ("validation",)), transform, batch_size=4, cache_rate=0.0
    )
    batch = next(iter(loaders["validation"]))
    assert batch["image"].shape[0] == 4 and "label" in batch
    broken = json.loads(XRAY_LIST.read_text())
    broken["test"][-1]["image"] = "xray/missing.png"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(DatalistError, match=r"missing\.png"):
        load_splits(path, REPO / "data")


# ----------------------------------------------------------------------------------------------- datalists


def _mock_xray_folder(root: Path) -> Path:
    """6 patients (3 per class), 1-3 PNGs each, in class folders, plus labels.csv."""
    folder = root / "xrays"
    rows = []
    for p in range(6):
        label = "SICK" if p % 2 else "WELL"
        for k in range(1 + p % 3):
            path = Path(label) / f"p{p}_{k}.png"
            (folder / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 5), 10 * p + k, dtype=np.uint8)).save(folder / path)
            rows.append({"path": path.as_posix(), "label": label, "patient": f"p{p}", "view": "PA"})
    with (folder / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient", "view"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_make_xray_datalist(tmp_path: Path) -> None:
    folder = _mock_xray_folder(tmp_path)
    output = tmp_path / "lists" / "x.json"
    content = make_xray_datalist(folder, output, folder / "labels.csv", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert json.loads(output.read_text()) == content
    assert content["labels"] == {"0": "SICK", "1": "WELL"} and content["tensorImageSize"] == "2D"
    patients = {key: {e["patient"] for e in content[key]} for key in ("training", "validation", "test")}
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"])
    assert not patients["validation"] & patients["test"]
    assert set().union(*patients.values()) == {f"p{p}" for p in range(6)}
    entries = [e for key in ("training", "validation", "test") for e in content[key]]
    assert len(entries) == 12 and all(e["image"].startswith("../xrays/") for e in entries)
    assert {(e["label"], e["image"].split("/")[2]) for e in entries} == {(0, "SICK"), (1, "WELL")}
    for key in ("training", "validation", "test"):  # relative to the output's folder, as load_datalist resolves them
        loaded = load_datalist(output, key=key, data_root=output.parent)
        assert all(Path(e["image"]).is_file() and e["modality_group"] == "XR" and e["view"] == "PA" for e in loaded)
    assert make_xray_datalist(folder, output, folder / "labels.csv", val_fraction=0.2, test_fraction=0.2, seed=1) == (
        content
    )

    # Through the CLI, paths relative to --data-root, without a test list.
    out = tmp_path / "cli.json"
    args = [str(folder), "--output", str(out), "--labels", str(folder / "labels.csv"), "--test-fraction", "0"]
    assert main(["make-xray-datalist", *args, "--data-root", str(tmp_path)]) == 0
    cli = json.loads(out.read_text())
    assert "test" not in cli and cli["training"][0]["image"].startswith("xrays/")
    assert main(["validate-datalist", str(out), "--key", "training", "validation", "--data-root", str(tmp_path)]) == 0

    # Without labels: every image its own group, no label key.
    unlabelled = make_xray_datalist(folder, tmp_path / "u.json", val_fraction=0.25, test_fraction=0.25)
    assert [len(unlabelled[k]) for k in ("training", "validation", "test")] == [6, 3, 3]
    assert all(set(e) == {"image", "modality"} for e in unlabelled["training"])


def test_make_xray_datalist_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _mock_xray_folder(tmp_path)
    output = tmp_path / "x.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image"):
        make_xray_datalist(tmp_path / "empty", output)
    with pytest.raises(ValueError, match="no column"):
        make_xray_datalist(folder, output, folder / "labels.csv", group_column="subject")
    with pytest.raises(ValueError, match="sum below 1"):
        make_xray_datalist(folder, output, val_fraction=0.5, test_fraction=0.5)
    (folder / "WELL" / "p0_0.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "SICK" / "extra.png")
    with pytest.raises(ValueError) as error:
        make_xray_datalist(folder, output, folder / "labels.csv")
    message = str(error.value)
    assert "WELL/p0_0.png (missing" in message and f"image without a row: {folder / 'SICK' / 'extra.png'}" in message
    args = [str(folder), "--output", str(output), "--labels", str(folder / "labels.csv")]
    assert main(["make-xray-datalist", *args]) == 1
    assert "extra.png" in capsys.readouterr().err and not output.exists()


def test_shipped_xray_datalist() -> None:
    content = json.loads(XRAY_LIST.read_text())
    assert content["labels"] == {"0": "NORMAL", "1": "PNEUMONIA"} and content["modality"] == {"0": "XR"}
    patients = {}
    for key in ("training", "validation", "test"):
        entries = load_datalist(XRAY_LIST, key=key, data_root=DATA, validate=False)
        assert all(Path(e["image"]).is_file() for e in entries)
        assert {e["label"] for e in entries} == {0, 1} and all(e["modality_group"] == "XR" for e in entries)
        patients[key] = {e["patient"] for e in entries}
    assert sum(len(content[k]) for k in ("training", "validation", "test")) == 1201
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"])
    assert not patients["validation"] & patients["test"]
    # a few full validations (header read, 2-D check) without paying for all 1201 files
    load_datalist(XRAY_LIST, key="test", data_root=DATA)


def test_read_class_names_in_index_order_and_named_errors(tmp_path):
    from dae.data import DatalistError, read_class_names

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"labels": {"1": "PNEUMONIA", "0": "NORMAL"}, "training": []}))
    assert read_class_names(good) == ["NORMAL", "PNEUMONIA"]
    assert read_class_names(REPO / "jsons" / "xray_demo.json") == ["NORMAL", "PNEUMONIA"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match=r"missing\.json has no top-level 'labels'"):
        read_class_names(missing)
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"labels": {"0": "a", "2": "b"}}))
    with pytest.raises(DatalistError, match=r"must be 0\.\.1"):
        read_class_names(gap)
