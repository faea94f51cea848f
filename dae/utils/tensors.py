"""Tensor helpers shared by the training, evaluation and inference loops."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["autocast", "min_max", "plain_tensor"]


def plain_tensor(value: Any) -> torch.Tensor:
    """``value`` as a plain ``torch.Tensor``: MONAI ``MetaTensor`` metadata dropped, lists and arrays converted."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed-precision context on ``device`` with ``dtype``; a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def min_max(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` scaled to [0, 1] by its minimum and maximum over ``dims`` (all dimensions when None), for pictures.

    A constant slice maps to 0 rather than dividing by zero.
    """
    dims = tuple(range(x.ndim)) if dims is None else dims
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-8)
