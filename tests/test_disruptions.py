"""Tests of the DAE disruptions: batch functions, BatchDisruption and the MONAI transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dae.disruptions import (
    BatchDisruption,
    RandAdditiveNoise,
    RandAdditiveNoised,
    RandDisruption,
    RandDisruptiond,
    RandDownUpSample,
    RandDownUpSampled,
    RandLocalMask,
    RandLocalMaskd,
    add_gaussian_noise,
    down_up_sample,
    embedding_channel_mask,
    expand_cell_mask,
    local_mask,
    local_mask_grid,
    mask_grid_shape,
    parse_choice,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(shape: tuple[int, ...] = (2, 1, 32, 32, 32), seed: int = 0) -> torch.Tensor:
    # values in [0.5, 1.5] so no voxel equals the mask fill value 0
    return torch.rand(shape, generator=_gen(seed)) + 0.5


def _masked_cells(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-sample count of masked cells of a (B, 1, *spatial) voxel mask, checking cells are all-or-nothing."""
    spatial = mask.shape[2:]
    grid = mask_grid_shape(spatial, patch)
    counts = torch.zeros(mask.shape[0], dtype=torch.long)
    for cell in np.ndindex(*grid):
        block = mask[(slice(None), 0, *(slice(i * patch, (i + 1) * patch) for i in cell))]
        flat = block.reshape(mask.shape[0], -1)
        assert torch.equal(flat.all(dim=1), flat.any(dim=1)), "a cell is partially masked"
        counts += flat.all(dim=1).long()
    return counts


# ---------------------------------------------------------------- functional


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: add_gaussian_noise(x, 0.1, _gen(1)),
        lambda x: down_up_sample(x, 4, "nearest"),
        lambda x: down_up_sample(x, 4, "trilinear"),
        lambda x: local_mask(x, 0.6, 8, generator=_gen(1)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_kept_and_input_untouched(fn, dtype):
    x = _batch().to(dtype)
    before = x.clone()
    out = fn(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(x, before)
    assert not torch.equal(out, x)


def test_noise_std_matches_variance():
    x = torch.zeros(4, 1, 64, 64, 64)
    out = add_gaussian_noise(x, variance=0.1, generator=_gen(0))
    assert out.std().item() == pytest.approx(math.sqrt(0.1), rel=0.01)
    assert out.mean().item() == pytest.approx(0.0, abs=0.005)


def test_noise_zero_variance_is_identity():
    x = _batch()
    out = add_gaussian_noise(x, variance=0.0, generator=_gen(0))
    assert torch.equal(out, x) and out is not x


def test_noise_seeds():
    x = _batch()
    assert torch.equal(add_gaussian_noise(x, generator=_gen(3)), add_gaussian_noise(x, generator=_gen(3)))
    assert not torch.equal(add_gaussian_noise(x, generator=_gen(3)), add_gaussian_noise(x, generator=_gen(4)))


def test_down_up_nearest_exact_on_blocks():
    low = torch.rand(2, 1, 8, 8, 8, generator=_gen(0))
    blocky = low.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    assert torch.equal(down_up_sample(blocky, 4, "nearest"), blocky)
    # a random (not block-constant) image is not preserved
    x = _batch()
    assert not torch.allclose(down_up_sample(x, 4, "nearest"), x)


def test_down_up_nearest_picks_block_corner():
    x = _batch((1, 1, 8, 8, 8))
    out = down_up_sample(x, 2, "nearest")
    assert torch.equal(out[..., 1::2, 1::2, 1::2], x[..., ::2, ::2, ::2])


@pytest.mark.parametrize("mode", ["nearest", "trilinear", "linear"])
def test_down_up_factor_one_is_identity(mode):
    x = _batch()
    assert torch.allclose(down_up_sample(x, 1.0, mode), x, atol=1e-6)


def test_trilinear_differs_from_nearest_and_is_smoother():
    x = _batch()
    near = down_up_sample(x, 4, "nearest")
    tri = down_up_sample(x, 4, "trilinear")
    assert not torch.allclose(near, tri)
    assert torch.equal(tri, down_up_sample(x, 4, "linear"))
    assert tri.diff(dim=-1).abs().mean() < near.diff(dim=-1).abs().mean()


def test_down_up_small_and_odd_sizes():
    x = _batch((1, 2, 3, 10, 17))
    for mode in ("nearest", "trilinear"):
        assert down_up_sample(x, 4, mode).shape == x.shape


def test_down_up_2d():
    x = _batch((2, 3, 32, 32))
    for mode in ("nearest", "bilinear", "linear", "trilinear"):
        assert down_up_sample(x, 4, mode).shape == x.shape
    assert torch.equal(down_up_sample(x, 4, "bilinear"), down_up_sample(x, 4, "linear"))


@pytest.mark.parametrize(
    ("shape", "patch", "ratio"),
    [
        ((3, 2, 32, 32, 32), 8, 0.6),
        ((2, 1, 20, 12, 33), 8, 0.5),
        ((2, 1, 32, 32, 32), 16, 0.3),
        ((2, 3, 30, 18), 4, 0.75),
    ],
)
def test_local_mask_counts_and_values(shape, patch, ratio):
    x = _batch(shape)
    mask = local_mask_grid(x, ratio, patch, _gen(5))
    assert mask.shape == (shape[0], 1, *shape[2:]) and mask.dtype == torch.bool
    n_cells = math.prod(math.ceil(s / patch) for s in shape[2:])
    assert _masked_cells(mask, patch).tolist() == [round(ratio * n_cells)] * shape[0]

    out = local_mask(x, ratio, patch, fill_value=-1.0, generator=_gen(5))
    full = mask.expand_as(x)
    assert torch.all(out[full] == -1.0)
    assert torch.equal(out[~full], x[~full])


def test_local_mask_ratio_bounds():
    x = _batch()
    assert torch.equal(local_mask(x, 0.0, 8, generator=_gen(0)), x)
    assert torch.all(local_mask(x, 1.0, 8, fill_value=0.25, generator=_gen(0)) == 0.25)


def test_local_mask_seeds_and_per_sample():
    x = _batch((4, 1, 32, 32, 32))
    a = local_mask_grid(x, 0.5, 8, _gen(7))
    assert torch.equal(a, local_mask_grid(x, 0.5, 8, _gen(7)))
    assert not torch.equal(a, local_mask_grid(x, 0.5, 8, _gen(8)))
    assert not torch.equal(a[0], a[1])


def _expand_by_repeat_interleave(cell_mask: torch.Tensor, patch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """The former `expand_cell_mask`: one `repeat_interleave` per axis, then the crop."""
    mask = cell_mask
    for dim in range(1, mask.ndim):
        mask = mask.repeat_interleave(patch, dim=dim)
    return mask[(slice(None), *(slice(0, s) for s in spatial))].unsqueeze(1)


@pytest.mark.parametrize(
    ("batch", "spatial", "patch"),
    [
        (2, (32, 32, 32), 8),
        (3, (20, 12, 33), 8),  # cropped border cells on every axis
        (1, (5, 7, 3), 16),  # one cell larger than the volume
        (2, (30, 18), 4),
        (2, (9, 10), 1),
        (0, (16, 16, 16), 4),
    ],
)
def test_expand_cell_mask_equals_repeat_interleave(batch, spatial, patch):
    cells = torch.rand(batch, *mask_grid_shape(spatial, patch), generator=_gen(3)) < 0.5
    mask = expand_cell_mask(cells, patch, spatial)
    expected = _expand_by_repeat_interleave(cells, patch, spatial)
    assert mask.shape == expected.shape == (batch, 1, *spatial) and mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_embedding_channel_mask():
    for c, ratio in [(768, 0.6), (10, 0.25), (16, 0.0), (16, 1.0)]:
        m = embedding_channel_mask(c, ratio, _gen(0))
        assert m.shape == (c,) and m.dtype == torch.float32
        assert int((m == 0).sum()) == int(ratio * c)
        assert int((m == 1).sum()) == c - int(ratio * c)
    assert torch.equal(embedding_channel_mask(64, 0.5, _gen(1)), embedding_channel_mask(64, 0.5, _gen(1)))
    assert not torch.equal(embedding_channel_mask(64, 0.5, _gen(1)), embedding_channel_mask(64, 0.5, _gen(2)))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: add_gaussian_noise(_batch(), variance=-0.1), "got -0.1"),
        (lambda: down_up_sample(_batch(), factor=0.5), "got 0.5"),
        (lambda: down_up_sample(_batch(), mode="cubic"), "cubic"),
        (lambda: local_mask(_batch(), mask_ratio=1.5), "got 1.5"),
        (lambda: local_mask(_batch(), patch_size=0), "got 0"),
        (lambda: local_mask(torch.rand(1, 8, 8)), "ndim=3"),
        (lambda: add_gaussian_noise(torch.rand(8, 8, 8)), "ndim=3"),
        (lambda: embedding_channel_mask(8, -0.2), "got -0.2"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_result_on_gpu():
    x = _batch()
    op = BatchDisruption("all", mask_patch_size=8)
    assert torch.allclose(op(x.cuda(), _gen(0)).cpu(), op(x, _gen(0)), atol=1e-6)
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    assert local_mask(x.cuda(), 0.5, 8, generator=cuda_gen).is_cuda


# ---------------------------------------------------------------- BatchDisruption


def test_parse_choice():
    assert parse_choice("all") == ("noise", "superres", "local_mask")
    assert parse_choice("none") == ()
    assert parse_choice("local_mask+noise") == ("noise", "local_mask")
    assert parse_choice(["superres", "denoise"]) == ("noise", "superres")
    assert parse_choice("SLD") == parse_choice("ld") == parse_choice("LD") == ("local_mask",)
    assert parse_choice("noise + superres + noise") == ("noise", "superres")
    with pytest.raises(ValueError, match=r"blur.*valid names"):
        parse_choice("noise+blur")


def test_batch_disruption_all_equals_manual_composition():
    x = _batch()
    op = BatchDisruption("all", variance=0.05, interpolate=2, resample_mode="trilinear", mask_patch_size=8)
    out = op(x, _gen(11))
    g = _gen(11)
    manual = local_mask(down_up_sample(add_gaussian_noise(x, 0.05, g), 2, "trilinear"), 0.6, 8, generator=g)
    assert torch.equal(out, manual)
    # the order matters: masking before resampling gives something else
    g = _gen(11)
    other = down_up_sample(local_mask(add_gaussian_noise(x, 0.05, g), 0.6, 8, generator=g), 2, "trilinear")
    assert not torch.equal(out, other)


def test_batch_disruption_single_steps():
    x = _batch()
    assert torch.equal(BatchDisruption("denoise")(x, _gen(2)), add_gaussian_noise(x, 0.1, _gen(2)))
    assert torch.equal(BatchDisruption("superres")(x), down_up_sample(x, 4.0, "nearest"))
    assert torch.equal(BatchDisruption("sld")(x, _gen(2)), local_mask(x, 0.6, 16, generator=_gen(2)))
    none = BatchDisruption("none")(x)
    assert torch.equal(none, x) and none is not x


def test_batch_disruption_reference_mode():
    x = _batch()
    ref = BatchDisruption("all", local_mask_mode="reference", mask_ratio=0.4)
    assert ref.embedding_mask_ratio == 0.4
    assert torch.equal(ref(x, _gen(0)), down_up_sample(add_gaussian_noise(x, 0.1, _gen(0)), 4.0))
    assert BatchDisruption("all", mask_ratio=0.4).embedding_mask_ratio == 0.0
    assert BatchDisruption("noise", local_mask_mode="reference").embedding_mask_ratio == 0.0


def test_batch_disruption_validation_and_repr():
    with pytest.raises(ValueError, match="valid names"):
        BatchDisruption("mae")
    with pytest.raises(ValueError, match="pixel"):
        BatchDisruption(local_mask_mode="pixel")
    with pytest.raises(ValueError, match="-1"):
        BatchDisruption(variance=-1)
    text = repr(BatchDisruption("noise+sld", variance=0.2, mask_patch_size=8))
    assert "('noise', 'local_mask')" in text and "variance=0.2" in text and "mask_patch_size=8" in text


def test_batch_disruption_2d():
    x = _batch((2, 1, 32, 32))
    out = BatchDisruption("all", resample_mode="linear", mask_patch_size=8)(x, _gen(0))
    assert out.shape == x.shape
    assert int((out == 0).sum()) == 2 * round(0.6 * 16) * 64


# ---------------------------------------------------------------- MONAI transforms


def _image(shape: tuple[int, ...] = (1, 32, 32, 32)) -> torch.Tensor:
    return _batch((1, *shape))[0]


PAIRS = [
    (lambda p: RandAdditiveNoise(p, 0.2), lambda p: RandAdditiveNoised("img", p, 0.2)),
    (lambda p: RandDownUpSample(p, 4, "trilinear"), lambda p: RandDownUpSampled("img", p, 4, "trilinear")),
    (lambda p: RandLocalMask(p, 0.5, 8), lambda p: RandLocalMaskd("img", p, 0.5, 8)),
    (
        lambda p: RandDisruption("all", mask_patch_size=8, prob=p),
        lambda p: RandDisruptiond("img", "tgt", mask_patch_size=8, prob=p),
    ),
]


@pytest.mark.parametrize(("make_array", "make_dict"), PAIRS)
@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_array_and_dict_forms_agree(make_array, make_dict, prob):
    arr, dct = make_array(prob).set_random_state(3), make_dict(prob).set_random_state(3)
    img = _image()
    outs = []
    for _ in range(6):
        a = arr(img)
        d = dct({"img": img})["img"]
        assert torch.equal(a, d)
        outs.append(a)
    changed = [not torch.equal(o, img) for o in outs]
    assert all(changed) if prob == 1.0 else any(changed) and not all(changed)
    assert torch.equal(img, _image())


@pytest.mark.parametrize(("make_array", "make_dict"), PAIRS)
def test_prob_zero_is_identity(make_array, make_dict):
    img = _image()
    assert torch.equal(make_array(0.0)(img), img)
    assert torch.equal(make_dict(0.0)({"img": img})["img"], img)


def test_transform_seeding_reproduces():
    img = _image()
    a = RandDisruption(mask_patch_size=8).set_random_state(1)(img)
    b = RandDisruption(mask_patch_size=8).set_random_state(1)(img)
    c = RandDisruption(mask_patch_size=8).set_random_state(2)(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_transform_values():
    img = torch.zeros(1, 48, 48, 48)
    noisy = RandAdditiveNoise(variance=0.1).set_random_state(0)(img)
    assert noisy.std().item() == pytest.approx(math.sqrt(0.1), rel=0.02)

    img = _image((2, 20, 24, 17))
    masked = RandLocalMask(mask_ratio=0.6, patch_size=8, fill_value=-1.0).set_random_state(0)(img)
    mask = (masked == -1.0)[:1]
    assert torch.equal(mask[0], (masked == -1.0)[1])
    assert _masked_cells(mask[None], 8).item() == round(0.6 * 3 * 3 * 3)
    assert torch.equal(masked[~mask.expand_as(img)], img[~mask.expand_as(img)])

    assert torch.equal(RandDownUpSample(factor=2)(img), down_up_sample(img[None], 2)[0])


def test_disruption_matches_step_transforms_in_order():
    img = _image()
    out = RandDisruption("noise+sld", variance=0.3, mask_ratio=0.4, mask_patch_size=8).set_random_state(5)(img)
    rs = np.random.RandomState(5)
    rs.rand()  # the disruption's own coin
    noise = RandAdditiveNoise(variance=0.3).set_random_state(state=rs)
    mask = RandLocalMask(mask_ratio=0.4, patch_size=8).set_random_state(state=rs)
    noise.randomize(img)
    mask.randomize(img)
    assert torch.equal(out, mask(noise(img, randomize=False), randomize=False))


def test_rand_disruptiond_writes_clean_target():
    img = MetaTensor(_image(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    data = {"image": img, "label": 1}
    out = RandDisruptiond(mask_patch_size=8).set_random_state(0)(data)
    assert data["image"] is img and set(out) == {"image", "target", "label"}
    assert torch.equal(out["target"], img) and out["target"] is not img
    assert out["target"].data_ptr() != img.data_ptr()
    assert not torch.equal(out["image"], out["target"])
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, img.affine)
    assert torch.equal(img, _image())


def test_rand_disruptiond_several_keys_share_randomisation():
    a, b = _image(), _image()
    t = RandDisruptiond(["a", "b"], ["ta", "tb"], mask_patch_size=8).set_random_state(0)
    out = t({"a": a, "b": b})
    assert torch.equal(out["a"], out["b"]) and torch.equal(out["ta"], a)
    with pytest.raises(ValueError, match="one target key per key"):
        RandDisruptiond(["a", "b"], "target")
    missing = RandDisruptiond(["a", "c"], ["ta", "tc"], allow_missing_keys=True)({"a": a})
    assert set(missing) == {"a", "ta"}


def test_transforms_numpy_and_2d():
    img = _image((1, 32, 32)).numpy()
    out = RandDisruption("all", resample_mode="bilinear", mask_patch_size=8).set_random_state(0)(img)
    assert isinstance(out, np.ndarray) and out.shape == img.shape and out.dtype == img.dtype
    assert int((out == 0).sum()) == round(0.6 * 16) * 64
    assert np.array_equal(img, _image((1, 32, 32)).numpy())
