"""Tests of make-pretrain-datalist: presets on synthetic trees of each dataset's layout, modality rules, the
patient-grouped split, series deduplication, merging, and exit codes."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dae.cli import main
from dae.data import (
    PRESETS,
    dicom_writer,
    load_datalist,
    modality_from_filename,
    modality_from_series_description,
    validation_size,
)

SHAPE = (8, 8, 6)
UID_ROOT = "1.2.826.0.1.3680043.2.1125.7"


def write_nifti(path: Path, shape: tuple[int, ...] = SHAPE) -> Path:
    """A tiny NIfTI volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    return path


def write_mhd(path: Path) -> Path:
    """A tiny MetaImage volume (.mhd header + .raw data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Image(*SHAPE, sitk.sitkInt16), str(path))
    return path


def write_dicom_series(
    folder: Path,
    slices: int,
    uid: str,
    patient: str = "P1",
    modality: str = "CT",
    description: str = "AXIAL",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
) -> Path:
    """One blank DICOM series of 8x8 slices 2 mm apart (:func:`dae.data.write_dicom_series`); returns ``folder``."""
    image = sitk.Image(8, 8, slices, sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.0))
    dicom_writer.write_dicom_series(
        image, folder, uid, modality=modality, patient_id=patient, description=description, image_type=image_type
    )
    return folder


def run(*args: object) -> int:
    return main([str(a) for a in args])


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def patients_by_list(content: dict) -> dict[str, set[str]]:
    return {key: {e["patient"] for e in content[key]} for key in ("training", "validation")}


def assert_loads(path: Path, content: dict) -> None:
    for key in ("training", "validation"):
        entries = load_datalist(path, key=key, data_root=content["data_root"])
        assert len(entries) == len(content[key])


# ------------------------------------------------------------------------------------------------- helpers
def test_dicom_helper_series_reads_back(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "s", 5, f"{UID_ROOT}.1")
    assert sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) == (f"{UID_ROOT}.1",)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert image.GetSize() == (8, 8, 5)
    assert image.GetSpacing()[2] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- modality rules
@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("AX T1 POST GD", "T1CE"),
        ("t1_mprage_ce", "T1CE"),
        ("T1+C", "T1CE"),
        ("T1W_3D_TFE gado", "T1CE"),
        ("T1 PRE CONTRAST", "T1"),
        ("sag t1w", "T1"),
        ("Ax T2 FLAIR", "FLAIR"),
        ("T2W_TSE", "T2"),
        ("DWI b1000", "MR"),
    ],
)
def test_modality_from_series_description(description: str, expected: str) -> None:
    assert modality_from_series_description(description) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BraTS2021_00000_t1ce.nii.gz", "T1CE"),
        ("BraTS2021_00000_t1.nii.gz", "T1"),
        ("BraTS2021_00000_flair.nii.gz", "FLAIR"),
        ("sub-01_T2w.nii.gz", "T2"),
        ("ct_003.nrrd", "CT"),
        ("case_ct_t1.nii", None),
        ("volume-covid19-A-0001.nii.gz", None),
        ("t10_scan.mha", None),
    ],
)
def test_modality_from_filename(name: str, expected: str | None) -> None:
    assert modality_from_filename(name) == expected


def test_validation_size_rules() -> None:
    luna = PRESETS["luna16"]
    assert validation_size(888, 888, luna) == 44  # the paper's count gives the paper's size
    assert validation_size(20, 20, luna) == 1  # 20 * 44/888 = 0.99
    assert validation_size(300, 300, luna) == 15  # 14.86
    small = dataclasses.replace(luna, total=4, training=3, validation=1)
    assert validation_size(10, 10, small) == 3  # 2.5 rounds half up
    assert validation_size(4, 4, small) == 1
    assert validation_size(3, 3, None) == 1  # at least one with two patients or more
    assert validation_size(3, 1, None) == 0  # one patient: no validation
    assert validation_size(3, 3, None, val_fraction=0.9) == 2  # at least one left for training
    assert validation_size(10, 10, luna, val_count=4) == 4
    with pytest.raises(ValueError, match="leaves no training"):
        validation_size(4, 4, None, val_count=4)


# --------------------------------------------------------------------------------------------------- presets
def make_luna16(root: Path, n: int) -> list[str]:
    uids = [f"{UID_ROOT}.{100 + i}" for i in range(n)]
    for i, uid in enumerate(uids):
        write_mhd(root / f"subset{i % 2}" / f"{uid}.mhd")
    write_mhd(root / "seg-lungs-LUNA16" / f"{uids[0]}.mhd")
    (root / "seg-lungs-LUNA16" / f"{uids[0]}.zraw").write_bytes(b"")
    return uids


def test_luna16_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uids = make_luna16(tmp_path / "LUNA16", 5)
    out = tmp_path / "luna.json"
    assert run("make-pretrain-datalist", "--source", f"luna16={tmp_path / 'LUNA16'}", "--output", out) == 0
    content = read(out)
    entries = content["training"] + content["validation"]
    assert sorted(e["series_uid"] for e in entries) == sorted(uids)
    assert all(e["modality"] == "CT" and e["tags"] == ["luna16"] for e in entries)
    assert all(e["patient"] == e["series_uid"] and e["image"].startswith("subset") for e in entries)
    assert len(content["validation"]) == 1  # 5 * 44/888 rounds to 0, at least 1
    assert content["data_root"] == str(tmp_path / "LUNA16")
    assert_loads(out, content)
    report = capsys.readouterr().out
    assert "LUNA16 lung mask (seg-lungs-LUNA16), not an image (1)" in report
    assert "luna16: 5 volumes, 4 training + 1 validation; paper 888 = 844 + 44 -- differs" in report


def test_paper_count_gives_paper_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "luna16", dataclasses.replace(PRESETS["luna16"], total=6, training=4, validation=2))
    make_luna16(tmp_path / "LUNA16", 6)
    out = tmp_path / "luna.json"
    assert run("make-pretrain-datalist", "--source", f"luna16={tmp_path / 'LUNA16'}", "--output", out) == 0
    assert len(read(out)["validation"]) == 2
    monkeypatch.setitem(PRESETS, "luna16", dataclasses.replace(PRESETS["luna16"], total=4, training=3, validation=1))
    assert run("make-pretrain-datalist", "--source", f"luna16={tmp_path / 'LUNA16'}", "--output", out) == 0
    assert len(read(out)["validation"]) == 2  # 6 * 1/4 = 1.5 rounds half up


def test_tcia_covid19_preset_groups_patients(tmp_path: Path) -> None:
    folder = tmp_path / "CT-Covid-19-August2020"
    for name in ["A-0001", "A-0002", "A-0003", "A-0269", "A-0003_day10"]:
        write_nifti(folder / f"volume-covid19-{name}.nii.gz")
    write_nifti(folder / "masks" / "lung_A-0001.nii.gz")
    out = tmp_path / "covid.json"
    args = ["make-pretrain-datalist", "--source", f"tcia-covid19={folder}", "--output", out, "--data-root", tmp_path]
    for seed in range(4):
        assert run(*args, "--val-count", 2, "--seed", seed) == 0
        content = read(out)
        patients = patients_by_list(content)
        assert not patients["training"] & patients["validation"]
        assert patients["training"] | patients["validation"] == {"A-0001", "A-0002", "A-0003", "A-0269"}
        assert len(content["validation"]) == 2
    images = {e["image"] for e in content["training"] + content["validation"]}
    assert "CT-Covid-19-August2020/volume-covid19-A-0269.nii.gz" in images
    assert len(images) == 5
    assert_loads(out, content)


def test_brats2021_preset_keeps_cases_together(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "BraTS2021"
    for i in range(5):
        case = f"BraTS2021_{i:05d}"
        for sequence in ("t1", "t1ce", "t2", "flair", "seg"):
            write_nifti(folder / case / f"{case}_{sequence}.nii.gz")
    out = tmp_path / "brats.json"
    assert run("make-pretrain-datalist", "--source", f"brats2021={folder}", "--output", out, "--val-count", 2) == 0
    content = read(out)
    assert len(content["training"]) == 12 and len(content["validation"]) == 8
    by_case = defaultdict(set)
    for key in ("training", "validation"):
        for entry in content[key]:
            assert entry["tags"] == ["brats2021"]
            assert not entry["image"].endswith("_seg.nii.gz")
            sequence = entry["image"].rsplit("_", 1)[1].split(".")[0]
            assert entry["modality"] == {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}[sequence]
            by_case[entry["patient"]].add((key, entry["modality"]))
    assert len(by_case) == 5
    for sides in by_case.values():
        assert len({key for key, _ in sides}) == 1 and len(sides) == 4
    assert_loads(out, content)
    report = capsys.readouterr().out
    assert "BraTS tumour segmentation (_seg), not an image (5)" in report
    assert "brats2021: 5 cases (20 volumes), 3 training + 2 validation; paper 1251 = 1188 + 63" in report


def make_nbia(root: Path) -> None:
    """A TCIA/NBIA-style tree with the usual non-CT and unusable series."""
    study = "1.000000-NA-12345"
    write_dicom_series(root / "P1" / study / "2.000000-CT-1", 8, f"{UID_ROOT}.11", "P1")
    write_dicom_series(root / "P1" / study / "3.000000-SEG-1", 1, f"{UID_ROOT}.12", "P1", modality="SEG")
    write_dicom_series(
        root / "P1" / study / "1.000000-SCOUT", 8, f"{UID_ROOT}.13", "P1", image_type="ORIGINAL\\PRIMARY\\LOCALIZER"
    )
    write_dicom_series(root / "P2" / study / "2.000000-CT-2", 8, f"{UID_ROOT}.21", "P2")
    write_dicom_series(root / "P2" / study / "3.000000-CT-SHORT", 3, f"{UID_ROOT}.22", "P2")
    write_dicom_series(root / "P3" / study / "2.000000-CT-3", 8, f"{UID_ROOT}.31", "P3")
    write_dicom_series(root / "P3" / study / "9.000000-DX", 1, f"{UID_ROOT}.32", "P3", modality="DX")
    write_dicom_series(root / "P3" / study / "4.000000-RTSTRUCT", 1, f"{UID_ROOT}.33", "P3", modality="RTSTRUCT")
    mixed = root / "P4" / study / "2.000000-CT-MIXED"
    write_dicom_series(mixed, 8, f"{UID_ROOT}.41", "P4")
    write_dicom_series(mixed, 6, f"{UID_ROOT}.42", "P4")
    (root / "P4" / "notes.txt").write_text("not DICOM")


@pytest.mark.parametrize("preset", ["hnscc", "tcia-colonography", "lidc-idri"])
def test_tcia_dicom_presets(tmp_path: Path, capsys: pytest.CaptureFixture, preset: str) -> None:
    make_nbia(tmp_path / "Collection")
    out = tmp_path / "list.json"
    args = ["make-pretrain-datalist", "--source", f"{preset}={tmp_path / 'Collection'}", "--output", out]
    assert run(*args, "--min-slices", 5, "--verbose") == 0
    content = read(out)
    entries = content["training"] + content["validation"]
    assert sorted(e["series_uid"] for e in entries) == [f"{UID_ROOT}.{n}" for n in (11, 21, 31, 41)]
    assert sorted(e["patient"] for e in entries) == ["P1", "P2", "P3", "P4"]
    tag = PRESETS[preset].tag
    assert all(e["modality"] == "CT" and e["tags"] == [tag] for e in entries)
    assert len(content["validation"]) == 1
    assert all(not e["image"].endswith(".dcm") for e in entries)  # series folders
    assert_loads(out, content)
    report = capsys.readouterr().out
    assert "not a CT series (3)" in report and "Modality SEG" in report and "Modality DX" in report
    assert "localizer or scout (1)" in report
    assert "fewer slices than --min-slices (1)" in report and "3 < 5" in report
    assert "folder holds several series; the reader reads the largest (1)" in report
    assert f"series {UID_ROOT}.42, 6 slices" in report


def test_default_min_slices_skips_short_series(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_dicom_series(tmp_path / "C" / "P1" / "s" / "ct", 8, f"{UID_ROOT}.51", "P1")
    out = tmp_path / "list.json"
    assert run("make-pretrain-datalist", "--source", f"hnscc={tmp_path / 'C'}", "--output", out) == 1
    assert "skipped: fewer slices than --min-slices (1)" in capsys.readouterr().err
    assert not out.exists()


def test_luna16_and_lidc_list_a_series_once_and_keep_its_patient_together(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uids = make_luna16(tmp_path / "LUNA16", 4)
    lidc = tmp_path / "LIDC-IDRI"
    # P1's first series is the LUNA16 scan uids[0]; its second series must stay on the same side as that scan
    write_dicom_series(lidc / "P1" / "study" / "ct-a", 8, uids[0], "P1")
    write_dicom_series(lidc / "P1" / "study2" / "ct-b", 8, f"{UID_ROOT}.61", "P1")
    for n, patient in enumerate(["P2", "P3", "P4"]):
        write_dicom_series(lidc / patient / "study" / "ct", 8, f"{UID_ROOT}.{70 + n}", patient)
    out = tmp_path / "all.json"
    sources = ["--source", f"luna16={tmp_path / 'LUNA16'}", "--source", f"lidc-idri={lidc}"]
    for seed in range(6):
        assert run("make-pretrain-datalist", *sources, "--output", out, "--min-slices", 4, "--seed", seed) == 0
        content = read(out)
        side = {e["series_uid"]: key for key in ("training", "validation") for e in content[key]}
        assert len(side) == len(content["training"]) + len(content["validation"]) == 4 + 4
        assert side[uids[0]] == side[f"{UID_ROOT}.61"]
        luna_copy = [e for e in content["training"] + content["validation"] if e["series_uid"] == uids[0]]
        assert luna_copy[0]["tags"] == ["luna16"]
    assert content["data_root"] == str(tmp_path)
    assert_loads(out, content)
    assert "Dropped 1 copies of series or images listed already: lidc_idri 1." in capsys.readouterr().out


def test_a_folder_is_split_the_same_alone_or_with_others(tmp_path: Path) -> None:
    make_luna16(tmp_path / "LUNA16", 8)
    for i in range(5):
        write_nifti(tmp_path / "BraTS" / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_t1.nii.gz")
    alone, both = tmp_path / "alone.json", tmp_path / "both.json"
    luna = ["--source", f"luna16={tmp_path / 'LUNA16'}", "--val-count", 3, "--data-root", tmp_path]
    assert run("make-pretrain-datalist", *luna, "--output", alone) == 0
    assert run("make-pretrain-datalist", *luna, "--source", f"brats2021={tmp_path / 'BraTS'}", "--output", both) == 0
    luna_validation = [e for e in read(both)["validation"] if e["tags"] == ["luna16"]]
    assert luna_validation == read(alone)["validation"]


# ---------------------------------------------------------------------------------------------- plain folders
def test_plain_folder_modalities_patients_and_dicom_mr(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    for case in ("case1", "case2", "case3"):
        write_nifti(folder / f"{case}_t1.nii.gz")
        write_nifti(folder / f"{case}_flair.nii.gz")
    write_nifti(folder / "labelsTr" / "case1_t1.nii.gz")
    sitk.WriteImage(sitk.Image(*SHAPE, sitk.sitkInt16), str(folder / "ct_004.nrrd"))
    write_dicom_series(folder / "mr" / "post", 6, f"{UID_ROOT}.81", "P9", modality="MR", description="AX T1 POST GD")
    out = tmp_path / "plain.json"
    assert run("make-pretrain-datalist", "--source", folder, "--output", out, "--min-slices", 4, "--val-count", 1) == 0
    content = read(out)
    entries = content["training"] + content["validation"]
    by_image = {e["image"]: e for e in entries}
    assert set(by_image) == {
        *(f"{c}_{s}.nii.gz" for c in ("case1", "case2", "case3") for s in ("t1", "flair")),
        "ct_004.nrrd",
        "mr/post",
    }
    assert by_image["case2_flair.nii.gz"]["modality"] == "FLAIR" and by_image["case2_t1.nii.gz"]["modality"] == "T1"
    assert by_image["ct_004.nrrd"]["modality"] == "CT"
    assert by_image["mr/post"]["modality"] == "T1CE" and by_image["mr/post"]["patient"] == "P9"
    assert {e["tags"][0] for e in entries} == {"mixed"}
    patients = patients_by_list(content)
    assert not patients["training"] & patients["validation"]
    assert by_image["case1_t1.nii.gz"]["patient"] == by_image["case1_flair.nii.gz"]["patient"] == "case1"
    assert_loads(out, content)


def test_unknown_modality_fails_listing_every_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "scans"
    write_nifti(folder / "a_t2.nii.gz")
    write_nifti(folder / "mystery.nii.gz")
    write_nifti(folder / "sub" / "other.nii.gz")
    out = tmp_path / "out.json"
    assert run("make-pretrain-datalist", "--source", folder, "--output", out) == 1
    error = capsys.readouterr().err
    assert "Cannot tell the modality of 2 volumes" in error and "--modality" in error
    assert str(folder / "mystery.nii.gz") in error and str(folder / "sub" / "other.nii.gz") in error
    assert not out.exists()
    assert run("make-pretrain-datalist", "--source", folder, "--output", out, "--modality", "t2", "--tag", "mine") == 0
    content = read(out)
    assert {e["modality"] for e in content["training"] + content["validation"]} == {"T2"}
    assert {e["tags"][0] for e in content["training"] + content["validation"]} == {"mine"}


def test_patient_regex_groups_by_folder(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    for patient in ("p1", "p2", "p3"):
        write_nifti(folder / patient / "scan_a_ct.nii.gz")
        write_nifti(folder / patient / "scan_b_ct.nii.gz")
    out = tmp_path / "out.json"
    args = ["make-pretrain-datalist", "--source", folder, "--output", out, "--val-count", 2]
    assert run(*args, "--patient-regex", "^(p[0-9])/") == 0
    content = read(out)
    assert patients_by_list(content) in [
        {"training": {"p1", "p2", "p3"} - {p}, "validation": {p}} for p in ("p1", "p2", "p3")
    ]
    assert run(*args, "--patient-regex", "^(q[0-9])/") == 1


# ---------------------------------------------------------------------------------------------------- merging
def test_merge_drops_duplicate_series_and_moves_linked_patients(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("a1", "a2", "b1", "b2", "b3"):
        write_nifti(tmp_path / "data" / name[0] / f"{name}.nii.gz")
    entry = {"modality": "CT"}
    first = {
        "data_root": str(tmp_path / "data" / "a"),
        "training": [{**entry, "image": "a1.nii.gz", "tags": ["luna16"], "patient": "s1", "series_uid": "1.1"}],
        "validation": [{**entry, "image": "a2.nii.gz", "tags": ["luna16"], "patient": "s2", "series_uid": "1.2"}],
    }
    second = {  # b1 is the validation series 1.2 again; b2 is its patient's other series; b3 is unrelated
        "data_root": str(tmp_path / "data" / "b"),
        "training": [
            {**entry, "image": "b1.nii.gz", "tags": ["lidc_idri"], "patient": "P1", "series_uid": "1.2"},
            {**entry, "image": "b2.nii.gz", "tags": ["lidc_idri"], "patient": "P1", "series_uid": "1.3"},
            {**entry, "image": "b3.nii.gz", "tags": ["lidc_idri"], "patient": "P2", "series_uid": "1.4"},
        ],
        "validation": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    out = tmp_path / "merged.json"
    assert run("make-pretrain-datalist", "--merge", tmp_path / "a.json", tmp_path / "b.json", "--output", out) == 0
    content = read(out)
    assert content["data_root"] == str(tmp_path / "data")
    assert [e["image"] for e in content["validation"]] == ["a/a2.nii.gz", "b/b2.nii.gz"]
    assert [e["image"] for e in content["training"]] == ["a/a1.nii.gz", "b/b3.nii.gz"]
    assert_loads(out, content)
    report = capsys.readouterr().out
    assert "Dropped 1 copies of series or images listed already: lidc_idri 1." in report
    assert "Moved 1 training entries to validation" in report


def test_merge_of_written_lists_and_roots(tmp_path: Path) -> None:
    make_luna16(tmp_path / "LUNA16", 3)
    for i in range(2):
        write_nifti(tmp_path / "BraTS" / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_t2.nii.gz")
    luna, brats, out = tmp_path / "luna.json", tmp_path / "brats.json", tmp_path / "lists" / "all.json"
    assert run("make-pretrain-datalist", "--source", f"luna16={tmp_path / 'LUNA16'}", "--output", luna) == 0
    assert run("make-pretrain-datalist", "--source", f"brats2021={tmp_path / 'BraTS'}", "--output", brats) == 0
    assert run("make-pretrain-datalist", "--merge", luna, brats, "--output", out) == 0
    content = read(out)
    assert len(content["training"]) + len(content["validation"]) == 5
    assert {e["image"].split("/")[0] for e in content["training"] + content["validation"]} == {"LUNA16", "BraTS"}
    assert_loads(out, content)
    no_root = tmp_path / "no_root.json"
    no_root.write_text(json.dumps({k: v for k, v in read(luna).items() if k != "data_root"}))
    assert run("make-pretrain-datalist", "--merge", no_root, brats, "--output", out) == 1
    assert run("make-pretrain-datalist", "--merge", no_root, "--output", out, "--data-root", tmp_path / "LUNA16") == 0


# ------------------------------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize(
    "args",
    [
        ["--source", "luna=/data"],  # unknown preset
        ["--source", "luna16=/data", "--modality", "CT"],  # --modality for preset folders only
        ["--merge", "a.json", "--seed", "1"],
        ["--source", "/data", "--merge", "a.json"],
        ["--source", "/data", "--val-count", "2", "--val-fraction", "0.1"],
        ["--source", "/data", "--val-fraction", "1.5"],
        ["--source", "/data", "--modality", "XR"],  # not a 3D modality
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("make-pretrain-datalist", *args, "--output", tmp_path / "out.json")
    assert exit_info.value.code == 2


def test_unusable_data_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.json"
    assert run("make-pretrain-datalist", "--source", f"luna16={tmp_path / 'missing'}", "--output", out) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run("make-pretrain-datalist", "--source", f"brats2021={tmp_path / 'empty'}", "--output", out) == 1
    assert "No volume found" in capsys.readouterr().err
    write_nifti(tmp_path / "one" / "only_ct.nii.gz")
    assert run("make-pretrain-datalist", "--source", tmp_path / "one", "--output", out) == 1
    assert "validation list would be empty" in capsys.readouterr().err
    make_luna16(tmp_path / "LUNA16", 3)
    luna = ["--source", f"luna16={tmp_path / 'LUNA16'}", "--output", out]
    assert run("make-pretrain-datalist", *luna, "--data-root", tmp_path / "one") == 1
    assert "not below the data root" in capsys.readouterr().err
    assert run("make-pretrain-datalist", *luna, "--val-count", 3) == 1
    assert "leaves no training" in capsys.readouterr().err
    (tmp_path / "LUNA16" / "subset1" / f"{UID_ROOT}.101.mhd").write_text("not a header")
    assert run("make-pretrain-datalist", *luna) == 1
    assert f"{UID_ROOT}.101.mhd: unreadable header" in capsys.readouterr().err
    assert not out.exists()
