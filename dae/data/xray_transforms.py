"""X-ray intensity preprocessing (DAX) on 1-channel images.

The preprocessing follows DAX (Scheuplein et al., MICCAI 2025): I0 normalisation at ``median + c * std`` of a
central ROI, negative log, optional low-pass subtraction, and min-max scaling with the ROI's range, clipped to
[0, 1]. The DINO multi-crop views are in :mod:`dae.data.multicrop`.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, ScaleIntensityd
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy.ndimage import gaussian_filter

__all__ = [
    "PREPROCESSING_NAMES",
    "DAXPreprocessd",
    "RandDAXPreprocessd",
    "dax_preprocess",
    "xray_preprocessing",
]

PREPROCESSING_NAMES: tuple[str, ...] = ("dax", "dax_v2", "minmax")
"""Choices of :func:`xray_preprocessing`."""

DAX_LOWPASS_SIGMA = 20 / 0.305
"""DAX's low-pass sigma in pixels: 20 mm at a 0.305 mm pixel pitch (its 976x976 detector images)."""

_EPS = float(np.finfo(np.float32).eps)


def _roi(shape: tuple[int, int], roi_fraction: float) -> tuple[slice, slice]:
    """The central ``roi_fraction`` of each axis: a margin of ``int(n * (1 - roi_fraction) / 2)`` on each side."""
    if not 0.0 < roi_fraction <= 1.0:
        raise ValueError(f"roi_fraction must be in (0, 1], got {roi_fraction}.")
    margins = (int(n * (1.0 - roi_fraction) / 2) for n in shape)
    return tuple(slice(m, n - m) for m, n in zip(margins, shape))  # type: ignore[return-value]


def dax_preprocess(
    img: np.ndarray | torch.Tensor,
    subtract_lowpass: bool = False,
    lowpass_sigma: float = DAX_LOWPASS_SIGMA,
    contrast_factor: float = 3.0,
    roi_fraction: float = 0.75,
    neglog: bool = True,
) -> np.ndarray | torch.Tensor:
    """DAX's X-ray preprocessing of one raw (detector intensity) image, giving values in [0, 1].

    Steps, with ROI = the central ``roi_fraction`` of each axis (0.75: a margin of H // 8 rows and W // 8 columns,
    which avoids border pixel errors; DAX handled square images only):

    1. I0 normalisation: ``cval = median(ROI) + contrast_factor * std(ROI)``, ``x = min(x, cval) / cval``, so that
       unattenuated intensity is about 1;
    2. negative log ``x = -log(max(x, eps_float32))``, turning intensities into line integrals (bone bright);
    3. optionally ``x -= gaussian_filter(x, lowpass_sigma)`` (DAX: sigma 20 mm / 0.305 mm in pixels; off in its
       published training command);
    4. ``x = (x - ROI.min()) / (ROI.max() - ROI.min())`` with the ROI of the transformed image, clipped to [0, 1].

    With ``neglog=False`` steps 1-3 are skipped (DAX v2's other branch). Degenerate inputs give zeros instead of
    dividing by zero: a constant ROI (also a constant image), and ``cval <= 0`` (an all-zero ROI; DAX warned and
    returned a bare array where a tuple was expected), which also warns.

    This expects raw detector images (high = more photons, as in MONOCHROME2 raw data). Display images, such as
    8-bit PNG/JPEG chest X-rays, are already processed for viewing (bone bright): I0 + neglog would invert them
    again, so use ``"minmax"`` in :func:`xray_preprocessing` for them.

    Args:
        img: a 2-D ``[H, W]`` or ``[1, H, W]`` array or tensor (MetaTensor metadata is kept).
        subtract_lowpass: subtract the Gaussian low-pass image after the negative log.
        lowpass_sigma: its sigma in pixels.
        contrast_factor: ``c`` of the I0 clip value.
        roi_fraction: fraction of each axis in the central ROI.
        neglog: apply steps 1-3.

    Returns:
        float32 values in [0, 1], of the input's type and shape.

    Raises:
        ValueError: the input is not one 2-D image.
    """
    x = convert_to_numpy(img).astype(np.float32)
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[0] == 1)):
        raise ValueError(f"dax_preprocess expects an [H, W] or [1, H, W] image, got shape {tuple(x.shape)}.")
    plane = x.reshape(x.shape[-2:])
    roi = _roi(plane.shape, roi_fraction)
    out = np.zeros_like(plane)
    valid = True
    if neglog:
        cval = float(np.median(plane[roi])) + contrast_factor * float(np.std(plane[roi], dtype=np.float64))
        valid = cval > 0
        if valid:
            plane = -np.log(np.maximum(np.minimum(plane, cval) / np.float32(cval), np.float32(_EPS)))
            if subtract_lowpass:
                plane = plane - gaussian_filter(plane, lowpass_sigma)
        else:
            warnings.warn(
                f"DAX I0 clip value {cval:g} is not positive (an all-zero ROI?); returning zeros.", stacklevel=2
            )
    if valid:
        lo, hi = float(plane[roi].min()), float(plane[roi].max())
        if hi > lo:
            out = np.clip((plane - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out = out.reshape(x.shape)
    if isinstance(img, torch.Tensor):
        return convert_to_dst_type(torch.from_numpy(out), img, dtype=torch.float32)[0]
    return out


class DAXPreprocessd(MapTransform):
    """DAX preprocessing (:func:`dax_preprocess`, version A) of raw X-ray images.

    Args:
        keys: image keys.
        subtract_lowpass: subtract the Gaussian low-pass image after the negative log.
        lowpass_sigma: its sigma in pixels.
        contrast_factor: ``c`` of the I0 clip value ``median + c * std``.
        roi_fraction: fraction of each axis in the central ROI.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        subtract_lowpass: bool = False,
        lowpass_sigma: float = DAX_LOWPASS_SIGMA,
        contrast_factor: float = 3.0,
        roi_fraction: float = 0.75,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kwargs = {
            "subtract_lowpass": subtract_lowpass,
            "lowpass_sigma": lowpass_sigma,
            "contrast_factor": contrast_factor,
            "roi_fraction": roi_fraction,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Preprocess the images of one sample."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = dax_preprocess(d[key], **self.kwargs)
        return d


class RandDAXPreprocessd(RandomizableTransform, MapTransform):
    """DAX's randomised preprocessing (version B): the negative log with probability ``prob``, else min-max only.

    Per sample, with probability ``prob`` the images get I0 normalisation (with a contrast factor drawn from
    ``contrast_range``), the negative log and the optional low-pass subtraction; otherwise they stay in the raw
    intensity domain (not inverted). Both branches end with the ROI min-max scaling and clipping of
    :func:`dax_preprocess`. The draws come from the transform's own generator (``set_random_state``); all keys
    of a sample share them.

    Args:
        keys: image keys.
        prob: probability of the negative-log branch.
        contrast_range: range of the uniform contrast factor ``c``.
        subtract_lowpass: subtract the Gaussian low-pass image after the negative log.
        lowpass_sigma: its sigma in pixels.
        roi_fraction: fraction of each axis in the central ROI.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        contrast_range: tuple[float, float] = (2.0, 3.5),
        subtract_lowpass: bool = False,
        lowpass_sigma: float = DAX_LOWPASS_SIGMA,
        roi_fraction: float = 0.75,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not contrast_range[0] <= contrast_range[1]:
            raise ValueError(f"contrast_range must be increasing, got {contrast_range}.")
        self.contrast_range = contrast_range
        self.kwargs = {
            "subtract_lowpass": subtract_lowpass,
            "lowpass_sigma": lowpass_sigma,
            "roi_fraction": roi_fraction,
        }
        self._contrast = float(np.mean(contrast_range))

    def randomize(self, data: Any = None) -> None:
        """Draw the branch and the contrast factor of the next sample."""
        super().randomize(None)
        self._contrast = float(self.R.uniform(*self.contrast_range))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Preprocess the images of one sample."""
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = dax_preprocess(d[key], contrast_factor=self._contrast, neglog=self._do_transform, **self.kwargs)
        return d


def xray_preprocessing(
    name: str,
    keys: KeysCollection = "image",
    deterministic: bool = False,
    subtract_lowpass: bool = False,
    **kwargs: Any,
) -> MapTransform:
    """The intensity preprocessing named in a bundle config.

    - ``"dax"``: :class:`DAXPreprocessd`, for raw detector images (16-bit TIFF/DICOM, air bright);
    - ``"dax_v2"``: :class:`RandDAXPreprocessd`, the same with the negative log applied at random;
    - ``"minmax"``: per-image min-max scaling to [0, 1] (MONAI ``ScaleIntensityd``; a constant image gives zeros),
      for display images that are already processed for viewing (bone bright), such as the 8-bit chest X-ray
      JPEGs in ``data/xray/kermany``. The DAX I0/negative log would invert those again.

    Args:
        name: one of :data:`PREPROCESSING_NAMES`.
        keys: image keys.
        deterministic: for evaluation and monitoring: ``"dax_v2"`` becomes ``"dax"`` (the negative log always
            applied), so that every call gives the same image.
        subtract_lowpass: the DAX low-pass subtraction (``"dax"`` / ``"dax_v2"`` only).
        **kwargs: other options of the DAX transforms (none for ``"minmax"``).

    Raises:
        ValueError: unknown name, or options (``subtract_lowpass`` included) given to ``"minmax"``.
    """
    if deterministic and name == "dax_v2":
        name = "dax"
    if name == "minmax":
        if kwargs or subtract_lowpass:
            options = sorted([*kwargs, *(["subtract_lowpass"] if subtract_lowpass else [])])
            raise ValueError(f"'minmax' preprocessing takes no options, got {options}.")
        return ScaleIntensityd(keys, minv=0.0, maxv=1.0, dtype=np.float32)
    if name == "dax":
        return DAXPreprocessd(keys, subtract_lowpass=subtract_lowpass, **kwargs)
    if name == "dax_v2":
        return RandDAXPreprocessd(keys, subtract_lowpass=subtract_lowpass, **kwargs)
    raise ValueError(f"Unknown X-ray preprocessing {name!r}; choose from {PREPROCESSING_NAMES}.")
