"""Tests of the segmentation probe (`dae.evaluation.seg_probe`, heads in `dae.models.seg_heads`), end to end on
slices of the embedded chest CT."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dae.evaluation.features import DinoBackboneExtractor, FeatureExtractor
from dae.evaluation.seg_metrics import dice_iou, dice_iou_from_counts, overlap_counts
from dae.evaluation.seg_probe import first_samples, run_seg_probe, seg_probe_picture
from dae.models.backbone2d import build_backbone
from dae.models.seg_heads import LinearSegHead, UNetSegHead, build_seg_head

CT_DIR = Path(__file__).resolve().parents[1] / "data" / "ct" / "chest_ct"
LIVER, LUNGS = (5,), (10, 11, 12, 13, 14)  # TotalSegmentator v2 ids (structures.csv)


pytestmark = pytest.mark.usefixtures("one_thread")


def ct_slices_dataset(
    slices: range | list[int], size: int = 64, organs: tuple[tuple[int, ...], ...] = (LIVER, LUNGS)
) -> list[dict[str, torch.Tensor]]:
    """Axial slices of the embedded chest CT, HU windowed to [0, 1] and 3 channels, with organs mapped to 1..C.

    Args:
        slices: axial indices (the volume is 240 x 240 x 133 at 1.5 x 1.5 x 2.5 mm, LAS).
        size: output side; images are area-resized, labels nearest-resized.
        organs: TotalSegmentator ids of each class; class c + 1 is ``organs[c]``, the rest background.

    Returns:
        ``[{"image": [3, size, size] float, "label": [1, size, size] long}, ...]``.
    """
    ct = np.asarray(nib.load(CT_DIR / "cxr_ct_1.5mm_int16.nii.gz").dataobj)[..., list(slices)]
    mask = np.asarray(nib.load(CT_DIR / "mask_1.5mm.nii.gz").dataobj)[..., list(slices)]
    label = np.zeros(mask.shape, dtype=np.int64)
    for index, ids in enumerate(organs, start=1):
        label[np.isin(mask, ids)] = index
    image = torch.from_numpy(np.clip((ct.astype(np.float32) + 1000.0) / 1400.0, 0.0, 1.0)).permute(2, 0, 1)[:, None]
    image = F.interpolate(image, size=(size, size), mode="area").expand(-1, 3, -1, -1)
    label = F.interpolate(torch.from_numpy(label).permute(2, 0, 1)[:, None].float(), size=(size, size), mode="nearest")
    return [{"image": img.contiguous(), "label": lab.long()} for img, lab in zip(image, label)]


class PoolExtractor(FeatureExtractor):
    """Grid = 8x8 average pooling of the image and its square: learnable, instant features."""

    embed_dim, patch_size, n_blocks = 2, 8, 1

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = F.avg_pool2d(torch.cat([images[:, :1], images[:, :1] ** 2], dim=1), 8)
        return {"cls": grid.mean(dim=(2, 3)), "patch_grid": grid, "cls_blocks": grid.mean(dim=(2, 3))[:, None]}


class CountingLoader:
    """A loader that counts how often it is iterated."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], batch_size: int) -> None:
        self.loader = DataLoader(samples, batch_size=batch_size)
        self.batch_size = batch_size
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _squares(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Dark images with a bright, 8-pixel-aligned square labelled 1."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        image, label = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)
        top, left = (8 * torch.randint(0, 3, (2,), generator=generator)).tolist()
        image[:, top : top + 16, left : left + 16] = 1.0
        label[:, top : top + 16, left : left + 16] = 1
        samples.append({"image": image + 0.05 * torch.rand(1, 32, 32, generator=generator), "label": label})
    return samples


def streamed(batches: list[tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> dict[str, dict[str, float]]:
    """Dice and IoU from the overlap counts of several batches, as the probe's scoring accumulates them."""
    counts = [overlap_counts(pred, target, len(names)) for pred, target in batches]
    return dice_iou_from_counts(torch.cat([i for i, _ in counts]), torch.cat([t for _, t in counts]), names)


def test_heads_output_sizes_and_init() -> None:
    grid = torch.randn(2, 16, 8, 8)
    linear = LinearSegHead(16, 3)
    assert linear(grid, (64, 64)).shape == (2, 3, 64, 64)
    assert linear.conv.bias.eq(0).all() and 0.005 < float(linear.conv.weight.detach().std()) < 0.015
    unet = UNetSegHead(16, 3, num_up_blocks=3, hidden_dim=32)
    assert unet(grid, (64, 64)).shape == (2, 3, 64, 64)
    assert unet(torch.randn(1, 16, 4, 6), (56, 84)).shape == (1, 3, 56, 84)  # patch 14: x8 then resized
    with pytest.raises(ValueError, match="num_up_blocks"):
        UNetSegHead(16, 3, num_up_blocks=0)
    assert isinstance(build_seg_head("linear", 16, 3, patch_size=14), LinearSegHead)
    assert len(build_seg_head("unet", 16, 3, patch_size=8).blocks) == 3  # log2(8) x2 blocks
    assert len(build_seg_head("unet", 16, 3, patch_size=14).blocks) == 3  # int(log2(14))
    with pytest.raises(ValueError, match="decoder"):
        build_seg_head("fpn", 16, 3, patch_size=16)


def test_dice_iou_by_hand_and_like_metrics() -> None:
    # image 0: class 1 pred 2 px, label 2 px, overlap 1 -> Dice 0.5, IoU 1/3; class 2 absent in both -> skipped
    # image 1: class 1 absent in both -> skipped; class 2 pred 1 px, label 1 px, same -> Dice 1, IoU 1
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 2, 0]]])
    target = torch.tensor([[[0, 1, 1, 0]], [[0, 0, 2, 0]]])
    scores = streamed([(pred[:1], target[:1]), (pred[1:], target[1:])], ["bg", "a", "b"])
    assert scores["dice"] == pytest.approx({"macro": 0.75, "a": 0.5, "b": 1.0})
    assert scores["iou"] == pytest.approx({"macro": 2 / 3, "a": 1 / 3, "b": 1.0})

    generator = torch.Generator().manual_seed(0)
    pred, target = (
        torch.randint(0, 4, (6, 9, 7), generator=generator),
        torch.randint(0, 4, (6, 9, 7), generator=generator),
    )
    target[0] = 0
    ours, reference = streamed([(pred, target)], list("0123")), dice_iou(pred, target, 4, class_names=list("0123"))
    for metric in ("dice", "iou"):
        assert ours[metric] == pytest.approx(reference[metric])
    assert math.isnan(streamed([(torch.zeros(1, 4), torch.zeros(1, 4))], ["bg", "fg"])["dice"]["macro"])


def test_lr_selected_on_validation_only_and_test_used_once() -> None:
    train, val, test = (
        CountingLoader(_squares(12, 0), 4),
        CountingLoader(_squares(6, 1), 3),
        CountingLoader(_squares(6, 2), 3),
    )
    result = run_seg_probe(
        PoolExtractor(), train, val, test, num_classes=2, learning_rates=(0.0, 0.5), epochs=10, optimizer="adamw"
    )
    assert set(result.val_dice) == {0.0, 0.5}
    assert result.learning_rate == max(result.val_dice, key=result.val_dice.get) == 0.5
    assert (train.passes, val.passes, test.passes) == (1, 1, 1)  # cached once each; test scored once
    assert result.test["dice"]["class_1"] > 0.9
    assert set(result.test) == {"dice", "iou"} and set(result.test["dice"]) == {"macro", "class_1"}
    assert len(result.train_losses) == 10 and result.to_dict()["val_dice"].keys() == {"0", "0.5"}

    uncached = run_seg_probe(
        PoolExtractor(), train, val, test, 2, learning_rates=(0.5,), epochs=2, optimizer="adamw", cache_features=False
    )
    assert uncached.val_dice == {} and uncached.learning_rate == 0.5
    assert (train.passes, val.passes, test.passes) == (3, 3, 2)  # 2 epochs on train + val, then one test pass

    with pytest.raises(ValueError, match="decoder"):
        run_seg_probe(PoolExtractor(), train, val, test, 2, decoder="fpn")
    with pytest.raises(ValueError, match="amp"):
        run_seg_probe(PoolExtractor(), train, val, test, 2, amp="fp8")
    with pytest.raises(ValueError, match="labels must lie"):
        bad = [{"image": sample["image"], "label": 2 * sample["label"]} for sample in _squares(2, 3)]
        run_seg_probe(PoolExtractor(), DataLoader(bad, batch_size=2), val, test, 2, epochs=1)


def test_result_rows_and_picture() -> None:
    test = DataLoader(_squares(6, 2), batch_size=4)
    result = run_seg_probe(
        PoolExtractor(), DataLoader(_squares(8, 0), batch_size=4), DataLoader(_squares(4, 1), batch_size=4), test, 2,
        learning_rates=(0.0, 0.5), epochs=3, optimizer="adamw", class_names=["bg", "square"],
    )  # fmt: skip
    dice, iou = result.rows()
    assert dice == {
        "protocol": "seg_probe",
        "setting": "linear:lr=0.5",
        "metric": "dice",
        "value": result.test["dice"]["macro"],
        "per_class": {"square": result.test["dice"]["square"]},
        "val_dice": result.val_dice[0.5],
    }
    assert iou["metric"] == "iou" and iou["value"] == result.test["iou"]["macro"]
    images, labels = first_samples(test, 5, "image", "label", 2)
    assert images.shape == (5, 1, 32, 32) and labels.shape == (5, 1, 32, 32)
    picture = seg_probe_picture(PoolExtractor(), result, images[:2], labels[:2], ["bg", "square"])
    assert picture.shape == (3, 2 * 160 + 2, 2 * 160) and 0.0 <= float(picture.min()) <= float(picture.max()) <= 1.0


@pytest.mark.parametrize(
    ("patch_size", "decoder", "optimizer", "learning_rates", "epochs"),
    [(8, "linear", "sgd", (0.1, 1.0), 12), (16, "unet", "adamw", (1e-3,), 8)],
)
def test_seg_probe_on_ct_slices(
    patch_size: int, decoder: str, optimizer: str, learning_rates: tuple[float, ...], epochs: int
) -> None:
    data = ct_slices_dataset(range(30, 94, 4))  # 16 slices holding lungs, liver or both
    train, val, test = data[0::2], data[1::4], data[3::4]
    torch.manual_seed(0)
    extractor = DinoBackboneExtractor(build_backbone("vit_tiny", patch_size=patch_size, img_size=64), n_last_blocks=1)
    result = run_seg_probe(
        extractor,
        DataLoader(train, batch_size=4),
        DataLoader(val, batch_size=4),
        DataLoader(test, batch_size=4),
        num_classes=3,
        decoder=decoder,
        learning_rates=learning_rates,
        epochs=epochs,
        optimizer=optimizer,
        class_names=["background", "liver", "lungs"],
    )
    # random-init features: only a loose check that the probe learns something
    assert result.test["dice"]["lungs"] > 0.2
    for metric in ("dice", "iou"):
        assert set(result.test[metric]) == {"macro", "liver", "lungs"}
        assert all(0.0 <= value <= 1.0 for value in result.test[metric].values())
