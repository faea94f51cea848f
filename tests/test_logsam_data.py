"""LoGSAM datalists (checked up front), masks to boxes, the shipped demo list and the embedding cache."""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dae.errors import DataError
from dae.logsam.classes import ClassTable
from dae.logsam.data import EmbeddingCache, load_logsam_datalist, mask_to_box, read_grey

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jsons" / "logsam_demo.json"
SPLITS = ("training", "validation", "test")
MIN_INDEX_GAP = 18  # 8 slices of the even-index copy left out between lists: 16 original slices, > one patient's ~13


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.name


def _write_list(folder: Path, entries: list[dict[str, Any]], split: str = "training") -> Path:
    path = folder / "list.json"
    path.write_text(json.dumps({split: entries}))
    return path


@pytest.fixture
def slices(tmp_path: Path) -> Path:
    """Two 20x30 slices with masks in ``tmp_path``: ``a`` (tumour at x 5..9, y 2..5) and ``empty`` (no tumour)."""
    image = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:6, 5:10] = 255
    _png(tmp_path / "a.png", image)
    _png(tmp_path / "a_mask.png", mask)
    _png(tmp_path / "empty_mask.png", np.zeros_like(mask))
    _png(tmp_path / "small_mask.png", mask[:10])
    return tmp_path


def test_mask_to_box_is_tight_and_exclusive() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[3:7, 2:5] = 255
    mask[8, 10] = 1
    np.testing.assert_array_equal(mask_to_box(mask), [2, 3, 11, 9])
    one = np.zeros((4, 4), dtype=bool)
    one[1, 2] = True
    np.testing.assert_array_equal(mask_to_box(one), [2, 1, 3, 2])
    assert mask_to_box(np.zeros((5, 5), dtype=np.uint8)) is None
    with pytest.raises(ValueError, match="expects an"):
        mask_to_box(np.zeros((2, 5, 5)))


def test_read_grey_converts_colour_and_refuses_16_bit(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    _png(tmp_path / "rgb.png", rgb)
    grey = read_grey(tmp_path / "rgb.png")
    assert grey.dtype == np.uint8 and grey.shape == (4, 6) and 100 < grey[0, 0] < 200
    Image.fromarray(np.full((4, 6), 3000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep\.png has PIL mode"):
        read_grey(tmp_path / "deep.png")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_grey(tmp_path / "missing.png")


def test_valid_entries_get_paths_joined_and_boxes_from_masks(slices: Path) -> None:
    entries = [
        {"image": "a.png", "mask": "a_mask.png", "class": "glioma", "report": "a glioma", "language": "de"},
        {"image": "a.png", "box": [1, 1, 4, 5], "class": "pituitary", "id": "x"},
        {"image": "a.png", "mask": "empty_mask.png", "class": "healthy"},
    ]
    loaded = load_logsam_datalist(_write_list(slices, entries), slices, "training")
    assert loaded[0]["image"] == str(slices / "a.png") and loaded[0]["mask"] == str(slices / "a_mask.png")
    assert loaded[0]["box"] == [5.0, 2.0, 10.0, 6.0]
    assert loaded[1]["box"] == [1.0, 1.0, 4.0, 5.0] and loaded[1]["id"] == "x"
    assert "box" not in loaded[2]
    assert loaded[0]["report"] == "a glioma"


def test_every_problem_is_reported_with_index_and_key(slices: Path) -> None:
    entries = [
        {"image": "a.png", "mask": "a_mask.png", "class": "glioma"},
        {"image": "gone.png", "mask": "a_mask.png", "class": "glioma"},
        {"image": "a.png", "mask": "small_mask.png", "class": "glioma"},
        {"image": "a.png", "mask": "a_mask.png", "class": "astrocytoma"},
        {"image": "a.png", "box": [0, 0, 31, 5], "class": "glioma"},
        {"image": "a.png", "mask": "a_mask.png", "box": [5, 2, 10, 7], "class": "glioma"},
        {"image": "a.png", "class": "meningioma"},
        {"image": "a.png", "mask": "empty_mask.png", "class": "glioma"},
        {"image": "a.png", "box": [1, 1, 4, 5], "class": "healthy"},
        {"image": "a.png", "mask": "a_mask.png", "class": "glioma", "language": "fr"},
        {"mask": "a_mask.png", "class": "glioma"},
        {"image": "a.png", "mask": "a_mask.png", "class": "glioma", "dictation": "gone.wav"},
        {"image": "a.png", "mask": "a_mask.png", "class": "glioma", "dictated_class": "lymphoma"},
    ]
    path = _write_list(slices, entries)
    with pytest.raises(DataError) as caught:
        load_logsam_datalist(path, slices, "training")
    message = str(caught.value)
    expected = {
        1: r"key 'image' \(.*gone\.png\): file does not exist",
        2: r"key 'mask' \(.*small_mask\.png\): size \(10, 30\) differs from the image's \(20, 30\)",
        3: r"key 'class' \('astrocytoma'\): not a class of the class table",
        4: r"key 'box': \[0, 0, 31, 5\] is not a box with 0 <= x0 < x1 <= 30",
        5: r"key 'box' \(\[5, 2, 10, 7\]\): differs from the mask's tight box \[5\.0, 2\.0, 10\.0, 6\.0\]",
        6: r"class 'meningioma' is a tumour class: a 'mask' or a 'box' is required",
        7: r"key 'mask' \(.*empty_mask\.png\): empty, but class 'glioma' is a tumour class",
        8: r"key 'box': a 'healthy' entry has no tumour to box",
        9: r"key 'language' \('fr'\): must be one of the class table's \['en', 'de'\]",
        10: r"key 'image' is missing",
        11: r"key 'dictation' \(.*gone\.wav\): file does not exist",
        12: r"key 'dictated_class' \('lymphoma'\): not a class of the class table",
    }
    assert str(path) in message and "'training'" in message
    for index, pattern in expected.items():
        assert re.search(rf"\[{index}\] [^\n]*{pattern}", message), (index, message)
    assert "[0]" not in message


def test_list_and_file_errors(slices: Path) -> None:
    path = _write_list(slices, [{"image": "a.png", "mask": "a_mask.png", "class": "glioma"}])
    with pytest.raises(DataError, match=r"no non-empty list 'test' \(lists present: \['training'\]\)"):
        load_logsam_datalist(path, slices, "test")
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        load_logsam_datalist(slices / "nothing.json", slices, "training")
    (slices / "broken.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_logsam_datalist(slices / "broken.json", slices, "training")


def _index(entry: dict[str, Any]) -> int:
    return int(Path(entry["image"]).stem)


def test_shipped_demo_list_is_valid_balanced_and_split_by_patient_ranges() -> None:
    table = ClassTable.default()
    lists = {split: load_logsam_datalist(DEMO, REPO / "data", split, table) for split in SPLITS}
    expected = {"training": 60, "validation": 10, "test": 20}
    for split, entries in lists.items():
        counts = {name: sum(e["class"] == name for e in entries) for name in table.tumour_names}
        assert counts == dict.fromkeys(table.tumour_names, expected[split]), (split, counts)
    # Lists of different splits must be >= MIN_INDEX_GAP original slices apart, so that no patient is in two.
    indices = {split: np.array([_index(e) for e in entries]) for split, entries in lists.items()}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            distance = np.abs(indices[first][:, None] - indices[second][None, :]).min()
            assert distance >= MIN_INDEX_GAP, (first, second, distance)
    with (REPO / "data" / "mr" / "brain_tumor_figshare" / "labels.csv").open() as handle:
        rows = {int(row["index"]): row for row in csv.DictReader(handle)}
    listed = sorted(i for values in indices.values() for i in values.tolist())
    assert listed == sorted(rows)
    for entries in lists.values():
        for entry in entries:
            row = rows[_index(entry)]
            assert row["class"] == entry["class"]
            assert [float(row[k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1")] == entry["box"]


@dataclass
class FakeEmbedding:
    features: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FakeEmbedding:
        return cls(values["features"])


class FakeSegmenter:
    """Embeds an image as its mean grey value in a (1, 2, 2, 2) tensor, counting its calls."""

    def __init__(self, name: str = "fake/v1") -> None:
        self.name = name
        self.calls = 0

    def embed(self, image: np.ndarray) -> FakeEmbedding:
        self.calls += 1
        return FakeEmbedding(torch.full((1, 2, 2, 2), float(image.mean())))


def test_embedding_cache_hits_on_the_second_call(slices: Path, caplog: pytest.LogCaptureFixture) -> None:
    segmenter = FakeSegmenter()
    cache = EmbeddingCache(segmenter, slices / "cache", embedding_type=FakeEmbedding)
    first = cache.get(slices / "a.png")
    second = cache.get(slices / "a.png")
    assert segmenter.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(first.features, second.features)
    assert cache.path_for(slices / "a.png").is_file()
    assert cache.path_for(slices / "a.png").parent.name == "fake_v1"

    # A copy of the same bytes is the same image; other bytes or another segmenter name are not.
    (slices / "copy.png").write_bytes((slices / "a.png").read_bytes())
    cache.get(slices / "copy.png")
    assert segmenter.calls == 1
    cache.get(slices / "a_mask.png")
    assert segmenter.calls == 2
    other = FakeSegmenter("fake/v2")
    EmbeddingCache(other, slices / "cache", embedding_type=FakeEmbedding).get(slices / "a.png")
    assert other.calls == 1

    # A damaged cache file is embedded again and replaced, with a warning.
    cache.path_for(slices / "a.png").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="dae.logsam.data"):
        again = cache.get(slices / "a.png")
    assert segmenter.calls == 3 and "cannot be read" in caplog.text
    torch.testing.assert_close(again.features, first.features)
    assert EmbeddingCache(segmenter, slices / "cache", embedding_type=FakeEmbedding).get(slices / "a.png") is not None
    assert segmenter.calls == 3


def test_embedding_cache_needs_a_segmenter_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no name"):
        EmbeddingCache(FakeSegmenter(name=""), tmp_path, embedding_type=FakeEmbedding)
