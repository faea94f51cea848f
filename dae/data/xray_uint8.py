"""The cached stage of the DINO X-ray data path: preprocess once, reduce to the working resolution, store uint8.

:class:`XRayToUint8d` is deterministic, so MONAI's ``CacheDataset`` keeps its output: the X-ray intensity
preprocessing (:func:`~dae.data.xray_transforms.xray_preprocessing`) at full resolution, an antialiased reduction
to the multi-crop's working size (:func:`~dae.data.multicrop.multicrop_working_size`), and 8-bit quantisation.
DAX version B (``dax_v2``) draws per sample whether to apply the negative log and a contrast factor; both of its
variants are cached (2 channels) with what :class:`RandXRayVariantd` needs to draw them in the random stage.

Quantisation: the preprocessing maps the central ROI to [0, 1], so 8 bits give steps of 1/255 of that range,
finer than the brightness/contrast jitter and blur of the recipe resolve, and what DINO (ImageNet JPEGs) and DAX
(8-bit images) train on. 12- to 16-bit detector data lose the levels below that step.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTrait
from monai.utils import convert_to_numpy

from dae.data.xray_transforms import _EPS, RandDAXPreprocessd, _roi, dax_preprocess, xray_preprocessing

__all__ = ["VARIANTS_SUFFIX", "DAXv2Variants", "RandXRayVariantd", "XRayToUint8d", "reduce_to_uint8"]

VARIANTS_SUFFIX = "_variants"
"""``XRayToUint8d`` keeps the :class:`DAXv2Variants` of ``key`` under ``key + VARIANTS_SUFFIX``."""

_SATURATED = -math.log(_EPS)  # the negative log of an intensity at or below eps * clip value


@dataclass(frozen=True)
class DAXv2Variants:
    """How :class:`RandXRayVariantd` realises DAX version B from the two cached variants of an X-ray.

    Channel 0 is the negative-log variant, made with the largest contrast factor ``contrast_range[1]``; channel 1
    the raw variant (ROI min-max only). A smaller contrast factor lowers the I0 clip value, which shifts the line
    integrals ``y = -log(min(x, cval) / cval)`` by ``log(cval_c / cval)`` and clips them at 0, a per-pixel
    monotone map of the cached image (:meth:`lut`). With the low-pass subtraction the shift does not commute with
    the filter, so ``window`` is None and the contrast factor stays at the midpoint of the range.

    Attributes:
        prob: probability of the negative-log variant.
        contrast_range: range of the uniform contrast factor.
        window: ``(median, std, lo, hi)``: the raw ROI's median and standard deviation and the ROI's range of the
            line integrals in channel 0; None: no contrast draw.
    """

    prob: float
    contrast_range: tuple[float, float]
    window: tuple[float, float, float, float] | None

    def lut(self, contrast: float) -> torch.Tensor:
        """The uint8 look-up table (256 values) from channel 0 to the negative-log variant at ``contrast``.

        Raises:
            ValueError: ``contrast`` above the factor channel 0 was made with, or no window.
        """
        if self.window is None or contrast > self.contrast_range[1]:
            raise ValueError(f"Channel 0 was made at {self.contrast_range[1]}; cannot map it to contrast {contrast}.")
        median, std, lo, hi = self.window
        made, wanted = median + self.contrast_range[1] * std, median + contrast * std
        if wanted <= 0:  # an all-zero (or negative) ROI: dax_preprocess gives zeros
            return torch.zeros(256, dtype=torch.uint8)
        shift = math.log(wanted / made)
        y = torch.linspace(lo, hi, 256, dtype=torch.float64)
        lo_c, hi_c = max(lo + shift, 0.0), max(hi + shift, 0.0)
        if hi_c <= lo_c:
            return torch.zeros(256, dtype=torch.uint8)
        shifted = (y + shift).clamp(min=0.0)
        if hi >= _SATURATED:  # (near) zero intensities stay at the -log(eps) ceiling whatever the clip value
            shifted[-1], hi_c = hi, hi
        z = (shifted - lo_c) / (hi_c - lo_c)
        return z.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def _neglog_window(img: Any, contrast: float, roi_fraction: float) -> tuple[float, float, float, float] | None:
    """``(median, std, lo, hi)`` of :class:`DAXv2Variants` for ``dax_preprocess(img, contrast_factor=contrast)``."""
    plane = convert_to_numpy(img).astype(np.float32).reshape(img.shape[-2:])
    roi = plane[_roi(plane.shape, roi_fraction)]
    median, std = float(np.median(roi)), float(np.std(roi, dtype=np.float64))
    cval = median + contrast * std
    if cval <= 0:
        return None

    def line_integral(x: float) -> float:
        return -math.log(max(min(x, cval) / cval, _EPS))  # as dax_preprocess, per value

    lo, hi = line_integral(float(roi.max())), line_integral(float(roi.min()))  # y falls as x rises
    return (median, std, lo, hi) if hi > lo else None


def reduce_to_uint8(planes: torch.Tensor, size: int | None) -> torch.Tensor:
    """Reduce ``(V, H, W)`` values in [0, 1] to geometric-mean side ``size`` and quantise them to uint8.

    The sides are scaled by ``size / sqrt(H * W)`` and rounded up (so no crop of the recipe is upsampled), with a
    bicubic antialiased resampling; smaller images (and ``size`` None) keep their size.
    """
    height, width = planes.shape[-2:]
    factor = size / math.sqrt(height * width) if size else 1.0
    out = planes.float()
    if factor < 1.0:
        shape = (math.ceil(height * factor - 1e-6), math.ceil(width * factor - 1e-6))
        out = F.interpolate(out[None], size=shape, mode="bicubic", antialias=True, align_corners=False)[0]
    return out.mul(255.0).clamp_(0.0, 255.0).round_().to(torch.uint8)


class XRayToUint8d(MapTransform):
    """Preprocess 2D X-rays once, reduce them to the multi-crop's working size and store them as uint8.

    ``preprocessing`` and its options are those of :func:`~dae.data.xray_transforms.xray_preprocessing`:

    - ``"dax"`` and ``"minmax"``: one channel, ``(1, h, w)`` uint8;
    - ``"dax_v2"``: two channels, the negative-log variant (at the largest contrast factor) and the raw variant,
      and their :class:`DAXv2Variants` under ``key + VARIANTS_SUFFIX``; put :class:`RandXRayVariantd` in the
      random stage to pick one per sample.

    The preprocessing runs at full resolution, then :func:`reduce_to_uint8` reduces the result. The output is a
    plain tensor (no metadata).

    Args:
        keys: image keys (``[1, H, W]`` float images as :class:`~dae.data.xray.LoadXRayd` gives them).
        preprocessing: ``"dax"``, ``"dax_v2"`` or ``"minmax"``.
        size: the working size, e.g. ``DINOMultiCrop(...).working_size``; None: full resolution.
        subtract_lowpass: the DAX low-pass subtraction (``"dax"`` / ``"dax_v2"`` only).
        allow_missing_keys: do not raise if a key is missing.
        **kwargs: other options of the DAX transforms (``contrast_factor``, ``prob``, ``contrast_range``,
            ``lowpass_sigma``, ``roi_fraction``).

    Raises:
        ValueError: as :func:`~dae.data.xray_transforms.xray_preprocessing`, or a size below 1.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        preprocessing: str = "dax",
        size: int | None = None,
        subtract_lowpass: bool = False,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 or None, got {size}.")
        self.size = size
        self.preprocess = xray_preprocessing(preprocessing, "image", subtract_lowpass=subtract_lowpass, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each image by its uint8 working image (and add its variants for ``dax_v2``)."""
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(self.preprocess, RandDAXPreprocessd):
                planes, d[f"{key}{VARIANTS_SUFFIX}"] = self._dax_v2(d[key])
            else:
                planes = torch.as_tensor(self.preprocess({"image": d[key]})["image"])
            d[key] = reduce_to_uint8(planes.as_subclass(torch.Tensor), self.size)
        return d

    def _dax_v2(self, img: Any) -> tuple[torch.Tensor, DAXv2Variants]:
        options = self.preprocess.kwargs
        low, high = self.preprocess.contrast_range
        contrast = (low + high) / 2 if options["subtract_lowpass"] else high
        neglog = dax_preprocess(img, contrast_factor=contrast, neglog=True, **options)
        raw = dax_preprocess(img, neglog=False, **options)
        planes = torch.cat([torch.as_tensor(p).reshape(1, *p.shape[-2:]) for p in (neglog, raw)])
        window = None if options["subtract_lowpass"] else _neglog_window(img, high, options["roi_fraction"])
        return planes, DAXv2Variants(float(self.preprocess.prob), (float(low), float(high)), window)


class RandXRayVariantd(RandomizableTrait, MapTransform):
    """Draw DAX version B's variant of each cached ``dax_v2`` image (see :class:`XRayToUint8d`).

    With probability ``prob`` the negative-log channel, mapped to a contrast factor drawn uniformly from
    ``contrast_range`` (:meth:`DAXv2Variants.lut`), else the raw channel: the draws of
    :class:`~dae.data.xray_transforms.RandDAXPreprocessd`, applied to the reduced uint8 image (the contrast map is
    per pixel, so this differs from mapping at full resolution only at the edges of clipped regions). Images
    without variants (``dax``, ``minmax``) pass unchanged. Draws come from torch's global generator, as the
    crops' (:class:`~dae.data.multicrop.DINOMultiCrop`); all keys of a sample share them.

    Args:
        keys: image keys.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each two-variant image by one ``(1, h, w)`` variant."""
        d = dict(data)
        u = float(torch.rand(()))
        contrast: float | None = None
        for key in self.key_iterator(d):
            variants: DAXv2Variants | None = d.pop(f"{key}{VARIANTS_SUFFIX}", None)
            if variants is None:
                continue
            image = d[key]
            if u >= variants.prob:
                d[key] = image[1:]
            elif variants.window is None:
                d[key] = image[:1]
            else:
                if contrast is None:
                    contrast = float(torch.empty(()).uniform_(*variants.contrast_range))
                d[key] = variants.lut(contrast).take(image[:1].long())
        return d
