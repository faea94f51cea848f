"""Tests of label remapping (TotalSegmentator to BTCV, fetal atlas to FeTA), fold making and the datalist CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, load_decathlon_datalist

from dae.cli import main
from dae.data import (
    BTCV_CLASSES,
    FETA_ATLAS_TO_FETA,
    FETA_CLASSES,
    RemapLabelsd,
    assign_patients,
    case_id_from_filename,
    kfold_splits,
    label_fraction_subset,
    load_datalist,
    pair_images_and_labels,
    read_image_header,
    read_totalsegmentator_classes,
    remap_labels,
    totalsegmentator_to_btcv,
    write_fold_files,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
JSONS = REPO / "jsons"
TS_CSV = DATA / "ct/chest_ct/structures.csv"
TS_JSON = DATA / "ct/totalseg/class_map_total_and_total_mr.json"
BTCV_CASES = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]
EXPECTED_TS_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def _touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dae.cli", *args], capture_output=True, text=True, cwd=cwd)


# ------------------------------------------------------------------------------------------- remapping
def test_remap_labels_numpy_unmapped_to_default_and_dtype_kept() -> None:
    label = np.array([[0, 1, 2], [8, 9, 4]], dtype=np.uint16)
    out = remap_labels(label, FETA_ATLAS_TO_FETA)
    np.testing.assert_array_equal(out, [[0, 3, 4], [3, 0, 1]])  # 9 is not in the map
    assert isinstance(out, np.ndarray) and out.dtype == np.uint16
    np.testing.assert_array_equal(remap_labels(label, {1: 5}, default=7), [[7, 5, 7], [7, 7, 7]])
    np.testing.assert_array_equal(remap_labels(label, {}, default=2), np.full((2, 3), 2))


def test_remap_labels_metatensor_keeps_meta_and_gets_integer_dtype() -> None:
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    label = MetaTensor(torch.tensor([[[0.0, 52.0], [4.0, 117.0]]]), affine=affine, meta={"filename_or_obj": "x.nii"})
    out = remap_labels(label, {4: 4, 52: 8})
    assert isinstance(out, MetaTensor)
    assert out.meta["filename_or_obj"] == "x.nii"
    assert torch.equal(out.affine, affine)
    assert not out.dtype.is_floating_point and out.dtype != torch.bool
    assert out.as_tensor().tolist() == [[[0, 8], [4, 0]]]


def test_remap_labels_widens_dtype_when_new_ids_do_not_fit() -> None:
    out = remap_labels(torch.tensor([1, 2], dtype=torch.uint8), {1: 300})
    assert out.tolist() == [300, 0] and out.dtype == torch.int16


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (np.array([0, -1, 2]), "non-negative, found -1"),
        (torch.tensor([0, -3]), "non-negative, found -3"),
        (np.array([0.0, 1.5]), "integers, found 1.5"),
        (torch.tensor([float("nan")]), "non-finite"),
    ],
)
def test_remap_labels_rejects_bad_labels(label: np.ndarray | torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        remap_labels(label, {1: 1})


def test_remap_labels_rejects_bad_mapping() -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        remap_labels(np.array([1]), {1: -2})
    with pytest.raises(ValueError, match="non-negative integers"):
        RemapLabelsd("label", mapping={1.5: 1})


def test_remap_labelsd_single_and_per_sample_maps() -> None:
    label = MetaTensor(torch.tensor([[[1.0, 4.0, 8.0]]]))
    out = RemapLabelsd("label", mapping=FETA_ATLAS_TO_FETA)({"label": label, "image": "untouched"})
    assert out["image"] == "untouched" and out["label"].tolist() == [[[3, 1, 3]]]
    assert isinstance(out["label"], MetaTensor)
    per_sample = RemapLabelsd("label", {"a": {1: 2}, "b": {4: 5}}, map_key="id_table")
    assert per_sample({"label": label, "id_table": "b"})["label"].tolist() == [[[0, 5, 0]]]
    assert per_sample({"label": label})["label"] is label  # no id_table: already the task's ids
    with pytest.raises(KeyError, match="'c'"):
        per_sample({"label": label, "id_table": "c"})


# ------------------------------------------------------------------------------------ TotalSegmentator / FeTA
def test_totalsegmentator_tables_name_the_btcv_organs_alike() -> None:
    csv_classes = read_totalsegmentator_classes(TS_CSV)
    json_classes = read_totalsegmentator_classes(TS_JSON)
    assert len(csv_classes) == 118 and len(json_classes) == 117
    for classes in (csv_classes, json_classes):
        mapping = totalsegmentator_to_btcv(classes)
        assert set(mapping) == set(classes)  # every id is mapped, non-BTCV ones to 0
        assert {k: v for k, v in mapping.items() if v} == EXPECTED_TS_TO_BTCV
    assert read_totalsegmentator_classes(TS_JSON, task="total_mr")[1] == "spleen"


def test_totalsegmentator_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'gallbladder'"):
        totalsegmentator_to_btcv({k: v for k, v in read_totalsegmentator_classes(TS_JSON).items() if k != 4})
    with pytest.raises(ValueError, match="no task 'nope'"):
        read_totalsegmentator_classes(TS_JSON, task="nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,spleen\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*columns"):
        read_totalsegmentator_classes(bad)


def test_chest_ct_mask_remapped_to_btcv() -> None:
    mask = np.asarray(nib.load(DATA / "ct/chest_ct/mask_1.5mm.nii.gz").dataobj)
    mapping = totalsegmentator_to_btcv(read_totalsegmentator_classes(TS_CSV))
    out = remap_labels(mask, mapping)
    present = set(np.unique(out).tolist())
    assert present <= set(range(len(BTCV_CLASSES)))
    assert present - {0} == set(range(1, 14)) - {4}  # 12 organs, no gallbladder
    np.testing.assert_array_equal(out == 6, mask == 5)  # liver


def test_fetal_atlas_remapped_to_feta() -> None:
    parc = np.asarray(nib.load(DATA / "mr/fetal_atlas/fetal_SB_atlas_GA21_notoperated/parcellation.nii.gz").dataobj)
    out = remap_labels(parc, FETA_ATLAS_TO_FETA)
    assert set(np.unique(out).tolist()) == set(range(len(FETA_CLASSES)))
    np.testing.assert_array_equal(out == 3, (parc == 1) | (parc == 8))  # WM and corpus callosum


# ------------------------------------------------------------------------------------------- pairing
@pytest.mark.parametrize(
    ("image", "label", "case"),
    [
        ("img0001.nii.gz", "label0001.nii.gz", "0001"),
        ("spleen_2.nii.gz", "spleen_2.nii.gz", "spleen_2"),
        ("sub-001_rec-mial_T2w.nii.gz", "sub-001_rec-mial_dseg.nii.gz", "sub-001_rec-mial"),
    ],
)
def test_case_id_from_filename(image: str, label: str, case: str) -> None:
    assert case_id_from_filename(image) == case_id_from_filename(label) == case


def test_pair_images_and_labels(tmp_path: Path) -> None:
    _touch(tmp_path / "imagesTr", ["img0002.nii.gz", "img0001.nii.gz"])
    _touch(tmp_path / "labelsTr", ["label0001.nii.gz", "label0002.nii.gz"])
    pairs = pair_images_and_labels(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert [p["case"] for p in pairs] == ["0001", "0002"]
    assert Path(pairs[1]["image"]).name == "img0002.nii.gz" and Path(pairs[1]["label"]).name == "label0002.nii.gz"


def test_pair_images_and_labels_lists_every_unpaired_file(tmp_path: Path) -> None:
    _touch(tmp_path / "img", ["img0001.nii.gz", "img0002.nii.gz", "img0003.nii.gz"])
    _touch(tmp_path / "lab", ["label0001.nii.gz", "label0004.nii.gz"])
    with pytest.raises(ValueError) as err:
        pair_images_and_labels(tmp_path / "img", tmp_path / "lab")
    message = str(err.value)
    assert "image without label" in message and "img0002.nii.gz" in message and "img0003.nii.gz" in message
    assert "label without image" in message and "label0004.nii.gz" in message
    with pytest.raises(ValueError, match="does not exist"):
        pair_images_and_labels(tmp_path / "missing", tmp_path / "lab")
    with pytest.raises(ValueError, match="No file matches"):
        pair_images_and_labels(tmp_path / "img", tmp_path / "lab", image_pattern="*.mha")


def test_pair_rejects_two_files_with_one_case_id(tmp_path: Path) -> None:
    _touch(tmp_path / "img", ["img0001.nii.gz", "image0001.nii.gz"])
    _touch(tmp_path / "lab", ["label0001.nii.gz"])
    with pytest.raises(ValueError, match="same case id '0001'"):
        pair_images_and_labels(tmp_path / "img", tmp_path / "lab")


# ------------------------------------------------------------------------------------------- folds
def _entries_with_rescans() -> list[dict]:
    """12 patients; patients 0 and 1 have a second scan ("pXX_sY" case ids)."""
    cases = [f"p{p:02d}_s0" for p in range(12)] + ["p00_s1", "p01_s1"]
    entries = [{"case": c, "image": f"/d/img/{c}.nii.gz", "label": f"/d/lab/{c}.nii.gz"} for c in cases]
    return assign_patients(entries, r"^(p\d+)_")


def test_kfold_splits_groups_patients_and_covers_every_case() -> None:
    entries = _entries_with_rescans()
    folds = kfold_splits(entries, n_folds=5, seed=3)
    assert len(folds) == 5
    validated = [e["case"] for _, val in folds for e in val]
    assert sorted(validated) == sorted(e["case"] for e in entries)  # every case validated exactly once
    for train, val in folds:
        assert not {e["patient"] for e in train} & {e["patient"] for e in val}
        assert len(train) + len(val) == len(entries)
    fold_of = {e["case"]: k for k, (_, val) in enumerate(folds) for e in val}
    assert fold_of["p00_s0"] == fold_of["p00_s1"] and fold_of["p01_s0"] == fold_of["p01_s1"]
    assert max(len(v) for _, v in folds) - min(len(v) for _, v in folds) <= 2


def test_kfold_splits_seeded() -> None:
    entries = _entries_with_rescans()
    assert kfold_splits(entries, 5, seed=1) == kfold_splits(entries, 5, seed=1)
    assert kfold_splits(entries, 5, seed=1) != kfold_splits(entries, 5, seed=2)


def test_kfold_splits_errors() -> None:
    entries = _entries_with_rescans()
    with pytest.raises(ValueError, match="12 groups"):
        kfold_splits(entries, n_folds=13)
    with pytest.raises(ValueError, match="at least 2"):
        kfold_splits(entries, n_folds=1)
    with pytest.raises(ValueError, match="does not match case 'p00_s0'"):
        assign_patients(entries, r"sub-\d+")


def test_write_fold_files_loadable_by_monai(tmp_path: Path) -> None:
    entries = _entries_with_rescans()
    paths = write_fold_files(kfold_splits(entries, 3), tmp_path / "folds", "/d", BTCV_CLASSES, "CT", "toy")
    assert [p.name for p in paths] == ["fold_0.json", "fold_1.json", "fold_2.json"]
    content = json.loads(paths[1].read_text())
    assert content["fold"] == 1 and content["numFolds"] == 3 and content["name"] == "toy"
    assert content["labels"]["13"] == "left_adrenal_gland" and content["modality"] == {"0": "CT"}
    assert content["numTraining"] == len(content["training"]) and content["tensorImageSize"] == "3D"
    assert content["training"][0]["image"].startswith("img/")
    val = load_decathlon_datalist(paths[1], is_segmentation=True, data_list_key="validation", base_dir="/root")
    assert val[0]["image"] == "/root/img/" + content["validation"][0]["image"][4:]
    assert val[0]["label"].startswith("/root/lab/")
    with pytest.raises(ValueError, match="not inside the data root '/elsewhere'"):
        write_fold_files(kfold_splits(entries, 3), tmp_path / "x", "/elsewhere")


def test_label_fraction_subset_sizes_nesting_and_seed() -> None:
    entries = [{"case": f"c{i}"} for i in range(40)]
    subsets = {f: label_fraction_subset(entries, f, seed=4) for f in (0.2, 0.5, 1.0)}
    assert [len(subsets[f]) for f in (0.2, 0.5, 1.0)] == [8, 20, 40]
    assert subsets[1.0] == entries
    assert all(e in subsets[0.5] for e in subsets[0.2])
    assert subsets[0.5] == sorted(subsets[0.5], key=entries.index)  # original order
    assert label_fraction_subset(entries, 0.5, seed=4) == subsets[0.5]
    assert label_fraction_subset(entries, 0.5, seed=5) != subsets[0.5]
    assert len(label_fraction_subset(entries, 0.001)) == 1
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            label_fraction_subset(entries, bad)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_make_folds_feta_like(tmp_path: Path) -> None:
    subjects = [f"sub-{i:03d}" for i in range(1, 8)]
    _touch(tmp_path / "feta/images", [f"{s}_rec-mial_T2w.nii.gz" for s in subjects] + ["sub-001_rec-irtk_T2w.nii.gz"])
    _touch(tmp_path / "feta/labels", [f"{s}_rec-mial_dseg.nii.gz" for s in subjects] + ["sub-001_rec-irtk_dseg.nii.gz"])
    out = tmp_path / "folds"
    args = ["make-folds", "--images", str(tmp_path / "feta/images"), "--labels", str(tmp_path / "feta/labels")]
    args += [
        "--out",
        str(out),
        "--folds",
        "3",
        "--patient-regex",
        "sub-[0-9]+",
        "--classes",
        "feta",
        "--modality",
        "T2",
    ]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert "8 cases, 7 patients" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["fold_0.json", "fold_1.json", "fold_2.json"]
    folds = [json.loads((out / f"fold_{k}.json").read_text()) for k in range(3)]
    assert folds[0]["labels"]["7"] == "brainstem" and folds[0]["modality"] == {"0": "T2"}
    fold_of = {e["image"]: k for k, f in enumerate(folds) for e in f["validation"]}
    assert len(fold_of) == 8
    assert fold_of["images/sub-001_rec-mial_T2w.nii.gz"] == fold_of["images/sub-001_rec-irtk_T2w.nii.gz"]


def test_cli_make_folds_test_only_writes_one_test_list(tmp_path: Path) -> None:
    subjects = [f"sub-{i:03d}" for i in range(1, 4)]
    _touch(tmp_path / "ext/images", [f"{s}_rec-mial_T2w.nii.gz" for s in subjects])
    _touch(tmp_path / "ext/labels", [f"{s}_rec-mial_dseg.nii.gz" for s in subjects])
    out = tmp_path / "lists"
    args = ["make-folds", "--images", str(tmp_path / "ext/images"), "--labels", str(tmp_path / "ext/labels")]
    result = _cli(*args, "--out", str(out), "--classes", "feta", "--modality", "T2", "--test-only")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test.json"]
    content = json.loads((out / "test.json").read_text())
    assert "training" not in content and content["numTraining"] == 0 and content["labels"]["7"] == "brainstem"
    assert [e["image"] for e in content["test"]] == [f"images/{s}_rec-mial_T2w.nii.gz" for s in subjects]
    assert content["test"][0]["label"] == "labels/sub-001_rec-mial_dseg.nii.gz"


def test_cli_make_folds_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _touch(tmp_path / "img", ["img0001.nii.gz", "img0002.nii.gz"])
    _touch(tmp_path / "lab", ["label0001.nii.gz"])
    common = ["make-folds", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab")]
    assert main([*common, "--out", str(tmp_path / "out")]) == 1
    assert "img0002.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as usage:
        main([*common, "--out", str(tmp_path / "out"), "--classes", "bogus"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as shown:
        main(["make-folds", "--help"])
    assert shown.value.code == 0 and "--patient-regex" in capsys.readouterr().out


def test_cli_validate_datalist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert (
        main(["validate-datalist", "jsons/feta_demo.json", "--key", "training", "validation", "--data-root", "data"])
        == 0
    )
    out = capsys.readouterr().out
    assert "[training]: 2 entries" in out and "[validation]: 2 entries" in out
    no_label = tmp_path / "no_label.json"
    image = str(DATA / "ct/totalseg/example_ct_sm.nii.gz")
    no_label.write_text(json.dumps({"training": [{"image": image, "label": "gone.nii.gz", "modality": "CT"}]}))
    assert main(["validate-datalist", str(no_label)]) == 1
    assert "gone.nii.gz" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": "nope.nii.gz", "label": "x.nii.gz", "modality": "CT"}]}))
    result = _cli("validate-datalist", str(bad))  # through `python -m dae.cli`
    assert result.returncode == 1 and "nope.nii.gz" in result.stderr and not result.stdout


# ------------------------------------------------------------------------------------------- committed JSONs
def test_committed_btcv_folds() -> None:
    folds = [json.loads((JSONS / f"btcv/fold_{k}.json").read_text()) for k in range(5)]
    validated = [e["image"] for f in folds for e in f["validation"]]
    assert len(validated) == len(set(validated)) == 30
    assert sorted(validated) == [f"imagesTr/img{c}.nii.gz" for c in BTCV_CASES]
    for k, fold in enumerate(folds):
        assert fold["fold"] == k and fold["labels"] == {str(i): c for i, c in enumerate(BTCV_CLASSES)}
        train = {e["image"] for e in fold["training"]}
        assert len(train) == fold["numTraining"] == 24 and not train & {e["image"] for e in fold["validation"]}
        for entry in fold["training"] + fold["validation"]:
            assert entry["label"] == entry["image"].replace("imagesTr/img", "labelsTr/label")
            assert entry["modality"] == "CT"


def test_committed_feta_folds() -> None:
    folds = [json.loads((JSONS / f"feta/fold_{k}.json").read_text()) for k in range(5)]
    subjects = [e["image"].split("/")[0] for f in folds for e in f["validation"]]
    assert len(subjects) == len(set(subjects)) == 80
    assert sorted(subjects) == [f"sub-{i:03d}" for i in range(1, 81)]
    for k, fold in enumerate(folds):
        assert fold["fold"] == k and fold["labels"] == {str(i): c for i, c in enumerate(FETA_CLASSES)}
        train = {e["image"].split("/")[0] for e in fold["training"]}
        assert len(train) == fold["numTraining"] == 64 and not train & {
            e["image"].split("/")[0] for e in fold["validation"]
        }
        for entry in fold["training"] + fold["validation"]:
            sub = entry["image"].split("/")[0]
            rec = "mial" if int(sub[4:]) <= 40 else "irtk"
            assert entry["image"] == f"{sub}/anat/{sub}_rec-{rec}_T2w.nii.gz"
            assert entry["label"] == f"{sub}/anat/{sub}_rec-{rec}_dseg.nii.gz"
            assert entry["modality"] == "T2"


@pytest.mark.parametrize(
    ("name", "n_train", "n_val", "id_table"),
    [("btcv_demo", 2, 1, "totalsegmentator_v2"), ("feta_demo", 2, 2, "fetal_atlas")],
)
def test_demo_datalists_load(
    name: str, n_train: int, n_val: int, id_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    path = JSONS / f"{name}.json"
    train = load_datalist(path, "training", data_root="data")
    val = load_datalist(path, "validation", data_root="data")
    assert len(train) == n_train and len(val) == n_val
    for entry in train + val:
        assert entry["id_table"] == id_table
        assert read_image_header(entry["label"]).shape == read_image_header(entry["image"]).shape
    assert "labels" in json.loads(path.read_text()) and "modality" in json.loads(path.read_text())
