""":func:`augment_batch` applies the photometric part of DINO's and DAX's multi-crop recipes (everything after the
geometric crop and flips) to a batch of crops, vectorised with per-sample random parameters; :func:`augment_crops`
applies it to the list of crops of a multi-crop, the crops of one size as one batch. This runs on the CPU in a
data-loader worker (:class:`~dae.data.multicrop.DINOMultiCrop` with ``photometric=True``, on the crops of one
image) or on the GPU (:class:`CropAugment` with ``augment=True``, on the training batch); the two give the same
distributions. :class:`CropAugment` also converts the loader's uint8 crops to the network's float input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dae.utils.config import resolve_flag

__all__ = ["CropAugment", "augment_batch", "augment_crops"]

VERSIONS: tuple[str, ...] = ("v1", "v2")
"""The recipes: ``v1`` (DINO / DAX version A) and ``v2`` (DAX version B)."""

DRAWS_PER_CROP = 8
"""Uniform numbers :func:`augment_batch` takes per crop (one per parameter, see its ``draws``)."""

_JITTER_P = 0.8
_JITTER = 0.4  # brightness and contrast factors ~ U(1 - 0.4, 1 + 0.4)
_BLUR_P = (1.0, 0.1, 0.5)  # global 1, global 2, local crops
_SIGMA = (0.1, 2.0)
_BLUR_KERNEL = 2 * math.ceil(3 * _SIGMA[1]) + 1  # +-3 sigma of the largest sigma: 13 px, as DINO's PIL blur
_SOLARIZE_P = 0.2  # global 2 only
_SHARPNESS = (0.8, 1.2)


def _parameters(draws: torch.Tensor, positions: torch.Tensor, version: str) -> torch.Tensor:
    """Per-sample parameters from ``(B, 8)`` uniform draws and crop positions (0 global 1, 1 global 2, >= 2 local).

    Columns: jitter, brightness factor, contrast factor, brightness first, blur, sigma, solarise, sharpness factor
    (flags as 0/1; factors of 1 without jitter). Every column is drawn whatever the recipe, so the random stream
    does not depend on which steps are on.
    """
    u = draws.float()
    blur_p = torch.tensor(_BLUR_P)[positions.clamp(max=2)] if version == "v1" else torch.zeros(len(u))
    jitter = u[:, 0] < _JITTER_P
    columns = (
        jitter,
        torch.where(jitter, 1.0 - _JITTER + 2 * _JITTER * u[:, 1], 1.0),
        torch.where(jitter, 1.0 - _JITTER + 2 * _JITTER * u[:, 2], 1.0),
        u[:, 3] < 0.5,
        u[:, 4] < blur_p,
        _SIGMA[0] + (_SIGMA[1] - _SIGMA[0]) * u[:, 5],
        (u[:, 6] < _SOLARIZE_P) & (positions == 1),
        _SHARPNESS[0] + (_SHARPNESS[1] - _SHARPNESS[0]) * u[:, 7],
    )
    return torch.stack([c.float() for c in columns], dim=1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _colour_jitter(
    x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, brightness_first: torch.Tensor, orders: set[bool]
) -> torch.Tensor:
    """torchvision's ``ColorJitter(brightness, contrast)``: both factors, in a random order, clamped after each.

    ``orders`` holds the orders some sample of the batch takes (True: brightness first); only those are computed.
    """
    b, c = _per_sample(brightness), _per_sample(contrast)

    def adjust_brightness(t: torch.Tensor) -> torch.Tensor:
        return (t * b).clamp_(0.0, 1.0)

    def adjust_contrast(t: torch.Tensor) -> torch.Tensor:
        return (c * t + (1.0 - c) * t.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0.0, 1.0)

    if orders == {True}:
        return adjust_contrast(adjust_brightness(x))
    if orders == {False}:
        return adjust_brightness(adjust_contrast(x))
    first, second = adjust_contrast(adjust_brightness(x)), adjust_brightness(adjust_contrast(x))
    return torch.where(_per_sample(brightness_first), first, second)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur with one sigma per sample (reflect padding, as torchvision's ``GaussianBlur``).

    The kernel spans 13 px, or the largest odd size that fits a smaller crop; samples not blurred get a unit
    impulse. One depthwise convolution per axis handles the whole batch.
    """
    batch, _, height, width = x.shape
    size = min(_BLUR_KERNEL, min(height, width) - (1 - min(height, width) % 2))
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.softmax(-0.5 * (offsets / sigma.reshape(-1, 1)) ** 2, dim=1)
    kernel = torch.where(apply.reshape(-1, 1), kernel, (offsets == 0).to(x.dtype))
    pad = size // 2
    out = x.reshape(1, batch, height, width)
    out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), kernel.view(batch, 1, 1, size), groups=batch)
    out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), kernel.view(batch, 1, size, 1), groups=batch)
    return out.view_as(x)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_sharpness`` with one factor per sample: blend with a 3x3 smoothing (border kept).

    The smoothing kernel is 1/13 with 5/13 in the centre: (3x3 sum + 4 x centre) / 13, built on the device.
    """
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    box = F.conv2d(x, torch.ones(1, 1, 3, 3, device=x.device, dtype=x.dtype))
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * degenerate).clamp_(0.0, 1.0)


def augment_batch(x: torch.Tensor, positions: int | torch.Tensor, version: str, draws: torch.Tensor) -> torch.Tensor:
    """The photometric steps of the multi-crop recipe on one batch of crops of one size.

    Every crop gets ``ColorJitter(brightness=0.4, contrast=0.4)`` with p 0.8 (factors ~ U(0.6, 1.4), the two steps
    in a random order, clamped to [0, 1] after each, contrast around the crop's mean, as torchvision). Then:

    - ``"v1"``: Gaussian blur with sigma ~ U(0.1, 2) px and p 1.0 / 0.1 / 0.5 for global 1 / global 2 / local
      crops (13 px kernel, reflect padding);
    - ``"v2"``: sharpness adjustment with a factor ~ U(0.8, 1.2) (torchvision's ``adjust_sharpness``);
    - both: solarisation (``x >= 0.5 -> 1 - x``) of global 2 with p 0.2.

    The values stay float between the steps (torchvision on uint8 rounds after each; the difference is below one
    grey level per step). The parameters are computed on the CPU and sent to ``x``'s device in one copy; steps that
    no sample of the batch takes are skipped, decided on the CPU, so a GPU batch never waits for the device.

    Args:
        x: ``(B, 1, h, w)`` float crops in [0, 1].
        positions: each crop's position in ``[global_1, global_2, local_1, ...]`` (one for all, or ``(B,)``).
        version: ``"v1"`` or ``"v2"``.
        draws: ``(B, 8)`` CPU uniform numbers in [0, 1), e.g. ``torch.rand((B, 8), generator=...)``.

    Returns:
        The augmented ``(B, 1, h, w)`` crops, float in [0, 1].

    Raises:
        ValueError: unknown version, or ``x`` or ``draws`` of the wrong shape.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}.")
    if x.ndim != 4 or x.shape[1] != 1 or draws.shape != (x.shape[0], DRAWS_PER_CROP):
        shapes = f"{tuple(x.shape)} and {tuple(draws.shape)}"
        raise ValueError(f"expected x (B, 1, h, w) and draws (B, {DRAWS_PER_CROP}), got {shapes}.")
    positions = torch.as_tensor(positions).expand(x.shape[0])
    params = _parameters(draws, positions, version)
    jittered, blurred, solarised = params[:, 0] > 0, params[:, 4] > 0, params[:, 6] > 0
    orders = {bool(order) for order in params[jittered, 3]}
    _, brightness, contrast, brightness_first, apply_blur, sigma, solarize, sharpness = params.to(
        x.device, non_blocking=True
    ).unbind(1)
    if orders:
        x = _colour_jitter(x, brightness, contrast, brightness_first > 0, orders)
    if bool(blurred.any()):
        x = _gaussian_blur(x, sigma, apply_blur > 0)
    if version == "v2":
        x = _sharpness(x, sharpness)
    if bool(solarised.any()):
        x = torch.where(_per_sample(solarize > 0) & (x >= 0.5), 1.0 - x, x)
    return x


def augment_crops(
    crops: Sequence[torch.Tensor], version: str = "v1", generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """:func:`augment_batch` on the ``[global_1, global_2, local_1, ...]`` crop batches.

    Batches of one size go through :func:`augment_batch` together (one call for the global crops, one for the
    local ones), which keeps the number of kernel launches per training step small.

    Args:
        crops: ``(B, 1, h, w)`` float batches in [0, 1], one per crop position, all with the same ``B``.
        version: ``"v1"`` or ``"v2"``.
        generator: the CPU generator of the parameters (None: torch's global generator); one
            ``(len(crops), B, 8)`` draw per call.

    Returns:
        The augmented batches, in the order given.
    """
    if not crops:
        return []
    batch = crops[0].shape[0]
    draws = torch.rand((len(crops), batch, DRAWS_PER_CROP), generator=generator)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, crop in enumerate(crops):
        groups.setdefault(tuple(crop.shape[1:]), []).append(index)
    out: list[torch.Tensor] = list(crops)
    for indices in groups.values():
        x = torch.cat([crops[i] for i in indices]) if len(indices) > 1 else crops[indices[0]]
        positions = torch.tensor(indices).repeat_interleave(batch)
        augmented = augment_batch(x, positions, version, draws[indices].reshape(-1, DRAWS_PER_CROP))
        for i, part in zip(indices, augmented.split(batch)):
            out[i] = part
    return out


class CropAugment:
    """The device side of the DINO data path: uint8 crops in, the network's float input out.

    Takes the loader's crops (``(B, 1, h, w)`` uint8, already on the device) and returns ``(B, C, h, w)`` float
    crops: with ``augment=True`` the photometric steps of :func:`augment_crops` first (for a loader that left them
    out), then always ``x / 255``, the grey channel repeated to ``out_channels`` and, with ``mean`` and ``std``,
    ``(x - mean) / std`` per channel. The parameters come from the instance's own CPU generator, re-seeded at
    every call from ``(seed, calls so far)``, so the main process's generators and the loader workers are not
    touched, and ``state_dict`` (the call count) is all an exact resume needs. In data-parallel runs give each
    rank its own seed (e.g. ``seed + rank``): the ranks then keep distinct streams across a resume, because the
    checkpointed count is the same on every rank.

    Args:
        version: ``"v1"`` or ``"v2"``, the recipe of the augmentation.
        augment: apply the photometric steps (False: only convert).
        out_channels: 1, or 3 to repeat the grey channel for RGB backbones.
        mean: normalisation mean, one value or one per output channel; None with ``std`` None: no normalisation.
        std: normalisation standard deviation, one value or one per output channel.
        seed: seed of the generator.

    Raises:
        ValueError: unknown version, ``out_channels`` other than 1 or 3, or mean/std of the wrong length or
            given alone.
    """

    def __init__(
        self,
        version: str = "v1",
        augment: bool = True,
        out_channels: int = 3,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}.")
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 or 3, got {out_channels}.")
        if (mean is None) != (std is None):
            raise ValueError("Give both mean and std, or neither.")
        self.version = version
        self.augment = resolve_flag(augment, "augment")
        self.out_channels = out_channels
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        if mean is not None and std is not None:
            self.mean, self.std = (
                [float(x) for x in v] if isinstance(v, Sequence) else [float(v)] * out_channels for v in (mean, std)
            )
            if len(self.mean) != out_channels or len(self.std) != out_channels:
                raise ValueError(f"mean and std need 1 or {out_channels} values, got {mean} and {std}.")
        self.seed = seed
        self.calls = 0
        self.generator = torch.Generator()

    def __call__(self, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Augment (optionally) and convert ``[global_1, global_2, local_1, ...]`` uint8 crop batches.

        Raises:
            TypeError: a crop batch is not uint8.
            ValueError: a crop batch is not ``(B, 1, h, w)``.
        """
        for c in crops:
            if c.dtype != torch.uint8:
                raise TypeError(f"CropAugment expects uint8 crops from the loader, got {c.dtype}.")
            if c.ndim != 4 or c.shape[1] != 1:
                raise ValueError(f"CropAugment expects (B, 1, h, w) crops, got shape {tuple(c.shape)}.")
        floats = [c.float().div_(255.0) for c in crops]
        if self.augment:
            self.generator.manual_seed(int(np.random.SeedSequence((self.seed, self.calls)).generate_state(1)[0]))
            floats = augment_crops(floats, self.version, self.generator)
        self.calls += 1
        return [self._finish(x) for x in floats]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x.repeat(1, self.out_channels, 1, 1) if self.out_channels > 1 else x
        return torch.cat([(x - m) / s for m, s in zip(self.mean, self.std)], dim=1)

    def state_dict(self) -> dict[str, Any]:
        """The number of calls so far (the parameters of the next call follow from it and ``seed``)."""
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.calls = int(state["calls"])

    def __repr__(self) -> str:
        return (
            f"CropAugment(version={self.version!r}, augment={self.augment}, out_channels={self.out_channels}, "
            f"mean={self.mean}, std={self.std}, seed={self.seed})"
        )
