"""DINO's multi-crop wrapper: one backbone pass per crop resolution, one head pass for all crops."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    """Backbone followed by a head, applied to a list of crop batches.

    The attribute names give DINO's state-dict keys ``backbone.*`` and ``head.*``.

    Args:
        backbone: maps images (B, C, H, W) to pooled features (B, D) (any H, W it supports).
        head: maps features (B, D) to outputs (B, out_dim), e.g. :class:`~dae.models.dino_head.DINOHead`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: list[torch.Tensor] | torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone once per run of consecutive crops of equal spatial size, then the head once.

        Args:
            crops: one batch (B, C, H, W) or a list of batches, e.g. ``[global1, global2, local1, ...]`` where
                each entry holds the same view of every image in the batch.
            return_features: also return the backbone features the head received (e.g. for a regulariser on
                them such as :class:`~dae.losses.KoLeoLoss`).

        Returns:
            Head outputs, shape (sum of batch sizes, out_dim), in the order of ``crops``
            (``[g1 batch, g2 batch, l1 batch, ...]``, as the DINO loss expects); with ``return_features``, the
            pair (head outputs, backbone features of shape (sum of batch sizes, D)) in the same order.

        Raises:
            ValueError: for an empty list.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("MultiCropWrapper needs at least one crop batch")
        groups: list[list[torch.Tensor]] = [[crops[0]]]
        for crop in crops[1:]:
            if crop.shape[-2:] == groups[-1][0].shape[-2:]:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        features = torch.cat([self.backbone(torch.cat(group)) for group in groups])
        output = self.head(features)
        return (output, features) if return_features else output
