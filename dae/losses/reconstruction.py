"""Voxel-wise reconstruction loss of the Disruptive Autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionLoss"]

_KINDS = ("l1", "l2")


class ReconstructionLoss(nn.Module):
    """Mean absolute (``"l1"``) or squared (``"l2"``) error over all voxels, computed in fp32.

    Args:
        kind: ``"l1"`` or ``"l2"``.
    """

    def __init__(self, kind: str = "l1") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compare a reconstruction with its target.

        Args:
            input: reconstruction, shape (B, C, *spatial).
            target: clean volume, same shape as ``input``.

        Returns:
            Scalar fp32 loss.
        """
        if input.shape != target.shape:
            raise ValueError(
                f"input and target shapes differ: input {tuple(input.shape)}, target {tuple(target.shape)}"
            )
        loss_fn = F.l1_loss if self.kind == "l1" else F.mse_loss
        return loss_fn(input.float(), target.float())
