"""Tests of the data layer: SimpleITK reader, datalists and their validation, modality-aware scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

from dae.data import (
    GROUP_NAMES,
    MODALITY_GROUPS,
    DatalistError,
    ImageHeader,
    ScaleIntensityByModalityd,
    SimpleITKReader,
    estimate_cache_bytes,
    format_bytes,
    inference_entries,
    load_datalist,
    read_image_header,
    validate_datalist,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
DEMO_LIST = REPO / "jsons" / "demo_pretrain.json"
DICOM_DIR = DATA / "ct/totalseg/example_ct_dicom"
DICOM_SEG = DATA / "ct/totalseg/example_seg_dicom.nii.gz"  # TotalSegmentator labels on the DICOM's grid
MR_LPS = DATA / "mr/totalseg/example_mr_sm.nii.gz"  # LPS-oriented NIfTI
CT_LAS = DATA / "ct/chest_ct/cxr_ct_1.5mm_int16.nii.gz"  # LAS-oriented NIfTI

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ras_pipeline(reader: object | None = None, pixdim: tuple[float, ...] | None = None) -> Compose:
    transforms = [LoadImaged("image", reader=reader), EnsureChannelFirstd("image"), Orientationd("image", "RAS")]
    if pixdim is not None:
        transforms.append(Spacingd("image", pixdim=pixdim, mode="bilinear"))
    return Compose(transforms)


def _write_nifti(path: Path, shape: tuple[int, ...]) -> str:
    nib.save(nib.Nifti1Image(np.ones(shape, dtype=np.float32), np.eye(4)), path)
    return str(path)


def _write_datalist(tmp_path: Path, entries: list, key: str = "training") -> Path:
    path = tmp_path / "list.json"
    path.write_text(json.dumps({key: entries}))
    return path


# ----------------------------------------------------------------------------------------------- reader


def test_dicom_folder_geometry() -> None:
    reader = SimpleITKReader()
    data, meta = reader.get_data(reader.read(DICOM_DIR))
    assert data.shape == (512, 512, 20)
    assert tuple(meta["spatial_shape"]) == (512, 512, 20)
    assert math.isnan(meta["original_channel_dim"])
    assert meta["space"] == "RAS"
    affine = meta["affine"]
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.9765625, 0.9765625, 2.0])
    assert nib.aff2axcodes(affine) == ("L", "P", "S")  # DICOM rows/columns run along +x/+y of LPS
    np.testing.assert_allclose(affine[:3, 3], [249.51171875, 437.51171875, -804.5])  # LPS origin, x/y negated
    np.testing.assert_array_equal(meta["original_affine"], affine)


def test_dicom_aligns_with_its_totalsegmentator_labels() -> None:
    """The labels (a NIfTI on the DICOM grid, y stored flipped) land on the body once both are in RAS."""
    ct = _ras_pipeline(SimpleITKReader())({"image": str(DICOM_DIR)})["image"]
    seg = _ras_pipeline()({"image": str(DICOM_SEG)})["image"]
    np.testing.assert_allclose(ct.affine.numpy(), seg.affine.numpy(), atol=1e-4)
    inside = seg[0] > 0
    assert ct[0][inside].float().mean() > 50.0  # organs: soft tissue HU (a flipped axis gives < 50)
    assert ct[0][~inside].float().mean() < -500.0


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("nifti", [MR_LPS, CT_LAS], ids=["mr_lps", "ct_las"])
def test_itk_file_matches_nibabel(tmp_path: Path, nifti: Path, suffix: str) -> None:
    converted = tmp_path / f"image{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(converted))
    ref = LoadImaged("image")({"image": str(nifti)})["image"]
    out = LoadImaged("image", reader=SimpleITKReader())({"image": str(converted)})["image"]
    assert "pixdim" in ref.meta and "pixdim" not in out.meta  # nibabel vs. SimpleITK path
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    np.testing.assert_allclose(out.affine.numpy(), ref.affine.numpy(), atol=1e-4)


def test_itk_file_matches_nibabel_through_ras_and_spacing(tmp_path: Path) -> None:
    converted = tmp_path / "mr.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(MR_LPS)), str(converted))
    ref = _ras_pipeline(pixdim=(2.0, 2.5, 4.0))({"image": str(MR_LPS)})["image"]
    out = _ras_pipeline(SimpleITKReader(), pixdim=(2.0, 2.5, 4.0))({"image": str(converted)})["image"]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine.numpy(), ref.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-3)


def test_one_loadimaged_reads_nifti_nrrd_and_dicom(tmp_path: Path) -> None:
    nrrd = tmp_path / "mr.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(MR_LPS)), str(nrrd))
    load = LoadImaged("image", reader=SimpleITKReader())
    loaded = {
        name: load({"image": str(path)})["image"]
        for name, path in [("nii", MR_LPS), ("nrrd", nrrd), ("dcm", DICOM_DIR)]
    }
    assert "pixdim" in loaded["nii"].meta  # NIfTI fell back to MONAI's NibabelReader
    assert "pixdim" not in loaded["nrrd"].meta and "pixdim" not in loaded["dcm"].meta
    assert loaded["nii"].shape == loaded["nrrd"].shape == (117, 91, 20)
    assert loaded["dcm"].shape == (512, 512, 20)
    assert loaded["dcm"].meta["filename_or_obj"] == str(DICOM_DIR)


def test_suffixes_and_explicit_nifti(tmp_path: Path) -> None:
    reader = SimpleITKReader()
    for name in ["a.nrrd", "a.NHDR", "a.mha", "a.mhd", "a.dcm", str(tmp_path)]:
        assert reader.verify_suffix(name), name
    for name in ["a.nii", "a.nii.gz", "a.png", ["a.nrrd", "a.nii.gz"]]:
        assert not reader.verify_suffix(name), name
    with pytest.raises(ValueError, match="read_nifti=True"):
        reader.read(str(MR_LPS))
    nifti_reader = SimpleITKReader(read_nifti=True)
    assert nifti_reader.verify_suffix("a.nii.gz")
    data, meta = nifti_reader.get_data(nifti_reader.read(str(MR_LPS)))
    ref = nib.load(MR_LPS)
    np.testing.assert_array_equal(data, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(meta["affine"], ref.affine, atol=1e-4)


def test_two_files_stack_as_channels(tmp_path: Path) -> None:
    nrrd = tmp_path / "mr.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(MR_LPS)), str(nrrd))
    reader = SimpleITKReader()
    data, meta = reader.get_data(reader.read([nrrd, nrrd]))
    assert data.shape == (2, 117, 91, 20) and meta["original_channel_dim"] == 0


def test_folder_without_dicom_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"No DICOM series found in folder '{tmp_path}'"):
        SimpleITKReader().read(tmp_path)


# ---------------------------------------------------------------------------------------------- datalist


def test_demo_datalist_loads_and_validates() -> None:
    training = load_datalist(DEMO_LIST, "training", data_root=DATA)
    validation = load_datalist(DEMO_LIST, "validation", data_root=DATA)
    assert len(training) == 7 and len(validation) == 2
    assert [e["modality_group"] for e in training] == ["CT", "CT", "CT", "MR", "MR", "MR", "MR"]
    assert [e["modality_label"] for e in training] == [0, 0, 0, 1, 1, 1, 1]
    assert training[3]["modality"] == "T2"
    assert all(Path(e["image"]).exists() for e in training + validation)
    assert read_image_header(training[2]["image"]) == ImageHeader((512, 512, 20), (0.9765625, 0.9765625, 2.0))


def test_tag_filtering() -> None:
    def images(**kwargs: object) -> list[str]:
        return [Path(e["image"]).name for e in load_datalist(DEMO_LIST, data_root=DATA, validate=False, **kwargs)]

    assert images(include_tags=["fetal"]) == ["srr.nii.gz"] * 3
    assert len(images(exclude_tags=["fetal"])) == 4
    assert images(include_tags=["totalseg"], exclude_tags=["dicom"]) == ["example_mr_sm.nii.gz"]
    assert len(images(include_tags=["msd", "chest_ct"])) == 2
    with pytest.raises(DatalistError, match=r"no entries left after tag filtering \(include_tags=\['covid'\]"):
        images(include_tags=["covid"])


def test_modality_mapping_is_case_insensitive(tmp_path: Path) -> None:
    image = _write_nifti(tmp_path / "vol.nii.gz", (4, 5, 6))
    modalities = ["t1ce", "Flair", "ct", "T1Gd", "mr", "adc"]
    path = _write_datalist(tmp_path, [{"image": image, "modality": m, "label": image} for m in modalities])
    entries = load_datalist(path)
    assert [e["modality"] for e in entries] == ["T1CE", "FLAIR", "CT", "T1GD", "MR", "ADC"]
    assert [e["modality_group"] for e in entries] == ["MR", "MR", "CT", "MR", "MR", "MR"]
    assert [e["modality_label"] for e in entries] == [1, 1, 0, 1, 1, 1]
    assert entries[0]["label"] == image  # other keys kept
    assert set(MODALITY_GROUPS.values()) == set(GROUP_NAMES)


def test_relative_paths_join_data_root(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write_nifti(tmp_path / "sub" / "vol.nii", (4, 5, 6))
    _write_nifti(tmp_path / "sub" / "seg.nii", (4, 5, 6))
    path = _write_datalist(tmp_path, [{"image": "sub/vol.nii", "modality": "CT", "label": "sub/seg.nii"}])
    (entry,) = load_datalist(path, data_root=tmp_path)
    assert entry["image"] == str(tmp_path / "sub" / "vol.nii") and entry["label"] == str(tmp_path / "sub" / "seg.nii")


def test_inference_entries_keep_image_and_modality_group_only(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "vol.nii", (4, 5, 6))
    entries = [{"image": "vol.nii", "label": "vol.nii", "tags": ["a"]}, {"image": "vol.nii", "modality": "T2"}]
    path = _write_datalist(tmp_path, entries, key="testing")
    found = inference_entries(path, key="testing", data_root=tmp_path, default_modality="CT")
    image = str(tmp_path / "vol.nii")
    assert found == [{"image": image, "modality_group": "CT"}, {"image": image, "modality_group": "MR"}]


def test_label_problems_are_named_and_default_modality_applies(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "vol.nii", (4, 5, 6))
    _write_nifti(tmp_path / "small.nii", (4, 5, 5))
    path = _write_datalist(
        tmp_path,
        [
            {"image": "vol.nii", "label": "vol.nii"},
            {"image": "vol.nii", "label": "nowhere.nii"},
            {"image": "vol.nii", "label": "small.nii"},
        ],
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(path, data_root=tmp_path, default_modality="CT")
    message = str(err.value)
    assert "[0]" not in message
    assert "[1]" in message and "nowhere.nii does not exist" in message
    assert "[2]" in message and "(4, 5, 5) differs from image shape (4, 5, 6)" in message
    with pytest.raises(DatalistError, match="unknown modality None"):
        load_datalist(path, data_root=tmp_path)


def test_every_bad_entry_is_named_in_one_error(tmp_path: Path) -> None:
    good = _write_nifti(tmp_path / "good.nii.gz", (8, 8, 8))
    four_d = _write_nifti(tmp_path / "fourd.nii.gz", (8, 8, 8, 1))  # 4th dim of 1 counts as 3D
    flat = _write_nifti(tmp_path / "flat.nii.gz", (8, 8))
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image at all")
    missing = tmp_path / "missing.nii.gz"
    entries = [
        {"image": good, "modality": "CT"},
        {"image": str(missing), "modality": "CT"},
        {"image": flat, "modality": "MR"},
        {"image": str(garbage), "modality": "CT"},
        {"image": good, "modality": "PET"},
        {"modality": "CT", "tags": ["x"]},
        {"image": four_d, "modality": "T2"},
    ]
    path = _write_datalist(tmp_path, entries)
    with pytest.raises(DatalistError) as info:
        load_datalist(path)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == f"Datalist '{path}' (key 'training'): 5 of 7 entries are invalid:"
    assert f"  [1] {missing}: file or folder does not exist" in lines
    assert f"  [2] {flat}: not a 3D volume: shape (8, 8)" in lines
    assert any(line.startswith(f"  [3] {garbage}: unreadable header (RuntimeError: ") for line in lines)
    assert f"  [4] {good}: unknown modality 'PET' (known: {', '.join(sorted(MODALITY_GROUPS))})" in lines
    assert "  [5] <no image>: missing 'image' key (keys present: ['modality', 'tags'])" in lines
    assert not any(line.startswith(("  [0]", "  [6]")) for line in lines)


def test_indices_refer_to_the_file_after_filtering(tmp_path: Path) -> None:
    good = _write_nifti(tmp_path / "good.nii.gz", (8, 8, 8))
    entries = [{"image": good, "modality": "CT", "tags": ["a"]}, {"image": "nope.nii", "modality": "CT", "tags": ["b"]}]
    with pytest.raises(DatalistError, match=r"\[1\] nope.nii: file or folder does not exist"):
        load_datalist(_write_datalist(tmp_path, entries), include_tags=["b"])


def test_datalist_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatalistError, match=f"'{broken}' is not valid JSON"):
        load_datalist(broken)
    with pytest.raises(
        DatalistError, match=r"has no key 'testing' \(keys present: \['description', 'training', 'validation'\]\)"
    ):
        load_datalist(DEMO_LIST, key="testing")
    with pytest.raises(DatalistError, match=r"key 'training'\) is empty"):
        load_datalist(_write_datalist(tmp_path, []))
    with pytest.raises(DatalistError, match=r"<datalist> is empty"):
        validate_datalist([])


def test_header_reader_and_3d_rule(tmp_path: Path) -> None:
    assert read_image_header(MR_LPS) == ImageHeader((117, 91, 20), (3.0, 3.0, 3.0))
    assert ImageHeader((8, 8, 8, 1), (1.0,) * 4).is_3d
    assert not ImageHeader((8, 8, 8, 2), (1.0,) * 4).is_3d
    assert not ImageHeader((512, 512, 1), (1.0,) * 3).is_3d
    mha = tmp_path / "vol.mha"
    sitk.WriteImage(sitk.Image([7, 6, 5], sitk.sitkInt16), str(mha))
    assert read_image_header(mha).shape == (7, 6, 5)


def test_estimate_cache_bytes_and_format() -> None:
    headers = [ImageHeader((100, 100, 50), (1.0, 1.0, 2.0)), ImageHeader((200, 200, 10), (0.5, 0.5, 5.0))]
    assert estimate_cache_bytes(headers) == (100 * 100 * 50 + 200 * 200 * 10) * 4
    assert estimate_cache_bytes(headers, target_spacing=2.0) == (50 * 50 * 50 + 50 * 50 * 25) * 4
    assert (
        estimate_cache_bytes(headers, target_spacing=(1.0, 1.0, 2.0), bytes_per_voxel=2)
        == (100 * 100 * 50 + 100 * 100 * 25) * 2
    )
    assert estimate_cache_bytes(headers, target_spacing=2.0, cache_rate=0.5) == 50 * 50 * 50 * 4
    assert estimate_cache_bytes(headers, cache_rate=0.0) == 0
    dicom = load_datalist(DEMO_LIST, data_root=DATA, include_tags=["dicom"])
    assert estimate_cache_bytes(dicom, target_spacing=2.0) == 250 * 250 * 20 * 4  # 512 * 0.9765625 / 2 = 250
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(int(1.2 * 2**30)) == "1.2 GiB"


# -------------------------------------------------------------------------------------------- transforms


def test_ct_window_is_exact() -> None:
    hu = torch.tensor([-1000.0, 0.0, 1000.0, -2048.0, 3000.0, -500.0]).reshape(1, 6, 1, 1).to(torch.int16)
    out = ScaleIntensityByModalityd()({"image": hu, "modality_group": "CT"})["image"]
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == [0.0, 0.5, 1.0, 0.0, 1.0, 0.25]


def test_mr_percentiles_of_foreground() -> None:
    values = torch.arange(1, 1001, dtype=torch.float32)
    img = torch.cat([torch.zeros(3000), values]).reshape(1, 20, 20, 10)  # 75 % zero background
    out = ScaleIntensityByModalityd()({"image": img, "modality_group": "MR"})["image"]
    lo, hi = np.percentile(values.numpy(), [0.5, 99.5])
    expected = np.clip((img.numpy() - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    unclipped = ScaleIntensityByModalityd(clip=False)({"image": img, "modality_group": "MR"})["image"]
    assert unclipped.max() > 1.0 and unclipped.min() < 0.0


def test_unknown_group_and_missing_key() -> None:
    with pytest.raises(ValueError, match="Unknown modality group 'PET' in 'modality_group'"):
        ScaleIntensityByModalityd()({"image": torch.zeros(1, 2, 2, 2), "modality_group": "PET"})
    with pytest.raises(KeyError, match="no modality key 'modality_group'"):
        ScaleIntensityByModalityd()({"image": torch.zeros(1, 2, 2, 2)})


def test_metatensor_meta_is_kept() -> None:
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.full((1, 4, 4, 4), 200, dtype=torch.int16), affine=affine, meta={"filename_or_obj": "x.nii"})
    out = ScaleIntensityByModalityd()({"image": img, "modality_group": "CT", "other": 1})
    assert isinstance(out["image"], MetaTensor) and out["image"].dtype == torch.float32
    assert out["image"].meta["filename_or_obj"] == "x.nii" and out["other"] == 1
    torch.testing.assert_close(out["image"].affine, affine)
    assert torch.allclose(out["image"], torch.tensor(0.6))
