"""The KoLeo regulariser of DINOv2 (Oquab et al., 2023): spread a batch's embeddings over the unit sphere.

It is the Kozachenko-Leonenko differential-entropy estimator, up to constants: each L2-normalised embedding is
pushed away from its nearest neighbour in the batch. DINOv2 adds it, weighted 0.1, on the student's CLS tokens of
each global crop; its ablation credits it with most of its nearest-neighbour retrieval gains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over the L2-normalised rows ``x_i`` of a batch.

    ``nn(i)`` is the nearest other row by cosine similarity (on the unit sphere, also by Euclidean distance).
    The neighbour search carries no gradient; the distance does, so minimising the loss moves each embedding
    away from its neighbour. Computed in fp32 outside autocast.

    Args:
        eps: added to the distances before the log (and used by the normalisation), so that duplicates give a
            large finite loss rather than infinity.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The loss of one batch.

        Args:
            features: ``(B, D)`` embeddings, B >= 2, any dtype.

        Returns:
            The fp32 scalar loss.
        """
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs (B, D) features with B >= 2, got shape {tuple(features.shape)}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = x @ x.t()
                similarity.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
                neighbour = similarity.argmax(dim=1)
            distance = (x - x[neighbour]).pow(2).sum(dim=-1).add(self.eps**2).sqrt()
            return -torch.log(distance + self.eps).mean()
