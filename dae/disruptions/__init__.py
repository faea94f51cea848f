"""Disruptions for Disruptive Autoencoder (DAE) pretraining: the model reconstructs the clean crop.

Steps, always applied in the order of the paper and the official code (``all``): additive Gaussian noise
(std ``sqrt(variance)``, as the reference code), down/up-sampling by ``interpolate`` and local masking.

Differences from the reference code:

* Local masking is done in image space by default: random cubic blocks of ``mask_patch_size`` voxels are filled,
  independently per sample. The reference code instead zeroes the same ``int(ratio * C)`` embedding channels of
  every token and sample after the patch embedding; that behaviour is available with
  ``BatchDisruption(local_mask_mode="reference")`` and :func:`embedding_channel_mask`.
* Down/up-sampling offers ``"nearest"`` (the reference code, the default) and ``"trilinear"`` (the paper).

``functional`` holds batch functions for ``(B, C, *spatial)`` tensors on any device, ``batch`` the callable
:class:`BatchDisruption` and ``transforms`` seedable MONAI array and dictionary transforms.
"""

from __future__ import annotations

from dae.disruptions.batch import CHOICE_ALIASES, DISRUPTION_STEPS, LOCAL_MASK_MODES, BatchDisruption, parse_choice
from dae.disruptions.functional import (
    RESAMPLE_MODES,
    add_gaussian_noise,
    down_up_sample,
    embedding_channel_mask,
    expand_cell_mask,
    local_mask,
    local_mask_grid,
    mask_grid_shape,
    num_masked_cells,
)
from dae.disruptions.transforms import (
    RandAdditiveNoise,
    RandAdditiveNoised,
    RandDisruption,
    RandDisruptiond,
    RandDownUpSample,
    RandDownUpSampled,
    RandLocalMask,
    RandLocalMaskd,
)

__all__ = [
    "CHOICE_ALIASES",
    "DISRUPTION_STEPS",
    "LOCAL_MASK_MODES",
    "RESAMPLE_MODES",
    "BatchDisruption",
    "RandAdditiveNoise",
    "RandAdditiveNoised",
    "RandDisruption",
    "RandDisruptiond",
    "RandDownUpSample",
    "RandDownUpSampled",
    "RandLocalMask",
    "RandLocalMaskd",
    "add_gaussian_noise",
    "down_up_sample",
    "embedding_channel_mask",
    "expand_cell_mask",
    "local_mask",
    "local_mask_grid",
    "mask_grid_shape",
    "num_masked_cells",
    "parse_choice",
]
