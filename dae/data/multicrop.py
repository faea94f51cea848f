"""DINO multi-crop augmentation of grey X-rays on float tensors (DAX's recipes).

:class:`DINOMultiCrop` builds DINO's two global and N local crops with DAX's X-ray recipes (square crops,
vertical flips, no saturation/hue jitter or greyscale; ``v1`` with Gaussian blur, ``v2`` with rotation and
sharpness) on float tensors, so 16-bit and float images keep their precision; :class:`MultiCropd` applies it
in a MONAI pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTrait
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["DINOMultiCrop", "MultiCropd"]


class _Clamp01:
    """Clamp to [0, 1]: bicubic resampling overshoots at edges."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return "Clamp01()"


class _RandomSharpness:
    """``adjust_sharpness`` with a factor drawn uniformly from ``factors`` (torchvision's takes a fixed one)."""

    def __init__(self, factors: tuple[float, float]) -> None:
        self.factors = factors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        factor = float(torch.empty(()).uniform_(*self.factors))
        return F.adjust_sharpness(x, factor)

    def __repr__(self) -> str:
        return f"RandomSharpness(factors={self.factors})"


class _ToChannels:
    """Repeat a grey image to ``channels`` channels."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.channels, 1, 1)

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


class DINOMultiCrop:
    """DINO multi-crop views of one grey X-ray: 2 global and ``local_crops_number`` local crops (DAX recipes).

    Every crop is a square ``RandomResizedCrop`` (ratio 1, bicubic with antialiasing, then clamped to [0, 1])
    followed by horizontal and vertical flips (p 0.5 each) and ``ColorJitter(brightness=0.4, contrast=0.4)``
    (p 0.8); the two global crops are ``global_size`` and drawn from ``global_scale`` of the image area, the local
    ones ``local_size`` from ``local_scale``. Then, by ``version``:

    - ``"v1"`` (DINO / DAX version A): Gaussian blur with sigma ~ U(0.1, 2) px, p 1.0 / 0.1 / 0.5 for global 1 /
      global 2 / local crops, and solarisation (threshold 0.5, p 0.2) on global 2. The kernel spans +-3 sigma of
      the largest sigma (13 px; smaller for crops under 13 px), like DINO's PIL blur; DAX's fixed 5 px kernel cut
      sigma 2 at +-1 sigma.
    - ``"v2"`` (DAX version B): no blur; rotation by U(-180, 180) degrees (bilinear, zero fill, p 0.8) before
      cropping for global 2 and the local crops; sharpness adjustment with a factor ~ U(0.8, 1.2) on every crop;
      solarisation on global 2.

    Finally each crop is repeated to ``out_channels`` channels and, if ``mean`` and ``std`` are given,
    normalised. All randomness comes from torch's global generator, so seeding or restoring it (per DataLoader
    worker, torch derives the worker seeds from it) reproduces the crops. Works on float tensors at any precision;
    8-bit data must be scaled to [0, 1] first.

    Args:
        version: ``"v1"`` or ``"v2"``.
        global_size: side of the global crops in pixels.
        local_size: side of the local crops in pixels.
        global_scale: range of the image-area fraction of a global crop.
        local_scale: range of the image-area fraction of a local crop.
        local_crops_number: number of local crops (0 for global crops only).
        mean: normalisation mean, one value or one per output channel; None with ``std`` None: no normalisation.
        std: normalisation standard deviation, one value or one per output channel.
        out_channels: 1, or 3 to repeat the grey channel for RGB backbones.
    """

    def __init__(
        self,
        version: str = "v1",
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        out_channels: int = 3,
    ) -> None:
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}.")
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 or 3, got {out_channels}.")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}.")
        if (mean is None) != (std is None):
            raise ValueError("Give both mean and std, or neither.")
        self.version = version
        self.local_crops_number = local_crops_number
        finish: list[Callable[[torch.Tensor], torch.Tensor]] = [_ToChannels(out_channels)] if out_channels > 1 else []
        if mean is not None and std is not None:
            means, stds = (list(v) if isinstance(v, Sequence) else [v] * out_channels for v in (mean, std))
            if len(means) != out_channels or len(stds) != out_channels:
                raise ValueError(f"mean and std need 1 or {out_channels} values, got {mean} and {std}.")
            finish.append(v2.Normalize(means, stds))
        v1 = version == "v1"
        self.global_1 = v2.Compose(self._crop(global_size, global_scale, False, 1.0 if v1 else 0.0, 0.0) + finish)
        self.global_2 = v2.Compose(self._crop(global_size, global_scale, not v1, 0.1 if v1 else 0.0, 0.2) + finish)
        self.local = v2.Compose(self._crop(local_size, local_scale, not v1, 0.5 if v1 else 0.0, 0.0) + finish)

    def _crop(
        self, size: int, scale: tuple[float, float], rotate: bool, blur_p: float, solarize_p: float
    ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if rotate:
            rotation = v2.RandomRotation(180, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
            steps.append(v2.RandomApply([rotation], p=0.8))
        steps += [
            v2.RandomResizedCrop(
                size, scale=scale, ratio=(1.0, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            _Clamp01(),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        ]
        if blur_p > 0:
            kernel = min(2 * math.ceil(3 * 2.0) + 1, size - (1 - size % 2))
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        if self.version == "v2":
            steps.append(_RandomSharpness((0.8, 1.2)))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
        return steps

    def __call__(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """The crops ``[global_1, global_2, local_1, ..., local_N]`` of a ``[1, H, W]`` float image in [0, 1].

        Raises:
            ValueError: the image is not ``[1, H, W]``.
            TypeError: the image is not floating point.
        """
        x = torch.as_tensor(img).as_subclass(torch.Tensor)  # plain tensor: MetaTensor bookkeeping is not needed
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"DINOMultiCrop expects a [1, H, W] image, got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"DINOMultiCrop expects a float image in [0, 1], got {x.dtype}; scale it first.")
        return [self.global_1(x), self.global_2(x)] + [self.local(x) for _ in range(self.local_crops_number)]


class MultiCropd(RandomizableTrait, MapTransform):
    """Put the multi-crop views of an image in a list under ``output_key``.

    The transform is marked random (``RandomizableTrait``), so ``CacheDataset`` caches what comes before it and
    draws new crops at every epoch.

    With MONAI's or torch's default collation a batch then holds ``batch[output_key]`` as a list of
    ``[B, C, h, w]`` tensors, one per view.

    Args:
        keys: the image key (exactly one).
        multicrop: image to list of crops; defaults to ``DINOMultiCrop()``.
        output_key: key of the list of crops.
        drop_image: remove the full image from the sample (images of different sizes would not collate).
        allow_missing_keys: do not raise if the key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        multicrop: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        output_key: str = "crops",
        drop_image: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"MultiCropd takes exactly one key, got {self.keys}.")
        self.multicrop = multicrop if multicrop is not None else DINOMultiCrop()
        self.output_key = output_key
        self.drop_image = drop_image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the crops of one sample."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.multicrop(d[key])
            if self.drop_image:
                del d[key]
        return d
