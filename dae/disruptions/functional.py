"""Batch disruptions on tensors shaped ``(B, C, *spatial)`` (2D or 3D), on any device and float dtype.

No function modifies its input. Random functions take an optional ``torch.Generator``; random numbers are drawn
on the generator's device (the input's device without one) and then moved, so a seeded generator gives the same
result wherever the input lives. The amount of randomness drawn depends only on the input shape, never on the
values of the parameters, so a generator's sequence stays aligned across settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "RESAMPLE_MODES",
    "add_gaussian_noise",
    "check_factor",
    "check_mode",
    "check_patch_size",
    "check_ratio",
    "check_variance",
    "down_up_sample",
    "embedding_channel_mask",
    "expand_cell_mask",
    "local_mask",
    "local_mask_grid",
    "mask_grid_shape",
    "num_masked_cells",
]

RESAMPLE_MODES = ("nearest", "linear", "bilinear", "trilinear")
_LINEAR_BY_DIMS = {2: "bilinear", 3: "trilinear"}


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a batch shaped (B, C, H, W) or (B, C, D, H, W), got ndim={x.ndim}")


def _check_float(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got dtype={x.dtype}")


def check_variance(variance: float) -> None:
    """Raise ``ValueError`` unless ``variance >= 0``."""
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0, got {variance}")


def check_factor(factor: float) -> None:
    """Raise ``ValueError`` unless the down-sampling ``factor >= 1``."""
    if not factor >= 1:
        raise ValueError(f"down-sampling factor must be >= 1, got {factor}")


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`RESAMPLE_MODES`."""
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample mode must be one of {RESAMPLE_MODES}, got {mode!r}")


def check_ratio(ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 <= ratio <= 1``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")


def check_patch_size(patch_size: int) -> None:
    """Raise ``ValueError`` unless ``patch_size`` is an integer >= 1."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"mask patch size must be an integer >= 1, got {patch_size!r}")


def _random_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def add_gaussian_noise(
    x: torch.Tensor, variance: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add zero-mean Gaussian noise with standard deviation ``sqrt(variance)``.

    Args:
        x: batch ``(B, C, *spatial)``, floating point.
        variance: noise variance (the reference code's parametrisation); 0 returns an equal copy.
        generator: optional source of randomness.

    Returns:
        Noisy batch, same shape, dtype and device as ``x``.
    """
    _check_batch(x)
    _check_float(x)
    check_variance(variance)
    # float32 at least so half-precision inputs get the same noise as float32 ones for a given generator
    dtype = torch.promote_types(x.dtype, torch.float32)
    noise = torch.randn(x.shape, generator=generator, device=_random_device(generator, x.device), dtype=dtype)
    return x + (noise * math.sqrt(variance)).to(device=x.device, dtype=x.dtype)


def down_up_sample(x: torch.Tensor, factor: float = 4.0, mode: str = "nearest") -> torch.Tensor:
    """Down-sample by ``factor`` and up-sample back to the original size (super-resolution disruption).

    Each spatial size ``s`` is reduced to ``max(1, floor(s / factor))``. ``"nearest"`` matches the reference code;
    ``"linear"``, ``"bilinear"`` and ``"trilinear"`` all mean (bi/tri)linear interpolation matching the number of
    spatial dims (``align_corners=False``), as in the paper.

    Args:
        x: batch ``(B, C, *spatial)``, floating point.
        factor: down-sampling factor, >= 1; 1 returns an equal copy.
        mode: one of :data:`RESAMPLE_MODES`.

    Returns:
        Blurred batch, same shape, dtype and device as ``x``.
    """
    _check_batch(x)
    _check_float(x)
    check_factor(factor)
    check_mode(mode)
    spatial = tuple(x.shape[2:])
    low = tuple(max(1, math.floor(s / factor)) for s in spatial)
    if mode == "nearest":
        return F.interpolate(F.interpolate(x, size=low, mode="nearest"), size=spatial, mode="nearest")
    linear = _LINEAR_BY_DIMS[len(spatial)]
    down = F.interpolate(x, size=low, mode=linear, align_corners=False)
    return F.interpolate(down, size=spatial, mode=linear, align_corners=False)


def mask_grid_shape(spatial_shape: Sequence[int], patch_size: int) -> tuple[int, ...]:
    """Number of mask cells per spatial dim: ``ceil(s / patch_size)`` (partial border cells count as cells)."""
    check_patch_size(patch_size)
    return tuple(-(-int(s) // patch_size) for s in spatial_shape)


def num_masked_cells(num_cells: int, mask_ratio: float) -> int:
    """Number of cells to mask: ``round(mask_ratio * num_cells)``."""
    check_ratio(mask_ratio)
    return round(mask_ratio * num_cells)


def expand_cell_mask(cell_mask: torch.Tensor, patch_size: int, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Expand a per-cell mask to a voxel mask.

    Args:
        cell_mask: boolean ``(B, *grid)`` with ``grid == mask_grid_shape(spatial_shape, patch_size)``.
        patch_size: edge length of the cubic cells.
        spatial_shape: target spatial size; border cells are cropped to it.

    Returns:
        Boolean voxel mask ``(B, 1, *spatial_shape)`` on the device of ``cell_mask``.
    """
    expected = mask_grid_shape(spatial_shape, patch_size)
    if tuple(cell_mask.shape[1:]) != expected:
        raise ValueError(f"cell mask grid {tuple(cell_mask.shape[1:])} does not match expected grid {expected}")
    batch, *grid, last = cell_mask.shape
    size = int(spatial_shape[-1])
    # The last axis first, on a mask patch_size ** (ndim - 1) times smaller than the result, so that the one
    # full-size copy below moves whole contiguous rows (one repeat_interleave per axis: ~10x slower on CPU).
    rows = cell_mask.unsqueeze(-1).expand(*cell_mask.shape, patch_size).reshape(batch, *grid, last * patch_size)
    cells = rows[..., :size].reshape(batch, *(n for g in grid for n in (g, 1)), size)
    voxels = cells.expand(batch, *(n for g in grid for n in (g, patch_size)), size)
    mask = voxels.reshape(batch, *(g * patch_size for g in grid), size)
    crop = tuple(slice(0, int(s)) for s in spatial_shape[:-1])
    return mask[(slice(None), *crop)].unsqueeze(1)


def local_mask_grid(
    x: torch.Tensor, mask_ratio: float = 0.6, patch_size: int = 16, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw an independent block mask for every sample of a batch.

    Exactly ``round(mask_ratio * n_cells)`` of the ``n_cells`` cells of a ``patch_size``-cube grid are chosen,
    uniformly at random, per sample.

    Args:
        x: batch ``(B, C, *spatial)``; only its shape and device are used.
        mask_ratio: fraction of cells to mask, in [0, 1].
        patch_size: edge length of the cubic cells, >= 1.
        generator: optional source of randomness.

    Returns:
        Boolean mask ``(B, 1, *spatial)`` on ``x.device``, True where voxels are masked.
    """
    _check_batch(x)
    check_ratio(mask_ratio)
    spatial = tuple(x.shape[2:])
    grid = mask_grid_shape(spatial, patch_size)
    n_cells = math.prod(grid)
    n_masked = num_masked_cells(n_cells, mask_ratio)
    scores = torch.rand(x.shape[0], n_cells, generator=generator, device=_random_device(generator, x.device))
    # the n_masked lowest scores of a row are a uniform random subset of its cells
    ranks = scores.argsort(dim=1).argsort(dim=1)
    cell_mask = (ranks < n_masked).reshape(x.shape[0], *grid).to(x.device)
    return expand_cell_mask(cell_mask, patch_size, spatial)


def local_mask(
    x: torch.Tensor,
    mask_ratio: float = 0.6,
    patch_size: int = 16,
    fill_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Set randomly chosen cubic blocks of every sample (all channels) to ``fill_value``.

    Args:
        x: batch ``(B, C, *spatial)``.
        mask_ratio: fraction of cells to mask, in [0, 1].
        patch_size: edge length of the cubic cells, >= 1.
        fill_value: value written into masked voxels.
        generator: optional source of randomness.

    Returns:
        Masked batch, same shape, dtype and device as ``x``; see :func:`local_mask_grid` for the mask.
    """
    return x.masked_fill(local_mask_grid(x, mask_ratio, patch_size, generator), fill_value)


def embedding_channel_mask(
    num_channels: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Reference-code masking: a channel mask shared by every token and sample of a batch.

    Args:
        num_channels: embedding size ``C``.
        ratio: fraction of channels to zero, in [0, 1]; ``int(ratio * C)`` channels are zeroed.
        generator: optional source of randomness (``torch.randperm``).
        device: device of the returned mask (default: the generator's device, else CPU).

    Returns:
        Float mask ``(C,)`` of zeros (dropped channels) and ones, to multiply the embeddings with.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    check_ratio(ratio)
    rand_device = _random_device(generator, torch.device(device) if device is not None else torch.device("cpu"))
    dropped = torch.randperm(num_channels, generator=generator, device=rand_device)[: int(ratio * num_channels)]
    mask = torch.ones(num_channels, device=rand_device)
    mask[dropped] = 0.0
    return mask.to(device) if device is not None else mask
