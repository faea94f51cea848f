"""Tests of make-xray-datalist's dataset layouts: classes from folder names, kept split folders, test-only lists."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dae.cli import main
from dae.data import load_datalist, make_xray_datalist, read_class_names

_LISTS = ("training", "validation", "test")


def _write_pngs(folder: Path, paths: Iterable[str]) -> Path:
    """Tiny 8-bit PNGs at ``paths`` (relative to ``folder``), each with its own value."""
    for i, path in enumerate(paths):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 5), i, dtype=np.uint8)).save(folder / path)
    return folder


def _split_dataset(folder: Path, splits: Iterable[str], per_class: int = 4) -> Path:
    """``{split}/{NORMAL,PNEUMONIA}/{split}_{k}.png`` for every split folder name."""
    paths = [f"{s}/{c}/{s}_{k}.png" for s in splits for c in ("PNEUMONIA", "NORMAL") for k in range(per_class)]
    return _write_pngs(folder, paths)


def _load_all(output: Path, keys: Iterable[str] = _LISTS) -> dict[str, list[dict]]:
    return {k: load_datalist(output, key=k, data_root=output.parent, require_label="class") for k in keys}


def _folder_class(entry: dict) -> str:
    return Path(entry["image"]).parent.name


def test_classes_from_folders(tmp_path: Path) -> None:
    folder = _write_pngs(
        tmp_path / "cxr", [f"{c}/img{k}.png" for c in ("PNEUMONIA", "NORMAL", "COVID") for k in range(6)]
    )
    output = tmp_path / "x.json"
    content = make_xray_datalist(folder, output, classes_from_folders=True, val_fraction=0.5, test_fraction=0.0)
    assert content["labels"] == {"0": "COVID", "1": "NORMAL", "2": "PNEUMONIA"}
    assert "stratified by class folder" in content["description"] and "test" not in content
    loaded = _load_all(output, ("training", "validation"))
    for entries in loaded.values():  # stratified: every class in both lists, each label its folder's index
        assert sorted(e["label"] for e in entries) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(content["labels"][str(e["label"])] == _folder_class(e) for e in entries)


@pytest.mark.parametrize(
    "splits",
    [("train", "valid", "test"), ("Training", "Validation", "Testing"), ("TRAIN", "val", "test"), ("training", "dev")],
)
def test_kept_split_folders(tmp_path: Path, splits: tuple[str, ...]) -> None:
    folder = _split_dataset(tmp_path / "cxr", splits)
    output = tmp_path / "lists" / "x.json"
    notes: list[str] = []
    content = make_xray_datalist(
        folder, output, classes_from_folders=True, keep_splits=True, test_fraction=0.3, note=notes.append
    )
    assert content["labels"] == {"0": "NORMAL", "1": "PNEUMONIA"} and content["numTraining"] == 8
    present = [k for k in _LISTS if k in content]
    assert present == list(_LISTS[: len(splits)])
    for key, name in zip(present, splits):  # each list is exactly its folder's images, none moved
        assert {e["image"].split("/")[2] for e in content[key]} == {name} and len(content[key]) == 8
    for entries in _load_all(output, present).values():
        assert all(content["labels"][str(e["label"])] == _folder_class(e) for e in entries)
    assert notes == ["test_fraction (--test-fraction) not used (lists kept from its split folders)."]


def test_train_and_test_folders_draw_validation_from_training(tmp_path: Path) -> None:
    folder = _split_dataset(tmp_path / "cxr", ("train", "test"), per_class=10)
    output = tmp_path / "x.json"
    notes: list[str] = []
    content = make_xray_datalist(
        folder, output, classes_from_folders=True, keep_splits=True, val_fraction=0.2, note=notes.append
    )
    images = {k: {e["image"] for e in content[k]} for k in _LISTS}
    assert [len(images[k]) for k in _LISTS] == [16, 4, 20]
    assert not (images["training"] & images["validation"]) and not (images["validation"] & images["test"])
    assert all("/train/" in i for i in images["training"] | images["validation"])
    assert all("/test/" in i for i in images["test"])
    assert sorted(e["label"] for e in content["validation"]) == [0, 0, 1, 1]  # stratified by class folder
    assert len(notes) == 1 and notes[0].startswith(f"No validation folder under '{folder}'")
    assert "validation drawn from training (0.2 of the training images by image" in content["description"]
    _load_all(output)


def test_drawn_validation_keeps_patients_together(tmp_path: Path) -> None:
    patients = [(f"p{p}", "SICK" if p % 2 else "WELL", 1 + p % 3) for p in range(12)]
    paths = {f"train/{c}/{p}_{k}.png": p for p, c, n in patients for k in range(n)}
    paths |= {"test/SICK/t0.png": "q0", "test/WELL/t1.png": "q1"}
    folder = _write_pngs(tmp_path / "cxr", paths)
    lines = ["path,label,patient"] + [f"{path},{path.split('/')[1]},{p}" for path, p in paths.items()]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path / "x.json"
    content = make_xray_datalist(folder, output, tmp_path / "labels.csv", keep_splits=True, val_fraction=0.25)
    assert content["labels"] == {"0": "SICK", "1": "WELL"}
    groups = {k: {e["patient"] for e in content[k]} for k in _LISTS}
    assert groups["validation"] and not groups["training"] & groups["validation"]
    assert groups["training"] | groups["validation"] == {p for p, _, _ in patients} and groups["test"] == {"q0", "q1"}
    assert {e["label"] for e in content["validation"]} == {0, 1}
    _load_all(output)


def test_test_only_list(tmp_path: Path) -> None:
    train = _write_pngs(tmp_path / "train", [f"{c}/a{k}.png" for c in ("PNEUMONIA", "NORMAL") for k in range(4)])
    external = _write_pngs(
        tmp_path / "external", [f"site1/{c}/b{k}.png" for c in ("NORMAL", "PNEUMONIA") for k in (1, 2)]
    )
    make_xray_datalist(train, tmp_path / "train.json", classes_from_folders=True)
    notes: list[str] = []
    output = tmp_path / "external.json"
    content = make_xray_datalist(
        external, output, classes_from_folders=True, test_only=True, val_fraction=0.2, note=notes.append
    )
    assert [k for k in _LISTS if k in content] == ["test"] and content["numTraining"] == 0
    assert read_class_names(output) == read_class_names(tmp_path / "train.json") == ["NORMAL", "PNEUMONIA"]
    assert [(e["image"], e["label"]) for e in content["test"]] == [
        (f"external/site1/{c}/b{k}.png", i) for i, c in enumerate(("NORMAL", "PNEUMONIA")) for k in (1, 2)
    ]
    assert notes == ["val_fraction (--val-fraction) not used (test only: every image in the test list)."]
    _load_all(output, ["test"])
    unlabelled = make_xray_datalist(external, tmp_path / "u.json", test_only=True)
    assert "labels" not in unlabelled and all(set(e) == {"image", "modality"} for e in unlabelled["test"])


def test_layout_errors_name_the_images(tmp_path: Path) -> None:
    output = tmp_path / "x.json"
    flat = _write_pngs(tmp_path / "flat", ["NORMAL/a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match=r"2 of 3 images .* no class folder") as error:
        make_xray_datalist(flat, output, classes_from_folders=True)
    assert str(flat / "b.png") in str(error.value) and str(flat / "c.png") in str(error.value)

    split = _split_dataset(tmp_path / "split", ("train", "test"), per_class=1)
    _write_pngs(split, ["test/loose.png", "extra/NORMAL/x.png"] + [f"other/NORMAL/{k}.png" for k in range(7)])
    with pytest.raises(ValueError, match=r"no class folder.*test/PNEUMONIA/img1.png") as error:
        make_xray_datalist(split, output, classes_from_folders=True, keep_splits=True)
    assert str(split / "test" / "loose.png") in str(error.value)
    (split / "test" / "loose.png").unlink()
    with pytest.raises(ValueError, match=r"8 of 12 images .* no split folder") as error:
        make_xray_datalist(split, output, classes_from_folders=True, keep_splits=True)
    assert str(split / "extra" / "NORMAL" / "x.png") in str(error.value) and "... and 3 more" in str(error.value)

    both = _write_pngs(tmp_path / "both", ["train/test/NORMAL/a.png"])
    with pytest.raises(ValueError, match="split folders of two lists"):
        make_xray_datalist(both, output, keep_splits=True)
    with pytest.raises(ValueError, match="not both"):
        make_xray_datalist(flat, output, labels=tmp_path / "labels.csv", classes_from_folders=True)
    with pytest.raises(ValueError, match="exclude each other"):
        make_xray_datalist(flat, output, keep_splits=True, test_only=True)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        make_xray_datalist(split, output, keep_splits=True, val_fraction=1.0)
    assert not output.exists()


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _split_dataset(tmp_path / "cxr", ("Train", "Test"), per_class=5)
    output = tmp_path / "x.json"
    args = ["make-xray-datalist", str(folder), "--output", str(output), "--classes-from-folders", "--keep-splits"]
    assert main([*args, "--val-fraction", "0.2", "--data-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"Wrote {output}: training 8 (NORMAL 4, PNEUMONIA 4); validation 2 (NORMAL 1, PNEUMONIA 1); "
        "test 10 (NORMAL 5, PNEUMONIA 5)."
    )
    assert lines[1].startswith(f"Note: No validation folder under '{folder}': validation drawn from training")
    assert main(["validate-datalist", str(output), "--data-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("OK ") == 3
    assert json.loads(output.read_text())["training"][0]["image"].startswith("cxr/Train/")

    test_list = tmp_path / "test.json"
    args = ["make-xray-datalist", str(folder / "Test"), "--output", str(test_list), "--classes-from-folders"]
    assert main([*args, "--test-only"]) == 0
    out = capsys.readouterr().out
    assert out == f"Wrote {test_list}: training 0; validation 0; test 10 (NORMAL 5, PNEUMONIA 5).\n"
    assert read_class_names(test_list) == read_class_names(output)

    for options in (["--keep-splits", "--test-only"], ["--classes-from-folders", "--labels", "labels.csv"]):
        with pytest.raises(SystemExit) as usage:
            main(["make-xray-datalist", str(folder), "--output", str(output), *options])
        assert usage.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert (
        main(["make-xray-datalist", str(folder), "--output", str(tmp_path / "n.json"), "--classes-from-folders"]) == 0
    )
    assert main(["make-xray-datalist", str(folder / "Test"), "--output", str(output), "--keep-splits"]) == 1
    assert "no split folder" in capsys.readouterr().err
