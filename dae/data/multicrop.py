"""DINO multi-crop views of grey X-rays on uint8 images at a reduced working resolution (DAX's recipes).

The data path (see the ``dino_xray`` bundle): :class:`~dae.data.xray_uint8.XRayToUint8d` preprocesses each X-ray
once and caches it as uint8 at :func:`multicrop_working_size`, the smallest size at which no crop of the recipe is
upsampled; per sample, :class:`DINOMultiCrop` cuts the crops from it and returns them as ``(1, h, w)`` uint8
tensors, with or without the photometric steps (:func:`~dae.data.device_augment.augment_crops`); on the device,
:class:`~dae.data.device_augment.CropAugment` does what the loader left out and converts to float.
:class:`MultiCropd` applies the multi-crop in a MONAI pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTrait

from dae.data.device_augment import VERSIONS, augment_crops
from dae.utils.config import resolve_flag

__all__ = ["DINOMultiCrop", "MultiCropd", "multicrop_working_size"]

_ROTATION_P = 0.8


def multicrop_working_size(
    global_size: int, local_size: int, global_scale: tuple[float, float], local_scale: tuple[float, float]
) -> int:
    """The smallest image size (geometric mean side ``sqrt(H * W)``) at which no crop of the recipe is upsampled.

    The smallest crop of a kind covers ``scale[0]`` of the image area, a square of side
    ``sqrt(scale[0] * H * W)``, resized to ``size``; so the size is
    ``ceil(max(global_size / sqrt(global_scale[0]), local_size / sqrt(local_scale[0])))``: 599 px for 224 px
    global crops from 0.14 and 96 px local crops from 0.05 of the area (DAX), 430 px for scales 0.4 and 0.05
    (DINO's ViT-S recipe).

    Raises:
        ValueError: a smallest scale not in (0, 1].
    """
    for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
        if not 0.0 < scale[0] <= 1.0:
            raise ValueError(f"{name}[0] must be in (0, 1], got {scale[0]}.")
    side = max(global_size / math.sqrt(global_scale[0]), local_size / math.sqrt(local_scale[0]))
    return math.ceil(side - 1e-9)


def _square_box(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int]:
    """``(top, left, side)`` of torchvision's ``RandomResizedCrop`` box with ratio 1 (10 tries, then the centre)."""
    for _ in range(10):
        side = round(math.sqrt(height * width * float(torch.empty(()).uniform_(*scale))))
        if 0 < side <= min(height, width):
            top = int(torch.randint(0, height - side + 1, ()))
            left = int(torch.randint(0, width - side + 1, ()))
            return top, left, side
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def _rotated_region(source: torch.Tensor, top: int, left: int, side: int, angle: float) -> torch.Tensor:
    """The box ``(top, left, side)`` of ``source`` rotated by ``angle`` degrees about its centre, as float.

    Equal to cropping torchvision's ``rotate(source, angle, BILINEAR, fill=0)`` (counter-clockwise, same canvas)
    but sampling only the box: ``source`` is ``(1, H, W)`` float, the result ``(1, side, side)``.
    """
    height, width = source.shape[-2:]
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    # pixel centres of the box relative to the image centre, mapped back into the unrotated image
    ys = (torch.arange(side, dtype=torch.float32) + (top + 0.5 - height / 2)).view(-1, 1)
    xs = (torch.arange(side, dtype=torch.float32) + (left + 0.5 - width / 2)).view(1, -1)
    grid = torch.stack(((cos * xs - sin * ys) / (width / 2), (sin * xs + cos * ys) / (height / 2)), dim=-1)
    return F.grid_sample(source[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _resize_to_uint8(region: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize with antialiasing of a ``(1, s, s)`` region in [0, 255] to ``(1, size, size)`` uint8."""
    out = F.interpolate(region.float()[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 255.0).round_().to(torch.uint8)


class DINOMultiCrop:
    """DINO multi-crop views of one uint8 grey X-ray: 2 global and ``local_crops_number`` local crops (DAX recipes).

    Every crop is a square ``RandomResizedCrop`` (torchvision's box sampling with ratio 1; bicubic with
    antialiasing) followed by horizontal and vertical flips (p 0.5 each); the two global crops are
    ``global_size`` and drawn from ``global_scale`` of the image area, the local ones ``local_size`` from
    ``local_scale``. With ``version="v2"`` (DAX version B) global 2 and the local crops are first rotated by
    U(-180, 180) degrees with p 0.8 (bilinear, zero fill, the same canvas); only the crop's box of the rotated
    image is computed. With ``photometric=True`` the crops then get the colour jitter, blur (``v1``), sharpness
    (``v2``) and solarisation of :func:`~dae.data.device_augment.augment_crops` (the global crops as one batch,
    the local ones as another), in float and rounded back to uint8 once; with ``photometric=False`` those are left to
    :class:`~dae.data.device_augment.CropAugment` on the device.

    The input is the cached uint8 working image (see :func:`multicrop_working_size`), the output uint8
    ``(1, h, w)`` crops: the float conversion, channel repeat and normalisation happen on the device, which keeps
    host memory and transfers at a quarter (one byte instead of four) or a twelfth (one channel instead of
    three). The recipe's bicubic resampling is kept: on one CPU thread, torchvision 0.29 resized uint8 crops
    bicubic as fast as bilinear (0.38 vs 0.60 ms from 359 to 224 px, 0.33 vs 0.32 ms from 192 to 96 px).

    All randomness comes from torch's global generator, so seeding or restoring it (per DataLoader worker, torch
    derives the worker seeds from it) reproduces the crops.

    Args:
        version: ``"v1"`` (DINO / DAX version A) or ``"v2"`` (DAX version B).
        global_size: side of the global crops in pixels.
        local_size: side of the local crops in pixels.
        global_scale: range of the image-area fraction of a global crop.
        local_scale: range of the image-area fraction of a local crop.
        local_crops_number: number of local crops (0 for global crops only).
        photometric: apply the photometric steps here (False: on the device).

    Raises:
        ValueError: unknown version, negative ``local_crops_number``, or a smallest scale not in (0, 1].
    """

    def __init__(
        self,
        version: str = "v1",
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        photometric: bool = True,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}.")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}.")
        self.version = version
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.local_crops_number = local_crops_number
        self.photometric = resolve_flag(photometric, "photometric")
        self.working_size = multicrop_working_size(global_size, local_size, self.global_scale, self.local_scale)

    def __call__(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """The crops ``[global_1, global_2, local_1, ..., local_N]`` of a ``[1, H, W]`` uint8 image.

        Raises:
            ValueError: the image is not ``[1, H, W]``.
            TypeError: the image is not uint8.
        """
        x = torch.as_tensor(img).as_subclass(torch.Tensor)  # plain tensor: MetaTensor bookkeeping is not needed
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"DINOMultiCrop expects a [1, H, W] image, got shape {tuple(x.shape)}.")
        if x.dtype != torch.uint8:
            raise TypeError(f"DINOMultiCrop expects a uint8 image (see XRayToUint8d), got {x.dtype}.")
        source: torch.Tensor | None = None  # float copy for rotations, made at most once
        crops = []
        for index in range(2 + self.local_crops_number):
            size, scale = (self.global_size, self.global_scale) if index < 2 else (self.local_size, self.local_scale)
            rotate = self.version == "v2" and index > 0 and float(torch.rand(())) < _ROTATION_P
            angle = float(torch.empty(()).uniform_(-180.0, 180.0)) if rotate else 0.0
            top, left, side = _square_box(x.shape[-2], x.shape[-1], scale)
            if rotate:
                source = x.float() if source is None else source
                region = _rotated_region(source, top, left, side, angle).round_()
            else:
                region = x[:, top : top + side, left : left + side]
            crop = _resize_to_uint8(region, size)
            if float(torch.rand(())) < 0.5:
                crop = crop.flip(-1)
            if float(torch.rand(())) < 0.5:
                crop = crop.flip(-2)
            crops.append(crop)
        if self.photometric:
            floats = augment_crops([c[None].float().div_(255.0) for c in crops], self.version)
            crops = [c[0].mul_(255.0).round_().to(torch.uint8) for c in floats]
        return crops

    def __repr__(self) -> str:
        return (
            f"DINOMultiCrop(version={self.version!r}, global_size={self.global_size}, local_size={self.local_size}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
            f"local_crops_number={self.local_crops_number}, photometric={self.photometric})"
        )


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
