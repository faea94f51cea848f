"""Grounding DINO for LoGSAM: captions, negative sampling, box data, detection outcomes, LoRA training and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("scipy")  # the Hungarian matcher of the loss

from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from dae.logsam.classes import ClassTable
from dae.logsam.grounding_dino import (
    GroundingDinoDetector,
    build_caption,
    tiny_grounding_dino,
)
from dae.logsam.grounding_training import (
    LOGSAM_LOSS_WEIGHTS,
    BoxDataset,
    GroundingDinoTrainer,
    collate_boxes,
    configure_logsam_loss,
    logsam_loss,
    sample_caption,
)
from dae.logsam.lora import adapter_state_dict, apply_lora, is_adapter_key
from dae.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {"glioma": "glioma", "meningioma": "meningioma", "pituitary": "pituitary tumour"}
CLASSES = ("glioma", "meningioma", "pituitary", "glioma")


def _ellipse_image(index: int) -> tuple[np.ndarray, list[int]]:
    """A white ellipse on dark noise (64 x 64 uint8) and its tight box [x0, y0, x1, y1] (x1/y1 exclusive)."""
    rng = np.random.default_rng(index)
    image = rng.integers(0, 80, (64, 64)).astype(np.uint8)
    rows, cols = np.mgrid[:64, :64]
    inside = ((rows - 20 - 6 * index) / (8 + index)) ** 2 + ((cols - 30 - 4 * index) / 10) ** 2 <= 1
    image[inside] = 255
    ys, xs = np.nonzero(inside)
    return image, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.fixture(scope="module")
def dataset_dir(module_tmp_path: Path) -> Path:
    folder = module_tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    entries = []
    for index, name in enumerate(CLASSES):
        image, box = _ellipse_image(index)
        Image.fromarray(image).save(folder / "images" / f"case{index}.png")
        entries.append({"image": f"images/case{index}.png", "class": name, "box": box})
    (folder / "datalist.json").write_text(json.dumps({"training": entries, "validation": entries[:2]}))
    return folder


def _entries(dataset_dir: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((dataset_dir / "datalist.json").read_text())[split]


# ---------------------------------------------------------------------------------------------------- captions
def test_captions_name_the_class_or_all_classes_spelled_right() -> None:
    table = ClassTable.default()
    assert build_caption("glioma", table) == "glioma ."
    assert build_caption("pituitary", table) == "pituitary tumour ."
    every = build_caption("glioma", table, all_classes=True)
    assert every == "glioma . meningioma . pituitary tumour ."
    assert "pituatory" not in every and "healthy" not in every
    assert build_caption("meningioma", CAPTIONS, all_classes=True) == every
    with pytest.raises(ValueError, match="'healthy' has no detector caption"):
        build_caption("healthy", CAPTIONS)


def test_sampled_captions_hold_the_positive_and_int_n_times_rate_negatives() -> None:
    rng = np.random.RandomState(0)
    _, processor = tiny_grounding_dino()
    positions = set()
    for _ in range(20):
        caption, labels = sample_caption(["glioma"], list(CAPTIONS), 1.0, rng=rng, phrases=CAPTIONS)
        phrases = caption.removesuffix(" .").split(" . ")
        assert len(phrases) == 2 and len(set(phrases)) == 2 and "glioma" in phrases
        assert phrases[labels["glioma"]] == "glioma"
        positions.add(labels["glioma"])
        # The label is the phrase index Grounding DINO's label maps use.
        input_ids = processor.tokenizer(caption, return_tensors="pt")["input_ids"]
        phrase_tokens = build_label_maps(torch.zeros(1, 1, 32), input_ids)[0][labels["glioma"]]
        assert processor.tokenizer.decode(input_ids[0][phrase_tokens[: input_ids.shape[1]].bool()]) == "glioma"
    assert positions == {0, 1}  # shuffled: the positive is not always first
    # Rate 3 asks for 3 negatives; only 2 other classes exist: no class is repeated.
    caption, _ = sample_caption(["pituitary"], list(CAPTIONS), 3.0, rng=rng, phrases=CAPTIONS)
    assert sorted(caption.removesuffix(" .").split(" . ")) == ["glioma", "meningioma", "pituitary tumour"]
    assert sample_caption(["meningioma"], list(CAPTIONS), 0.0, rng=rng) == ("meningioma .", {"meningioma": 0})
    with pytest.raises(ValueError, match=r"\['healthy'\] are not among"):
        sample_caption(["healthy"], list(CAPTIONS), rng=rng)


# ---------------------------------------------------------------------------------------------------- data
def test_box_dataset_gives_what_the_model_needs(dataset_dir: Path) -> None:
    _, processor = tiny_grounding_dino()
    entries = _entries(dataset_dir, "training")
    dataset = BoxDataset(entries, processor, CAPTIONS, base_dir=dataset_dir, negative_rate=3.0)
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 64, 64)
    x0, y0, x1, y1 = entries[2]["box"]
    expected = torch.tensor([[(x0 + x1) / 128, (y0 + y1) / 128, (x1 - x0) / 64, (y1 - y0) / 64]])
    torch.testing.assert_close(item["labels"]["boxes"], expected)
    phrases = item["caption"].removesuffix(" .").split(" . ")
    assert phrases[int(item["labels"]["class_labels"][0])] == "pituitary tumour"
    first = dataset[0]
    batch = collate_boxes([first, item])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and bool(batch["pixel_mask"].all())
    length = max(len(first["input_ids"]), len(item["input_ids"]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, length)
    assert int(batch["attention_mask"].sum()) == len(first["input_ids"]) + len(item["input_ids"])
    with pytest.raises(ValueError, match=r"\[0\] key 'box' is missing.*\n.*\[1\] key 'class' \('healthy'\)"):
        BoxDataset([{"image": "a.png", "class": "glioma"}, {**entries[0], "class": "healthy"}], processor, CAPTIONS)


# ---------------------------------------------------------------------------------------------------- detection
def test_detect_returns_sorted_boxes_or_the_explicit_no_box_outcome() -> None:
    model, processor = tiny_grounding_dino()
    image, _ = _ellipse_image(0)
    result = GroundingDinoDetector(model, processor, box_threshold=0.0, top_k=3, classes=CAPTIONS).detect(
        image, "pituitary"
    )
    assert result.outcome == "box" and result.caption == "pituitary tumour ."
    scores = [d.score for d in result.detections]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert result.best is result.detections[0] and result.best.class_name == "pituitary"
    assert result.boxes.shape == (3, 4) and (result.boxes >= 0).all() and (result.boxes[:, 2:] <= 64).all()
    everything = GroundingDinoDetector(
        model, processor, box_threshold=0.0, top_k=10, classes=CAPTIONS, all_classes=True
    )
    assert {d.class_name for d in everything.detect(image, "glioma").detections} <= set(CAPTIONS)
    gated = GroundingDinoDetector(model, processor, min_score=1.0, box_threshold=0.0, classes=CAPTIONS)
    no_box = gated.detect(np.zeros((64, 64), np.uint8), "glioma")
    assert no_box.outcome == "no_box" and no_box.best is None
    with pytest.raises(ValueError, match="uint8"):
        gated.detect(np.zeros((64, 64), np.float32), "glioma")


# ---------------------------------------------------------------------------------------------------- training
def test_loss_falls_on_one_fixed_image() -> None:
    model, processor = tiny_grounding_dino()
    configure_logsam_loss(model.config)
    assert (model.config.class_cost, model.config.bbox_cost, model.config.giou_cost) == (2.0, 5.0, 1.0)
    torch.manual_seed(0)
    peft_model = apply_lora(model, rank=8, alpha=8)
    image, (x0, y0, x1, y1) = _ellipse_image(1)
    inputs = processor(
        images=np.repeat(image[:, :, None], 3, axis=2), text="meningioma . glioma .", return_tensors="pt"
    )
    labels = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[(x0 + x1) / 128, (y0 + y1) / 128, 0.3, 0.3]])}
    ]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    history = []
    for _ in range(20):
        losses = logsam_loss(peft_model(**inputs, labels=labels).loss_dict)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    total = [h["loss"] for h in history]
    assert all(np.isfinite(total))
    expected = sum(LOGSAM_LOSS_WEIGHTS[k] * history[0][k] for k in LOGSAM_LOSS_WEIGHTS)
    assert total[0] == pytest.approx(expected, rel=1e-5)
    assert np.mean(total[-5:]) < 0.5 * np.mean(total[:5])


def _trainer(dataset_dir: Path, output_dir: Path, **kwargs: Any) -> tuple[GroundingDinoTrainer, Any]:
    model, processor = tiny_grounding_dino()
    configure_logsam_loss(model.config)
    torch.manual_seed(0)
    peft_model = apply_lora(model, rank=4, alpha=4)
    train = BoxDataset(_entries(dataset_dir, "training"), processor, CAPTIONS, base_dir=dataset_dir)
    val = BoxDataset(_entries(dataset_dir, "validation"), processor, CAPTIONS, base_dir=dataset_dir, negative_rate=0)
    trainer = GroundingDinoTrainer(
        peft_model,
        optimizer=torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3),
        train_loader=DataLoader(train, batch_size=2, shuffle=True, collate_fn=collate_boxes),
        val_loader=DataLoader(val, batch_size=2, collate_fn=collate_boxes),
        output_dir=output_dir,
        max_epochs=2,
        progress=False,
        log_interval=1,
        **kwargs,
    )
    return trainer, processor


def _steps(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics" / "train_steps.jsonl").read_text().splitlines()]


def test_trainer_trains_resumes_exactly_and_keeps_only_the_adapter(dataset_dir: Path, tmp_path: Path) -> None:
    straight, processor = _trainer(dataset_dir, tmp_path / "straight")
    history = straight.run()
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_mean_iou"] <= 1 for h in history)
    assert {"train_loss_ce", "train_loss_bbox", "train_loss_giou", "val_recall_iou50"} <= set(history[-1])

    _trainer(dataset_dir, tmp_path / "split", epochs_per_run=1)[0].run()
    resumed, _ = _trainer(dataset_dir, tmp_path / "split")
    resumed.run()
    ours, theirs = adapter_state_dict(straight.model), adapter_state_dict(resumed.model)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert _steps(tmp_path / "straight") == _steps(tmp_path / "split")

    state = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    assert set(state["model"]) == set(ours) and all(is_adapter_key(key) for key in state["model"])
    assert (tmp_path / "straight" / "checkpoints" / "best.pt").is_file()

    folder = straight.export(tmp_path / "merged", processor)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
