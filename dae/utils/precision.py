"""The one mixed-precision setting of the project: ``amp`` is ``"none"``, ``"bf16"`` or ``"fp16"`` everywhere."""

from __future__ import annotations

import torch

__all__ = ["AMP_DTYPES", "AMP_MODES", "amp_dtype"]

#: ``amp`` value -> autocast dtype (None: full precision)
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = tuple(AMP_DTYPES)


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting.

    Args:
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        ValueError: for any other value, naming it and the accepted ones.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_MODES)}, got {amp!r}")
    return AMP_DTYPES[amp]
