"""Tensor helpers shared by the training, evaluation and inference loops."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["autocast", "plain_tensor"]


def plain_tensor(value: Any) -> torch.Tensor:
    """``value`` as a plain ``torch.Tensor``: MONAI ``MetaTensor`` metadata dropped, lists and arrays converted."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed-precision context on ``device`` with ``dtype``; a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
