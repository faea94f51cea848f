"""Tests of the batched crop augmentation and the uint8 -> float conversion of DINO crops (on the CPU)."""

from __future__ import annotations

import io

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dae.data.device_augment import (
    DRAWS_PER_CROP,
    CropAugment,
    _colour_jitter,
    _gaussian_blur,
    _parameters,
    _sharpness,
    augment_batch,
    augment_crops,
)


def _crops(batch: int = 4, locals_: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [32, 32] + [16] * locals_
    return [torch.randint(0, 256, (batch, 1, s, s), dtype=torch.uint8, generator=g) for s in sizes]


def _draws(batch: int, **columns: float) -> torch.Tensor:
    """Uniform draws with chosen columns fixed (jitter 0, brightness 1, contrast 2, order 3, blur 4, sigma 5,
    solarise 6, sharpness 7)."""
    names = ("jitter", "brightness", "contrast", "order", "blur", "sigma", "solarize", "sharpness")
    draws = torch.rand(batch, DRAWS_PER_CROP, generator=torch.Generator().manual_seed(1))
    for name, value in columns.items():
        draws[:, names.index(name)] = value
    return draws


def test_conversion_only_channels_and_normalisation() -> None:
    crops = _crops()
    plain = CropAugment(augment=False, out_channels=3)(crops)
    assert [tuple(x.shape) for x in plain] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    for x, c in zip(plain, crops):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, (c.float() / 255).repeat(1, 3, 1, 1), atol=0, rtol=0)
    grey = CropAugment(augment=False, out_channels=1)(crops)
    assert all(x.shape[1] == 1 and torch.equal(x, c.float() / 255) for x, c in zip(grey, crops))
    normed = CropAugment(augment=False, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.1])(crops)
    for x, c in zip(normed, crops):
        for k, (m, s) in enumerate([(0.5, 0.25), (0.4, 0.2), (0.3, 0.1)]):
            torch.testing.assert_close(x[:, k : k + 1], (c.float() / 255 - m) / s)
    one = CropAugment(augment=False, out_channels=1, mean=0.5, std=0.5)(crops)
    torch.testing.assert_close(one[0], crops[0].float() / 255 * 2 - 1)


def test_errors_and_repr() -> None:
    with pytest.raises(TypeError, match="uint8"):
        CropAugment()([torch.rand(2, 1, 8, 8)])
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        CropAugment()([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="both mean and std"):
        CropAugment(mean=0.5)
    with pytest.raises(ValueError, match="1 or 3 values"):
        CropAugment(mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(ValueError, match="version"):
        CropAugment("v3")
    with pytest.raises(ValueError, match="out_channels"):
        CropAugment(out_channels=2)
    with pytest.raises(ValueError, match="draws"):
        augment_batch(torch.rand(2, 1, 8, 8), 0, "v1", torch.rand(3, DRAWS_PER_CROP))
    assert repr(CropAugment("v2", seed=3)) == (
        "CropAugment(version='v2', augment=True, out_channels=3, mean=None, std=None, seed=3)"
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_augment_shapes_range_and_per_sample_independence(version: str) -> None:
    same = [torch.full((16, 1, s, s), 150, dtype=torch.uint8) for s in (32, 32, 16)]
    out = CropAugment(version, out_channels=1, seed=0)(same)
    assert [tuple(x.shape) for x in out] == [(16, 1, 32, 32)] * 2 + [(16, 1, 16, 16)]
    assert all(x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 for x in out)
    means = out[0].mean(dim=(1, 2, 3))
    assert len(set(means.tolist())) > 8  # the same input, different brightness per sample


def test_steps_match_torchvision_float_ops() -> None:
    x = torch.rand(3, 1, 40, 33, generator=torch.Generator().manual_seed(0))
    sigma, apply = torch.tensor([0.3, 1.0, 2.0]), torch.tensor([True, True, False])
    blurred = _gaussian_blur(x, sigma, apply)
    for i in range(3):
        expected = TF.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2) if apply[i] else x[i]
        torch.testing.assert_close(blurred[i], expected, atol=1e-5, rtol=0)
    factor = torch.tensor([0.8, 1.0, 1.2])
    sharp = _sharpness(x, factor)
    for i in range(3):
        torch.testing.assert_close(sharp[i], TF.adjust_sharpness(x[i], float(factor[i])), atol=1e-6, rtol=0)
    b, c, first = torch.tensor([0.7, 1.3, 1.1]), torch.tensor([1.2, 0.6, 0.9]), torch.tensor([True, False, True])
    jittered = _colour_jitter(x, b, c, first, {True, False})
    for i in range(3):
        bi, ci = float(b[i]), float(c[i])
        if first[i]:
            expected = TF.adjust_contrast(TF.adjust_brightness(x[i], bi), ci)
        else:
            expected = TF.adjust_brightness(TF.adjust_contrast(x[i], ci), bi)
        torch.testing.assert_close(jittered[i], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(_colour_jitter(x, b, c, first, {True})[0], jittered[0])


def test_parameter_frequencies_per_crop_position() -> None:
    n = 20000
    draws = torch.rand(n, DRAWS_PER_CROP, generator=torch.Generator().manual_seed(0))
    for position, blur_p in [(0, 1.0), (1, 0.1), (2, 0.5), (7, 0.5)]:
        p = _parameters(draws, torch.full((n,), position), "v1")
        assert abs(p[:, 0].mean() - 0.8) < 0.02 and abs(p[:, 4].mean() - blur_p) < 0.02
        assert abs(p[:, 6].mean() - (0.2 if position == 1 else 0.0)) < 0.02  # solarise: global 2 only
        jittered = p[:, 0] > 0
        assert p[jittered, 1].min() >= 0.6 and p[jittered, 1].max() <= 1.4 and torch.all(p[~jittered, 1:3] == 1)
        assert abs(p[jittered, 3].mean() - 0.5) < 0.02 and p[:, 5].min() >= 0.1 and p[:, 5].max() <= 2.0
    v2 = _parameters(draws, torch.full((n,), 0), "v2")
    assert torch.all(v2[:, 4] == 0) and v2[:, 7].min() >= 0.8 and v2[:, 7].max() <= 1.2


def test_solarise_and_blur_apply_only_where_drawn() -> None:
    x = torch.rand(6, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    no_jitter_solarise = _draws(6, jitter=0.99, blur=0.99, solarize=0.0)  # global 1 is always blurred
    for position in range(1, 4):
        out = augment_batch(x, position, "v1", no_jitter_solarise)
        expected = torch.where(x >= 0.5, 1 - x, x) if position == 1 else x
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    draws = _draws(6, jitter=0.99)
    draws[:, 4] = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])  # p 0.5 at a local position: samples 0, 2, 4
    blurred = augment_batch(x, 2, "v1", draws)
    changed = (blurred - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert changed.tolist() == [True, False, True, False, True, False]
    mixed = augment_batch(x, torch.tensor([0, 1, 2, 3, 4, 5]), "v1", _draws(6, jitter=0.99, blur=0.3, solarize=0.0))
    torch.testing.assert_close(mixed[1], torch.where(x[1] >= 0.5, 1 - x[1], x[1]))  # global 2: solarised, no blur
    assert (mixed[0] - x[0]).abs().max() > 1e-3 and (mixed[2] - x[2]).abs().max() > 1e-3  # blurred


def test_state_dict_round_trip_reproduces_the_stream() -> None:
    crops = _crops(batch=8)
    augment = CropAugment("v1", seed=7)
    augment(crops)
    buffer = io.BytesIO()
    torch.save(augment.state_dict(), buffer)
    expected = augment(crops)
    other = CropAugment("v1", seed=7)  # a resumed run: the same seed, the checkpointed call count
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(other(crops), expected))
    # Another seed (another rank) keeps its own stream after the same resume.
    rank_1 = CropAugment("v1", seed=8)
    rank_1.load_state_dict(augment.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(rank_1(crops), expected))
    fresh = CropAugment("v1", seed=7)
    first = fresh(crops)
    assert not all(torch.equal(a, b) for a, b in zip(first, expected))  # the stream moved on
    assert all(torch.equal(a, b) for a, b in zip(CropAugment("v1", seed=7)(crops), first))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_crops_of_one_size_as_one_batch_equal_crop_by_crop(version: str) -> None:
    crops = [c.float() / 255 for c in _crops(batch=5, locals_=3)]
    grouped = augment_crops(crops, version, torch.Generator().manual_seed(4))
    draws = torch.rand((len(crops), 5, DRAWS_PER_CROP), generator=torch.Generator().manual_seed(4))
    for index, (x, out) in enumerate(zip(crops, grouped)):
        torch.testing.assert_close(out, augment_batch(x, index, version, draws[index]), atol=1e-6, rtol=0)
