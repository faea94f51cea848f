"""Total DAE pretraining loss: reconstruction plus weighted cross-modal contrastive term.

Unlike the official code (un-normalised bottleneck dot products, batch-order-dependent targets, no
gather across GPUs), the contrastive term is the supervised contrastive loss of
:mod:`dae.losses.contrastive`, which implements the paper's stated intent.
"""

from __future__ import annotations

import torch
from torch import nn

from dae.losses.contrastive import SupervisedContrastiveLoss
from dae.losses.reconstruction import ReconstructionLoss

__all__ = ["DAELoss"]


class DAELoss(nn.Module):
    """``loss = reconstruction + contrastive_weight * contrastive``.

    With ``contrastive_weight == 0`` the contrastive term is not computed (no gather across ranks either,
    which is consistent because the weight is the same on every rank) and is reported as 0.

    Args:
        reconstruction: ``"l1"`` or ``"l2"``, see :class:`ReconstructionLoss`.
        contrastive_weight: weight of the contrastive term, >= 0.
        temperature: temperature of :class:`SupervisedContrastiveLoss`.
    """

    def __init__(self, reconstruction: str = "l1", contrastive_weight: float = 0.03, temperature: float = 0.5) -> None:
        super().__init__()
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        self.reconstruction = ReconstructionLoss(reconstruction)
        self.contrastive = SupervisedContrastiveLoss(temperature=temperature)
        self.contrastive_weight = contrastive_weight

    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        projection: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Compute the total loss and its parts.

        Args:
            reconstruction: network output, shape (B, C, *spatial).
            target: clean volume, same shape as ``reconstruction``.
            projection: projected embeddings, shape (B, D).
            labels: modality labels, shape (B,).

        Returns:
            ``{"loss": total, "reconstruction": recon, "contrastive": unweighted contrastive}``, fp32 scalars.
        """
        recon = self.reconstruction(reconstruction, target)
        skip = self.contrastive_weight == 0
        contrastive = recon.new_zeros(()) if skip else self.contrastive(projection, labels)
        return {
            "loss": recon + self.contrastive_weight * contrastive,
            "reconstruction": recon,
            "contrastive": contrastive,
        }
