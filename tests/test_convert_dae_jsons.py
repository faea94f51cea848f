"""Tests of convert-dae-jsons: the DAE paper's Decathlon-style CT lists and the BraTS fold list, converted with
modalities from the dataset or the file name (never from the path), missing files, dataset names and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dae.cli import main
from dae.data import load_datalist
from dae.data.dae_reference_lists import reference_dataset
from tests.test_pretrain_datalist import write_nifti

LUNA_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"


def run(*args: object) -> int:
    return main([str(a) for a in args])


def write_json(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def luna_reference(tmp_path: Path) -> tuple[Path, Path]:
    """A LUNA16 list whose paths hold "t1" (which the reference code read as the modality) and an extra key."""
    base = tmp_path / "luna"
    for name in ("img_1", "img_2", LUNA_UID):
        write_nifti(base / "t1_batch" / f"{name}.nii.gz")
    content = {
        "training": [
            {"image": "t1_batch/img_1.nii.gz", "label": "unused.nii.gz"},
            {"image": f"t1_batch/{LUNA_UID}.nii.gz"},
        ],
        "validation": [{"image": "t1_batch/img_2.nii.gz"}],
    }
    return write_json(tmp_path / "refs" / "dataset_LUNA16_0.json", content), base


def brats_reference(tmp_path: Path) -> tuple[Path, Path]:
    """A BraTS fold list: a case as a list of its four sequences, and cases given one sequence file at a time."""
    base = tmp_path / "brats"
    cases = [f"BraTS2021_{i:05d}" for i in range(3)]
    for case in cases:
        for sequence in ("t1", "t1ce", "t2", "flair"):
            write_nifti(base / "TrainingData" / case / f"{case}_{sequence}.nii.gz")
    first = [f"TrainingData/{cases[0]}/{cases[0]}_{s}.nii.gz" for s in ("flair", "t1ce", "t1", "t2")]
    content = {
        "training": [
            {"fold": 0, "image": first, "label": f"TrainingData/{cases[0]}/{cases[0]}_seg.nii.gz"},
            *(
                {"fold": fold, "image": f"TrainingData/{case}/{case}_{s}.nii.gz"}
                for fold, case in ((1, cases[1]), (2, cases[2]))
                for s in ("t1", "t1ce", "t2", "flair")
            ),
        ]
    }
    return write_json(tmp_path / "refs" / "brats21_pre.json", content), base


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("dataset_LUNA16_0.json", "luna16"),
        ("dataset_TCIAcovid19_0.json", "tcia_covid19"),
        ("dataset_HNSCC_0.json", "hnscc"),
        ("dataset_TCIAcolon_v2_0.json", "tcia_colonography"),
        ("dataset_LIDC_0.json", "lidc_idri"),
        ("brats21_pre.json", "brats2021"),
    ],
)
def test_dataset_from_file_name(name: str, tag: str) -> None:
    assert reference_dataset(f"/refs/{name}") == tag


def test_converts_ct_and_brats_lists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    luna, luna_base = luna_reference(tmp_path)
    brats, brats_base = brats_reference(tmp_path)
    out = tmp_path / "dae.json"
    assert (
        run("convert-dae-jsons", "--json", f"{luna}={luna_base}", "--json", f"{brats}={brats_base}", "--output", out)
        == 0
    )
    content = json.loads(out.read_text())
    assert content["data_root"] == str(tmp_path)
    training, validation = content["training"], content["validation"]
    luna_entries = [e for e in training + validation if e["tags"] == ["luna16"]]
    assert all(
        e["modality"] == "CT" and set(e) <= {"image", "modality", "tags", "patient", "series_uid"} for e in luna_entries
    )
    assert [e["image"] for e in validation if e["tags"] == ["luna16"]] == ["luna/t1_batch/img_2.nii.gz"]
    assert [e.get("series_uid") for e in luna_entries] == [None, LUNA_UID, None]
    brats_validation = [e for e in validation if e["tags"] == ["brats2021"]]
    assert {e["patient"] for e in brats_validation} == {"BraTS2021_00000"}
    assert sorted(e["modality"] for e in brats_validation) == ["FLAIR", "T1", "T1CE", "T2"]
    brats_training = [e for e in training if e["tags"] == ["brats2021"]]
    assert len(brats_training) == 8 and {e["patient"] for e in brats_training} == {"BraTS2021_00001", "BraTS2021_00002"}
    for entry in brats_training + brats_validation:
        assert entry["image"].endswith(f"_{entry['modality'].lower()}.nii.gz")
    for key in ("training", "validation"):
        assert len(load_datalist(out, key=key, data_root=content["data_root"])) == len(content[key])
    report = capsys.readouterr().out
    assert "brats2021: 3 cases (12 volumes), 2 training + 1 validation; paper 1251 = 1188 + 63" in report
    assert "luna16: 3 volumes, 2 training + 1 validation; paper 888 = 844 + 44" in report


def test_missing_files_fail_unless_unchecked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    luna, luna_base = luna_reference(tmp_path)
    (luna_base / "t1_batch" / "img_2.nii.gz").unlink()
    out = tmp_path / "dae.json"
    assert run("convert-dae-jsons", "--json", f"{luna}={luna_base}", "--output", out) == 1
    error = capsys.readouterr().err
    assert f"{luna} (base folder {luna_base}): 1 of 3 missing" in error
    assert str(luna_base / "t1_batch" / "img_2.nii.gz") in error and "--no-check-files" in error
    assert not out.exists()
    assert run("convert-dae-jsons", "--json", f"{luna}={luna_base}", "--output", out, "--no-check-files") == 0
    assert len(json.loads(out.read_text())["validation"]) == 1


def test_dataset_override_and_unusable_items(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    luna, base = luna_reference(tmp_path)
    renamed = luna.rename(luna.with_name("my_ct_list.json"))
    out = tmp_path / "dae.json"
    assert run("convert-dae-jsons", "--json", f"{renamed}={base}", "--output", out) == 1
    assert "Cannot tell the dataset of" in capsys.readouterr().err
    assert run("convert-dae-jsons", "--json", f"{renamed}={base}:lidc-idri", "--output", out) == 0
    assert {e["tags"][0] for e in json.loads(out.read_text())["training"]} == {"lidc_idri"}
    bad = write_json(
        tmp_path / "refs" / "brats21_pre.json",
        {"training": [{"fold": 0, "image": "c/BraTS2021_00000_seg.nii.gz"}, {"fold": 1, "image": 7}]},
    )
    assert run("convert-dae-jsons", "--json", f"{bad}={base}", "--output", out) == 1
    error = capsys.readouterr().err
    assert "2 unusable items" in error and "training[0]: c/BraTS2021_00000_seg.nii.gz" in error
    assert "training[1]: 'image' must be a path or a list of paths, got 7" in error


def test_paper_split_is_kept_even_with_a_patient_on_both_sides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "covid"
    for name in ("A-0003", "A-0003_day10", "A-0269"):
        write_nifti(base / f"volume-covid19-{name}.nii.gz")
    content = {
        "training": [{"image": "volume-covid19-A-0003.nii.gz"}, {"image": "volume-covid19-A-0269.nii.gz"}],
        "validation": [{"image": "volume-covid19-A-0003_day10.nii.gz"}, {"image": "volume-covid19-A-0269.nii.gz"}],
    }
    reference = write_json(tmp_path / "dataset_TCIAcovid19_0.json", content)
    out = tmp_path / "dae.json"
    assert run("convert-dae-jsons", "--json", f"{reference}={base}", "--output", out) == 0
    written = json.loads(out.read_text())
    assert [e["image"] for e in written["training"]] == ["volume-covid19-A-0003.nii.gz"]
    assert [e["image"] for e in written["validation"]] == [
        "volume-covid19-A-0003_day10.nii.gz",
        "volume-covid19-A-0269.nii.gz",
    ]
    assert [e["patient"] for e in written["validation"]] == ["A-0003", "A-0269"]
    report = capsys.readouterr().out
    assert "tcia_covid19: 1 patients have volumes in both lists of the paper's split (kept as they are)." in report
    assert "Dropped 1 copies of series or images listed already: tcia_covid19 1." in report


@pytest.mark.parametrize("value", ["no_equals_sign.json", "a.json=/data:not_a_dataset"])
def test_bad_json_argument_exits_2(tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("convert-dae-jsons", "--json", value, "--output", tmp_path / "out.json")
    assert exit_info.value.code == 2
