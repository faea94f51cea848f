"""Choice parsing and :class:`BatchDisruption`, the on-device disruption of a whole training batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dae.disruptions.functional import (
    add_gaussian_noise,
    check_factor,
    check_mode,
    check_patch_size,
    check_ratio,
    check_variance,
    down_up_sample,
    local_mask,
)

__all__ = ["CHOICE_ALIASES", "DISRUPTION_STEPS", "LOCAL_MASK_MODES", "BatchDisruption", "parse_choice"]

DISRUPTION_STEPS = ("noise", "superres", "local_mask")
"""Step names in the order they are always applied."""

CHOICE_ALIASES: dict[str, tuple[str, ...]] = {
    "noise": ("noise",),
    "denoise": ("noise",),
    "superres": ("superres",),
    "local_mask": ("local_mask",),
    "sld": ("local_mask",),
    "ld": ("local_mask",),
    "all": DISRUPTION_STEPS,
    "none": (),
}
"""Accepted (lower-case) names and the steps they stand for; ``denoise``, ``sld`` and ``LD`` come from the
reference code."""

LOCAL_MASK_MODES = ("image", "reference")


def parse_choice(choice: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise a disruption choice to an ordered tuple of steps.

    Args:
        choice: a name of :data:`CHOICE_ALIASES` (case-insensitive), names joined by ``+`` (``"noise+sld"``),
            or a sequence of such strings.

    Returns:
        The selected steps, without duplicates, in the order of :data:`DISRUPTION_STEPS`.

    Raises:
        ValueError: for an unknown or empty name.
    """
    parts = [choice] if isinstance(choice, str) else list(choice)
    selected: set[str] = set()
    for part in parts:
        for name in str(part).split("+"):
            key = name.strip().lower()
            if key not in CHOICE_ALIASES:
                raise ValueError(f"unknown disruption {name!r} in {choice!r}; valid names: {sorted(CHOICE_ALIASES)}")
            selected.update(CHOICE_ALIASES[key])
    return tuple(step for step in DISRUPTION_STEPS if step in selected)


class BatchDisruption:
    """Disrupt a batch ``(B, C, *spatial)`` on its own device: noise, then down/up-sampling, then local masking.

    Args:
        choice: steps to apply, see :func:`parse_choice`.
        variance: Gaussian noise variance (std ``sqrt(variance)``).
        interpolate: down-sampling factor of the super-resolution step.
        resample_mode: ``"nearest"`` (reference code) or ``"trilinear"``/``"bilinear"``/``"linear"`` (paper).
        mask_ratio: fraction of cells (image mode) or embedding channels (reference mode) to mask.
        mask_patch_size: edge length of the masked cubic blocks in image mode.
        local_mask_mode: ``"image"`` masks blocks of the image here; ``"reference"`` leaves the image alone and
            exposes :attr:`embedding_mask_ratio` so the model zeroes embedding channels like the reference code.
    """

    def __init__(
        self,
        choice: str | Sequence[str] = "all",
        variance: float = 0.1,
        interpolate: float = 4.0,
        resample_mode: str = "nearest",
        mask_ratio: float = 0.6,
        mask_patch_size: int = 16,
        local_mask_mode: str = "image",
    ) -> None:
        check_variance(variance)
        check_factor(interpolate)
        check_mode(resample_mode)
        check_ratio(mask_ratio)
        check_patch_size(mask_patch_size)
        if local_mask_mode not in LOCAL_MASK_MODES:
            raise ValueError(f"local_mask_mode must be one of {LOCAL_MASK_MODES}, got {local_mask_mode!r}")
        self.steps = parse_choice(choice)
        self.variance = variance
        self.interpolate = interpolate
        self.resample_mode = resample_mode
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        self.local_mask_mode = local_mask_mode

    @property
    def embedding_mask_ratio(self) -> float:
        """Fraction of embedding channels the model should zero: ``mask_ratio`` in reference mode when local
        masking is selected, else 0.0."""
        if self.local_mask_mode == "reference" and "local_mask" in self.steps:
            return self.mask_ratio
        return 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return the disrupted batch (same shape, dtype and device as ``x``); ``x`` is not modified.

        The generator is consumed by the noise step, then by the masking step, exactly as when calling
        :func:`add_gaussian_noise`, :func:`down_up_sample` and :func:`local_mask` in that order.
        """
        out = x
        if "noise" in self.steps:
            out = add_gaussian_noise(out, self.variance, generator)
        if "superres" in self.steps:
            out = down_up_sample(out, self.interpolate, self.resample_mode)
        if "local_mask" in self.steps and self.local_mask_mode == "image":
            out = local_mask(out, self.mask_ratio, self.mask_patch_size, generator=generator)
        return out if out is not x else x.clone()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, variance={self.variance}, interpolate={self.interpolate}, "
            f"resample_mode={self.resample_mode!r}, mask_ratio={self.mask_ratio}, "
            f"mask_patch_size={self.mask_patch_size}, local_mask_mode={self.local_mask_mode!r})"
        )
