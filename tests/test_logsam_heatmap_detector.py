"""The text-conditioned heatmap detector: shapes, targets, box decoding and training on synthetic embeddings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dae.logsam.detector_training import EmbeddedSliceDataset, HeatmapDetectorTrainer, detection_picture
from dae.logsam.heatmap_detector import (
    TextConditionedHeatmapDetector,
    box_iou_pairs,
    decode_boxes,
    heatmap_detection_loss,
    heatmap_targets,
    mask_to_heatmap,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")


def test_default_size_shapes_and_prompt_batching() -> None:
    default = TextConditionedHeatmapDetector()
    assert 100_000 <= sum(p.numel() for p in default.parameters()) <= 300_000
    torch.manual_seed(0)
    net = TextConditionedHeatmapDetector(image_channels=8, text_dim=6, hidden=16).eval()
    with torch.no_grad():
        net.film.weight.normal_()  # leave FiLM's identity start, so that the prompts change the features
    features, prompts = torch.randn(2, 8, 10, 12), torch.randn(3, 6)
    all_prompts = net(features, prompts.expand(2, -1, -1))
    assert all_prompts.shape == (2, 3, 10, 12)
    for k in range(3):
        one = net(features, prompts[k].expand(2, -1))
        assert one.shape == (2, 1, 10, 12)
        torch.testing.assert_close(one[:, 0], all_prompts[:, k], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(all_prompts[:, 0], all_prompts[:, 1])
    with pytest.raises(ValueError, match=r"text must be \(B, D\) or \(B, K, D\) with B = 2"):
        net(features, prompts)
    noisy = TextConditionedHeatmapDetector(image_channels=8, text_dim=6, hidden=16, dropout=0.5)
    text = prompts[:1].expand(2, -1)
    assert not torch.allclose(noisy(features, text), noisy(features, text))
    noisy.eval()
    torch.testing.assert_close(noisy(features, text), noisy(features, text))
    with pytest.raises(ValueError, match="multiple of 8"):
        TextConditionedHeatmapDetector(hidden=12)


def test_targets_put_the_tumour_share_in_the_true_prompt_slot() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4, :4] = 255
    masks[1, 0, 4:6, 4:8] = 1
    shares = mask_to_heatmap(masks, (2, 2))
    torch.testing.assert_close(shares[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(shares[1, 0], torch.tensor([[0.0, 0.0], [0.0, 0.5]]))
    targets = heatmap_targets(shares, torch.tensor([2, 0]), 3)
    assert targets.shape == (2, 3, 2, 2)
    assert targets[0, 2].sum() == 1 and targets[0, :2].sum() == 0
    assert targets[1, 0].sum() == 0.5 and targets[1, 1:].sum() == 0
    # keep_aspect: a 4x8 image fills the top half of the square frame, padded at the bottom.
    wide = torch.ones(1, 1, 4, 8)
    torch.testing.assert_close(mask_to_heatmap(wide, (2, 2))[0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(mask_to_heatmap(wide, (2, 2), keep_aspect=False)[0, 0], torch.ones(2, 2))


def test_loss_is_low_for_the_target_and_dice_ignores_empty_maps() -> None:
    targets = torch.zeros(1, 2, 16, 16)
    targets[0, 0, 4:8, 4:8] = 1
    good = heatmap_detection_loss(targets * 20 - 10, targets)
    bad = heatmap_detection_loss(10 - targets * 20, targets)
    assert good["loss"] < 0.01 < 1.0 < bad["loss"]
    assert good["dice"] < 0.01 and bad["dice"] > 0.9
    assert heatmap_detection_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))["dice"] == 0
    # The classification term punishes one bright cell in the wrong-class map as much as a tie of the two classes,
    # which the cell-wise terms barely notice; it is 0 without a tumour.
    stray = targets * 20 - 10
    stray[0, 1, 0, 0] = 10.0
    plain = heatmap_detection_loss(stray, targets)["loss"] - good["loss"]
    peaked = heatmap_detection_loss(stray, targets, peak_weight=1.0)
    assert plain < 0.1
    torch.testing.assert_close(peaked["peak"], torch.tensor(math.log(2.0)), atol=1e-4, rtol=0)
    assert heatmap_detection_loss(targets * 20 - 10, targets, peak_weight=1.0)["peak"] < 1e-4
    assert heatmap_detection_loss(stray, torch.zeros_like(targets), peak_weight=1.0)["peak"] == 0


def test_decode_boxes_on_a_hand_made_map() -> None:
    probs = torch.zeros(3, 1, 16, 16)
    probs[0, 0, 4:9, 2:7] = 0.9  # the larger region: cells y 4..8, x 2..6
    probs[0, 0, 12:14, 12:14] = 0.95  # a smaller, brighter one
    probs[1, 0] = 0.3  # nothing above the threshold
    probs[2, 0, 0:2, 0:16] = 1.0
    boxes, scores = decode_boxes(probs, (64, 64), threshold=0.5)
    # Bilinear resampling x4 puts the 0.5 level half-way between cells: edges at 4 x the cell edges.
    torch.testing.assert_close(boxes[0], torch.tensor([8.0, 16.0, 28.0, 36.0]))
    assert torch.isnan(boxes[1]).all()
    torch.testing.assert_close(scores, torch.tensor([0.95, 0.3, 1.0]))
    # A 32x64 image fills the top half of the square frame (keep_aspect) or is stretched into it.
    # Relative to each map's peak: a faint map still gives the box of its brightest region.
    faint = torch.zeros(1, 16, 16)
    faint[0, 2:4, 2:4] = 0.2
    assert torch.isnan(decode_boxes(faint, (64, 64), threshold=0.5)[0]).all()
    relative, _ = decode_boxes(faint, (64, 64), threshold=0.5, relative=True)
    torch.testing.assert_close(relative[0], torch.tensor([8.0, 8.0, 16.0, 16.0]))
    assert torch.isnan(decode_boxes(torch.zeros(1, 16, 16), (64, 64), threshold=0.5, relative=True)[0]).all()
    kept, _ = decode_boxes(probs[2:], (32, 64), threshold=0.5)
    stretched, _ = decode_boxes(probs[2:], (32, 64), threshold=0.5, keep_aspect=False)
    torch.testing.assert_close(kept[0], torch.tensor([0.0, 0.0, 64.0, 8.0]))
    torch.testing.assert_close(stretched[0], torch.tensor([0.0, 0.0, 64.0, 4.0]))


def test_box_iou_pairs() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0], [NAN] * 4])
    other = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(box_iou_pairs(boxes, other), torch.tensor([1.0, 1.0 / 3.0, 0.0, 0.0]))


def test_detection_picture_draws_the_boxes() -> None:
    image = np.full((32, 32), 128, dtype=np.uint8)
    picture = detection_picture(image, torch.zeros(8, 8), torch.tensor([2.0, 3.0, 10.0, 12.0]), torch.full((4,), NAN))
    assert picture.shape == (3, 32, 32) and picture.min() >= 0 and picture.max() <= 1
    torch.testing.assert_close(picture[:, 3, 5], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(picture[:, 11, 9], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(picture[:, 20, 20], torch.full((3,), 128 / 255))


IMAGE = 32
GRID = 8
CHANNELS = 6
CLASSES = 3


def _synthetic_slices(folder: Path, count: int, seed: int) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Slices with one rectangular tumour each; the embedding is noise plus the tumour's cells lit in the channel
    of its class (channels 0..2) and in a shared "tumour" channel (3)."""
    rng = np.random.default_rng(seed)
    entries, features = [], []
    for i in range(count):
        cls = i % CLASSES
        h, w = rng.integers(6, 14, size=2)
        y, x = rng.integers(0, IMAGE - h), rng.integers(0, IMAGE - w)
        mask = np.zeros((IMAGE, IMAGE), dtype=np.uint8)
        mask[y : y + h, x : x + w] = 255
        name = f"{seed}_{i}"
        Image.fromarray(mask // 2 + 60).save(folder / f"{name}.png")
        Image.fromarray(mask).save(folder / f"{name}_mask.png")
        share = mask_to_heatmap(torch.from_numpy(mask)[None, None], (GRID, GRID))[0, 0]
        feature = 0.3 * torch.from_numpy(rng.standard_normal((CHANNELS, GRID, GRID))).float()
        feature[cls] += 2.0 * share
        feature[3] += 2.0 * share
        features.append(feature)
        entries.append(
            {
                "image": str(folder / f"{name}.png"),
                "mask": str(folder / f"{name}_mask.png"),
                "class": ("glioma", "meningioma", "pituitary")[cls],
                "box": [float(x), float(y), float(x + w), float(y + h)],
            }
        )
    return entries, features


def test_detector_learns_synthetic_tumours_and_their_class(tmp_path: Path) -> None:
    names = ("glioma", "meningioma", "pituitary")
    train = EmbeddedSliceDataset(*_synthetic_slices(tmp_path, 48, seed=1), names)
    val = EmbeddedSliceDataset(*_synthetic_slices(tmp_path, 12, seed=2), names)
    assert train[0]["target"].shape == (1, GRID, GRID) and train[1]["class_index"] == 1
    torch.manual_seed(0)
    prompts = torch.nn.functional.normalize(torch.randn(CLASSES, 10), dim=-1)
    net = TextConditionedHeatmapDetector(image_channels=CHANNELS, text_dim=10, hidden=16, prior=0.1)
    trainer = HeatmapDetectorTrainer(
        net,
        prompts,
        dice_weight=1.0,
        peak_weight=0.5,
        threshold=0.5,
        flip_probability=0.5,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2),
        train_loader=DataLoader(train, batch_size=8, shuffle=True),
        val_loader=DataLoader(val, batch_size=6),
        output_dir=tmp_path / "run",
        max_epochs=20,
        val_interval=20,
        progress=False,
        validate_at_start=True,
        num_pictures=2,
    )
    history = trainer.run()
    start, end = history[0], history[-1]
    assert start["val_box_iou"] < 0.3, start
    assert end["val_box_iou"] > 0.55 and end["val_class_accuracy"] == 1.0, end
    assert end["val_recall_at_50"] > 0.7 and end["val_box_found"] == 1.0, end
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    trainer.threshold, trainer.relative_threshold = 0.5, True
    relative = trainer.validate()[0]
    assert relative["box_found"] == 1.0 and relative["box_iou"] > 0.5, relative

    # A wrong-class prompt scores lower than the true class's prompt on every validation slice.
    net.eval()
    batch = next(iter(DataLoader(val, batch_size=len(val))))
    with torch.no_grad():
        probs = torch.sigmoid(net(batch["features"], prompts.expand(len(val), -1, -1)))
    peaks = probs.flatten(2).amax(-1)
    true = peaks[torch.arange(len(val)), batch["class_index"]]
    wrong = peaks.masked_fill(torch.nn.functional.one_hot(batch["class_index"], CLASSES).bool(), -math.inf)
    assert (true > wrong.amax(1)).all()
