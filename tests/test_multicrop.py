"""Tests of the DINO X-ray data path on the CPU: the cached uint8 working image, DAX v2's variants, the multi-crop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.data import DataLoader as MonaiDataLoader
from monai.transforms import Compose
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dae.data import LoadXRayd, dax_preprocess
from dae.data.multicrop import DINOMultiCrop, MultiCropd, _rotated_region, _square_box, multicrop_working_size
from dae.data.xray_uint8 import RandXRayVariantd, XRayToUint8d, reduce_to_uint8

REPO = Path(__file__).resolve().parents[1]
JPEGS = [
    REPO / "data" / "xray" / "kermany" / "NORMAL" / "IM-0642-0001.jpeg",
    REPO / "data" / "xray" / "kermany" / "PNEUMONIA" / "person275_bacteria_1293.jpeg",
]


def _raw_xray(height: int = 64, width: int = 80) -> np.ndarray:
    """A heavy-tailed "detector" image: tissue 20-200, 10 % direct exposure at 1000, so the contrast factor matters."""
    rng = np.random.default_rng(0)
    image = rng.uniform(20, 200, (height, width)).astype(np.float32)
    image[rng.random((height, width)) < 0.1] = 1000.0
    return image


# ----------------------------------------------------------------------------------------------- working size


def test_working_size_formula_and_no_upsampled_crop() -> None:
    assert multicrop_working_size(224, 96, (0.14, 1.0), (0.05, 0.14)) == 599  # 224 / sqrt(0.14) = 598.7
    assert multicrop_working_size(224, 96, (0.4, 1.0), (0.05, 0.4)) == 430  # 96 / sqrt(0.05) = 429.3
    assert multicrop_working_size(64, 32, (0.25, 1.0), (0.05, 0.25)) == 144
    assert multicrop_working_size(100, 10, (0.25, 1.0), (0.5, 1.0)) == 200  # exact: not rounded up to 201
    assert DINOMultiCrop("v2", 224, 96, (0.14, 1.0), (0.05, 0.14), 6).working_size == 599
    with pytest.raises(ValueError, match="local_scale"):
        multicrop_working_size(224, 96, (0.4, 1.0), (0.0, 0.4))
    # At the working size the smallest boxes are at least the crop size (non-square images too, sides rounded up).
    torch.manual_seed(0)
    for shape in [(2500, 2048), (1800, 2400)]:
        reduced = reduce_to_uint8(torch.zeros(1, *shape), 599)
        height, width = reduced.shape[-2:]
        assert math.sqrt(height * width) >= 599 and abs(height / width - shape[0] / shape[1]) < 0.01
        sides = [_square_box(height, width, (0.14, 1.0))[2] for _ in range(300)]
        assert min(sides) >= 224
        sides = [_square_box(height, width, (0.05, 0.14))[2] for _ in range(300)]
        assert min(sides) >= 96


def test_reduce_never_upsamples_and_quantises() -> None:
    small = torch.linspace(0, 1, 30 * 40).reshape(1, 30, 40)
    out = reduce_to_uint8(small, 599)
    assert out.shape == (1, 30, 40) and out.dtype == torch.uint8
    torch.testing.assert_close(out, (small * 255).round().to(torch.uint8))
    assert reduce_to_uint8(small, None).shape == (1, 30, 40)
    big = reduce_to_uint8(torch.rand(2, 300, 200), 100)
    assert big.shape == (2, 123, 82) and big.dtype == torch.uint8  # 300 x 200 * 100 / sqrt(60000), rounded up


# ----------------------------------------------------------------------------------------------- cached stage


def test_xray_to_uint8_keeps_dax_and_minmax_semantics() -> None:
    raw = _raw_xray()
    tensor = torch.from_numpy(raw)[None]
    out = XRayToUint8d("image", "dax")({"image": tensor, "label": 1})
    assert set(out) == {"image", "label"} and type(out["image"]) is torch.Tensor
    expected = torch.from_numpy(dax_preprocess(raw) * 255).round().to(torch.uint8)
    torch.testing.assert_close(out["image"][0], expected, atol=1, rtol=0)
    loaded = LoadXRayd("image")({"image": str(JPEGS[0])})["image"]
    minmax = XRayToUint8d("image", "minmax", size=100)({"image": loaded})["image"]
    assert minmax.shape == (1, 100, 100) and minmax.dtype == torch.uint8
    assert minmax.min() == 0 and minmax.max() >= 250
    with pytest.raises(ValueError, match="no options"):
        XRayToUint8d("image", "minmax", contrast_factor=2.0)
    with pytest.raises(ValueError, match="size"):
        XRayToUint8d("image", "dax", size=0)


@pytest.mark.parametrize("dead_pixel", [False, True])
def test_dax_v2_variants_match_dax_preprocess_at_every_contrast(dead_pixel: bool) -> None:
    raw = _raw_xray()
    if dead_pixel:  # a zero in the ROI: its negative log stays at -log(eps) whatever the contrast factor
        raw[30, 30] = 0.0
    out = XRayToUint8d("image", "dax_v2")({"image": torch.from_numpy(raw)[None]})
    image, variants = out["image"], out["image_variants"]
    assert image.shape == (2, 64, 80) and image.dtype == torch.uint8
    assert variants.prob == 0.5 and variants.contrast_range == (2.0, 3.5) and variants.window is not None
    torch.testing.assert_close(
        image[1], torch.from_numpy(dax_preprocess(raw, neglog=False) * 255).round().to(torch.uint8), atol=1, rtol=0
    )
    for contrast in (2.0, 2.6, 3.5):
        mapped = variants.lut(contrast).take(image[0].long()).float() / 255
        expected = torch.from_numpy(dax_preprocess(raw, contrast_factor=contrast))
        assert (mapped - expected).abs().max() <= 1.5 / 255, contrast
    # the contrast factor matters on this image, so the map is not the identity
    assert np.abs(dax_preprocess(raw, contrast_factor=2.0) - dax_preprocess(raw, contrast_factor=3.5)).max() > 5 / 255
    with pytest.raises(ValueError, match=r"contrast 4\.0"):
        variants.lut(4.0)
    # With the low-pass subtraction the contrast is fixed at the midpoint of the range.
    lowpass = XRayToUint8d("image", "dax_v2", subtract_lowpass=True, lowpass_sigma=3.0)({"image": raw[None]})
    assert lowpass["image_variants"].window is None
    expected = dax_preprocess(raw, contrast_factor=2.75, subtract_lowpass=True, lowpass_sigma=3.0)
    assert (lowpass["image"][0].float() / 255 - torch.from_numpy(expected)).abs().max() <= 0.5 / 255 + 1e-6


def test_rand_variant_picks_both_with_the_dax_probability_and_is_seeded() -> None:
    cached = XRayToUint8d("image", "dax_v2", prob=0.3)({"image": torch.from_numpy(_raw_xray())[None]})
    pick = RandXRayVariantd("image")
    torch.manual_seed(5)
    draws = [pick(cached) for _ in range(400)]
    assert all(set(d) == {"image"} and d["image"].shape == (1, 64, 80) for d in draws)
    raw = sum(torch.equal(d["image"][0], cached["image"][1]) for d in draws)
    assert 0.6 < raw / 400 < 0.8  # 1 - prob
    contrasts = {d["image"].float().mean().item() for d in draws if not torch.equal(d["image"][0], cached["image"][1])}
    assert len(contrasts) > 20  # a contrast factor per draw
    torch.manual_seed(5)
    assert all(torch.equal(pick(cached)["image"], d["image"]) for d in draws[:10])
    single = XRayToUint8d("image", "dax")({"image": torch.from_numpy(_raw_xray())[None]})
    assert pick(single)["image"] is single["image"]


# ----------------------------------------------------------------------------------------------- multi-crop


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("photometric", [True, False])
def test_multicrop_shapes_dtype_and_seeding(version: str, photometric: bool) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 150, 120), dtype=torch.uint8)
    multicrop = DINOMultiCrop(version, 48, 24, local_crops_number=3, photometric=photometric)
    crops = multicrop(image)
    assert [tuple(c.shape) for c in crops] == [(1, 48, 48)] * 2 + [(1, 24, 24)] * 3
    assert all(c.dtype == torch.uint8 and type(c) is torch.Tensor for c in crops)
    torch.manual_seed(0)
    torch.randint(0, 256, (1, 150, 120), dtype=torch.uint8)
    assert all(torch.equal(a, b) for a, b in zip(crops, multicrop(image)))
    assert len(DINOMultiCrop(version, 32, 16, local_crops_number=0)(image)) == 2


def test_multicrop_photometric_switch_and_errors() -> None:
    flat = torch.full((1, 100, 100), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    geometric = DINOMultiCrop("v1", 32, 16, local_crops_number=4, photometric=False)
    assert all(torch.all(c == 100) for _ in range(5) for c in geometric(flat))  # crops and flips only
    augmented = DINOMultiCrop("v1", 32, 16, local_crops_number=4)
    assert any(not torch.all(c == 100) for _ in range(5) for c in augmented(flat))  # brightness jitter
    with pytest.raises(TypeError, match="uint8"):
        augmented(torch.rand(1, 50, 50))
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        augmented(torch.zeros(2, 50, 50, dtype=torch.uint8))
    with pytest.raises(ValueError, match="version"):
        DINOMultiCrop("v3")
    assert "photometric=True" in repr(augmented)


def test_rotated_region_is_a_crop_of_torchvision_rotate() -> None:
    torch.manual_seed(0)
    source = torch.rand(1, 40, 56) * 255
    for angle in (90.0, 33.0, -150.0):
        expected = TF.rotate(source, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)[:, 3:37, 5:39]
        ours = _rotated_region(source, 3, 5, 34, angle)
        # torchvision weights the zero fill once more at the image's edge; inside they agree
        mask = TF.rotate(torch.ones_like(source), angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
        inside = mask[:, 3:37, 5:39] > 1 - 1e-6
        torch.testing.assert_close(ours[inside], expected[inside], atol=1e-3, rtol=0)


@pytest.mark.parametrize("loader_class", [DataLoader, MonaiDataLoader])
def test_data_path_batches_through_a_cache_dataset(loader_class: type) -> None:
    multicrop = DINOMultiCrop("v2", 32, 16, (0.25, 1.0), (0.05, 0.25), local_crops_number=2)
    cached = [LoadXRayd("image"), XRayToUint8d("image", "dax_v2", size=multicrop.working_size)]
    random = [RandXRayVariantd("image"), MultiCropd("image", multicrop, drop_image=True)]
    data = [{"image": str(p), "label": i} for i, p in enumerate(JPEGS)] * 2
    dataset = CacheDataset(data, Compose(cached + random), progress=False)
    assert dataset._cache[0]["image"].shape == (2, 72, 72)  # 224 px reduced to the working size, 2 variants
    batches = list(loader_class(dataset, batch_size=2, num_workers=0))
    assert len(batches) == 2 and torch.equal(torch.as_tensor(batches[0]["label"]), torch.tensor([0, 1]))
    crops = batches[0]["crops"]
    assert set(batches[0]) == {"crops", "label"}
    assert [(tuple(c.shape), c.dtype) for c in crops] == [((2, 1, 32, 32), torch.uint8)] * 2 + [
        ((2, 1, 16, 16), torch.uint8)
    ] * 2
    kept = MultiCropd("image", multicrop)({"image": torch.zeros(1, 40, 40, dtype=torch.uint8)})
    assert set(kept) == {"image", "crops"}
    with pytest.raises(ValueError, match="one key"):
        MultiCropd(["image", "other"])
