"""The dictation-to-mask pipeline, its case files, its evaluation table and the box / mask measures."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from dae.logsam.detection import Detection, DetectionResult, HeatmapBoxDetector
from dae.logsam.evaluation import evaluate_pipeline, summary_rows
from dae.logsam.heatmap_detector import TextConditionedHeatmapDetector
from dae.logsam.metrics import box_iou, box_mask, mask_dice_iou, mean_estimate
from dae.logsam.pipeline import DictationToMask, write_case
from dae.logsam.segmenters import ImageEmbedding, SegmentationOutput

pytest.importorskip("spacy")
pytest.importorskip("negspacy")

SIZE = 32


class BoxFillingSegmenter:
    """A stand-in segmenter whose mask is the prompt box filled; it counts its encoder calls."""

    name = "box-filler"

    def __init__(self) -> None:
        self.embed_calls = 0

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        self.embed_calls += 1
        return ImageEmbedding(
            torch.zeros(1, 4, 8, 8), image.shape[:2], (SIZE, SIZE), (SIZE, SIZE), (1.0, 1.0), self.name
        )

    def segment(self, embedding: ImageEmbedding, boxes: np.ndarray) -> SegmentationOutput:
        masks = np.stack([box_mask(b, tuple(embedding.image_size)) for b in boxes])
        return SegmentationOutput(masks, np.full(len(boxes), 0.9, dtype=np.float32))


class FixedBoxDetector:
    """Finds ``box`` for ``present`` (with class scores) and nothing for any other class."""

    def __init__(self, present: str, box: list[float]) -> None:
        self.present, self.box = present, np.asarray(box, dtype=np.float64)

    def detect(self, image, class_name, embedding=None) -> DetectionResult:
        assert embedding is not None  # the pipeline shares the segmenter's embedding
        scores = {name: 0.9 if name == self.present else 0.1 for name in ("glioma", "meningioma", "pituitary")}
        if class_name != self.present:
            return DetectionResult((), class_name, class_name, "no_box", scores)
        found = Detection(self.box, 0.9, class_name, class_name)
        return DetectionResult((found,), class_name, class_name, "box", scores)


@pytest.fixture
def pipeline() -> DictationToMask:
    return DictationToMask(BoxFillingSegmenter(), FixedBoxDetector("meningioma", [4, 6, 20, 18]))


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)


def test_named_tumour_gives_box_and_mask_and_negated_mention_is_dropped(pipeline):
    text = "No evidence of glioma, findings are consistent with a meningioma."
    result = pipeline(_image(), text=text)
    assert result.outcome == "mask"
    assert result.prompt.tumour_class == "meningioma" and result.prompt.negated_classes == ["glioma"]
    assert result.box.tolist() == [4, 6, 20, 18]
    assert result.mask.sum() == 16 * 12 and result.mask[6:18, 4:20].all()
    record = result.record()
    assert record["class"] == "meningioma" and record["caption"] == "meningioma" and record["mask_pixels"] == 192


def test_no_tumour_dictation_stops_before_the_encoder(pipeline):
    result = pipeline(_image(), text="Kein Hinweis auf ein Gliom.", language="de")
    assert (result.outcome, result.prompt.tumour_class, result.mask, result.detection) == (
        "healthy",
        "healthy",
        None,
        None,
    )
    assert pipeline.segmenter.embed_calls == 0


def test_no_box_for_the_named_class_is_an_explicit_outcome(pipeline):
    result = pipeline(_image(), text="Large pituitary macroadenoma.")
    assert result.outcome == "no_box" and result.mask is None and result.detection.outcome == "no_box"


def test_input_errors_are_named(pipeline):
    with pytest.raises(ValueError, match="exactly one of audio= and text="):
        pipeline(_image())
    with pytest.raises(ValueError, match="no transcriber"):
        pipeline(_image(), audio=np.zeros(16000, dtype=np.float32))
    foreign = ImageEmbedding(torch.zeros(1, 4, 8, 8), (SIZE, SIZE), (SIZE, SIZE), (SIZE, SIZE), (1.0, 1.0), "other")
    with pytest.raises(ValueError, match="'other'"):
        pipeline(_image(), text="glioma", embedding=foreign)
    with pytest.raises(ValueError, match="language 'fr'"):
        DictationToMask(BoxFillingSegmenter(), FixedBoxDetector("glioma", [0, 0, 1, 1]), language="fr")


def test_write_case_files(pipeline, tmp_path):
    image = _image()
    result = pipeline(image, text="meningioma")
    record = write_case(result, image, tmp_path, "c1", {"true_box": [4, 6, 20, 18]})
    png = np.asarray(Image.open(tmp_path / "c1_mask.png"))
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255} and (png > 0).sum() == 192
    volume = nib.load(tmp_path / "c1_mask.nii.gz").get_fdata()
    np.testing.assert_array_equal(volume[:, :, 0].T > 0, png > 0)  # (W, H, 1): x = column, y = row
    assert np.asarray(Image.open(tmp_path / "c1_overlay.png")).shape == (SIZE, SIZE, 3)
    assert json.loads((tmp_path / "c1.json").read_text()) == record and record["outcome"] == "mask"
    healthy = pipeline(image, text="No intracranial mass.")
    write_case(healthy, image, tmp_path, "c2")
    assert np.asarray(Image.open(tmp_path / "c2_mask.png")).max() == 0


def test_box_and_mask_measures():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_mask([1, 2, 4, 3], (5, 5)).sum() == 3
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True
    assert mask_dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert mask_dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (1.0, 1.0)
    value, low, high, _ = mean_estimate([0.2, 0.4, 0.6, 0.8], n_boot=200)
    assert value == pytest.approx(0.5) and 0.2 <= low < value < high <= 0.8
    assert math.isnan(mean_estimate([]).value)


def _write_png(path, array):
    Image.fromarray(array).save(path)


def test_evaluation_counts_every_way(pipeline, tmp_path):
    """Two meningiomas (one dictated as such, one dictated as 'no tumour') and one glioma given by its label."""
    cases = []
    for index, (name, extra) in enumerate(
        [
            ("meningioma", {"report": "Findings are consistent with a meningioma."}),
            ("meningioma", {"report": "No intracranial mass.", "dictated_class": "healthy"}),
            ("glioma", {}),
        ]
    ):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:16, 6:18] = 255
        _write_png(tmp_path / f"i{index}.png", _image(index))
        _write_png(tmp_path / f"m{index}.png", mask)
        cases.append(
            {"image": str(tmp_path / f"i{index}.png"), "mask": str(tmp_path / f"m{index}.png"), "class": name}
            | {"box": [6.0, 8.0, 18.0, 16.0]}
            | extra
        )

    from dae.logsam.data import EmbeddingCache

    cache = EmbeddingCache(pipeline.segmenter, tmp_path / "cache")
    summary = evaluate_pipeline(pipeline, cases, cache, tmp_path / "eval", "toy", n_boot=50, progress=False)
    rows = summary["measures"]
    assert summary["cases"] == 3
    assert rows["dictation_class_accuracy"]["value"] == 1.0  # both dictated cases decided right
    assert rows["no_mask_when_no_tumour_dictated"]["value"] == 1.0
    # The detector sees meningioma in every image: right for the two meningiomas, wrong for the glioma.
    assert rows["detector_class_accuracy"]["value"] == pytest.approx(2 / 3)
    iou = box_iou([4, 6, 20, 18], [6, 8, 18, 16])
    assert rows["box_iou"]["value"] == pytest.approx(2 * iou / 3)
    assert rows["dice_true_box"]["value"] == 1.0 and rows["dice_filled_box"]["value"] == 1.0
    assert rows["dice_predicted_box"]["value"] == pytest.approx(
        2 * mask_dice_iou(box_mask([4, 6, 20, 18], (SIZE, SIZE)), box_mask([6, 8, 18, 16], (SIZE, SIZE)))[0] / 3
    )
    assert (tmp_path / "eval" / "summary.md").read_text().startswith("# toy: 3 cases")
    lines = (tmp_path / "eval" / "cases.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("id,true_class,dictated_class,prompt_source")
    assert sorted(p.name for p in (tmp_path / "eval" / "cases").glob("*.json")) == ["i0.json", "i1.json", "i2.json"]
    # One encoder run per image: the pipeline and the measures share the cached embedding.
    assert cache.misses == 3 and pipeline.segmenter.embed_calls == 3


def test_summary_leaves_out_rows_without_cases():
    from dae.logsam.evaluation import CaseScores

    case = CaseScores(
        "a", "glioma", "glioma", "label", "glioma", "mask", "", 0.7, 0.8, 0.7, 0.9, 0.8, 0.8, 0.7, 0.8, True
    )
    rows = summary_rows([case], n_boot=10)
    assert "dictation_class_accuracy" not in rows and "detector_class_accuracy" not in rows
    assert "no_mask_when_no_tumour_dictated" not in rows and rows["box_iou"].value == pytest.approx(0.7)


def test_heatmap_box_detector_reads_the_asked_class_map():
    torch.manual_seed(0)
    model = TextConditionedHeatmapDetector(image_channels=4, text_dim=3, hidden=8)
    prompts = torch.eye(3)
    detector = HeatmapBoxDetector(model, prompts, ["glioma", "meningioma", "pituitary"], ["g", "m", "p"], threshold=0.0)
    embedding = BoxFillingSegmenter().embed(_image())
    result = detector.detect(_image(), "meningioma", embedding=embedding)
    assert (
        result.outcome == "box"
        and result.best.class_name == "meningioma"
        and set(result.class_scores) == {"glioma", "meningioma", "pituitary"}
    )
    assert result.best.box.tolist() == [0, 0, SIZE, SIZE]  # threshold 0: the whole frame is one region
    strict = HeatmapBoxDetector(model, prompts, ["glioma", "meningioma", "pituitary"], ["g", "m", "p"], min_score=1.0)
    assert strict.detect(_image(), "glioma", embedding=embedding).outcome == "no_box"
    with pytest.raises(ValueError, match="embedding="):
        detector.detect(_image(), "glioma")
    with pytest.raises(ValueError, match="'healthy'"):
        detector.detect(_image(), "healthy", embedding=embedding)
