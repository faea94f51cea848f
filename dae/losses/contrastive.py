"""Supervised contrastive loss across modalities (Khosla et al., 2020), gathered over ranks.

The DAE paper's cross-modal contrastive term pulls together embeddings of volumes of the same modality
and pushes apart the others. The official code instead took dot products of the un-normalised
20,736-dim flattened bottleneck, scaled them by ``exp(t)``, used as targets the batch-order-dependent
indices returned by ``np.unique`` and did not gather across GPUs, so the loss depended on the order of
the batch and overflowed to NaN under mixed precision. This module implements the paper's stated
intent instead: L2-normalised projections, cosine similarity over a temperature, positives = the other
samples with the same label, computed in fp32 outside autocast, contrasted against the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dae.utils.dist import all_gather_with_grad, get_rank

__all__ = ["SupervisedContrastiveLoss"]


class SupervisedContrastiveLoss(nn.Module):
    """Supervised contrastive (SupCon, "L_out") loss.

    For anchor ``i`` with positives ``P(i)`` (the other samples with the same label) and similarities
    ``s_ij = cos(z_i, z_j) / temperature``::

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )

    and the loss is the mean of ``L_i`` over the anchors that have at least one positive (zero, with a
    graph, when none has). The result does not depend on the order of the batch or on the label values.

    In a process group the features and labels of all ranks are gathered; the anchors are this rank's
    samples, contrasted against the gathered batch. Gradients flow through this rank's features only
    (see :func:`dae.utils.dist.all_gather_with_grad`). Every rank must pass the same batch size.

    Args:
        temperature: softmax temperature, > 0.
        gather_distributed: contrast against the samples of all ranks when a process group is running.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the loss for this rank's anchors.

        Args:
            features: embeddings, shape (B, D); any dtype (the loss is computed in fp32).
            labels: integer labels (e.g. modality ids), shape (B,).

        Returns:
            Scalar fp32 loss.
        """
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"expected features (B, D) and labels (B,), got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = F.normalize(features.float(), dim=1)
            labels = labels.to(z.device)
            all_z, all_labels, offset = z, labels, 0
            if self.gather_distributed:
                all_z = all_gather_with_grad(z)
                # Labels carry no gradient, so this is a plain gather.
                all_labels = all_gather_with_grad(labels)
                offset = get_rank() * z.shape[0]

            anchor_index = torch.arange(z.shape[0], device=z.device) + offset
            self_mask = anchor_index[:, None] == torch.arange(all_z.shape[0], device=z.device)[None, :]
            positives = (labels[:, None] == all_labels[None, :]) & ~self_mask
            num_positives = positives.sum(dim=1)
            has_positive = (num_positives > 0).float()

            logits = (z @ all_z.T / self.temperature).masked_fill(self_mask, float("-inf"))
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / num_positives.clamp(min=1)
            # A weighted mean rather than indexing by the mask: no host synchronisation; 0 without positives.
            return (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)
