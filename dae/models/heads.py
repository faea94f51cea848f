"""Projection heads applied to pooled backbone features."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """MLP mapping a pooled feature vector to the embedding used by the contrastive loss.

    ``num_layers`` Linear layers with GELU between them and no activation after the last one;
    ``num_layers=1`` is a single Linear layer (``hidden_dim`` is then unused).

    Args:
        in_dim: size of the input feature vector.
        hidden_dim: width of the hidden layers.
        out_dim: size of the output embedding.
        num_layers: number of Linear layers, at least 1.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project pooled features.

        Args:
            x: pooled features, shape (B, in_dim).

        Returns:
            Embeddings, shape (B, out_dim).
        """
        return self.mlp(x)
