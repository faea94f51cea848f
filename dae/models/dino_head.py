"""DINO's projection head: an MLP, L2 normalisation and a weight-normalised prototype layer.

State-dict keys (with ``nlayers=3``; BatchNorm layers, when ``use_bn``, shift the indices exactly as in DINO)::

    mlp.0.weight / bias     Linear(in_dim, hidden_dim)         (mlp.0, mlp.1=BN, mlp.3, mlp.4=BN, mlp.6 with BN)
    mlp.2.weight / bias     Linear(hidden_dim, hidden_dim)
    mlp.4.weight / bias     Linear(hidden_dim, bottleneck_dim)
    last_layer.parametrizations.weight.original0   g, [out_dim, 1]
    last_layer.parametrizations.weight.original1   v, [out_dim, bottleneck_dim]

With ``nlayers=1`` the MLP is a single Linear and its keys are ``mlp.weight`` / ``mlp.bias``. The last layer uses
``torch.nn.utils.parametrizations.weight_norm`` (weight = g * v / ||v|| row-wise), so the keys are DAX's; DINO's
checkpoints use the older ``torch.nn.utils.weight_norm`` and call the same tensors ``last_layer.weight_g`` /
``last_layer.weight_v`` (:mod:`dae.models.dino_checkpoint` converts them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]

# Larger than F.normalize's default 1e-12, which underflows to 0 in fp16.
_NORMALIZE_EPS = 1e-6


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised Linear without bias (the prototypes).

    Args:
        in_dim: backbone feature size.
        out_dim: number of prototypes K (the softmax size of the DINO loss).
        use_bn: BatchNorm after each hidden Linear.
        norm_last_layer: freeze the weight-norm magnitude g at 1, so every prototype keeps unit norm.
        nlayers: number of Linear layers in the MLP, at least 1.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: output size of the MLP (input of the last layer).

    Raises:
        ValueError: when ``nlayers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            for d_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers.append(nn.Linear(d_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project backbone features onto the prototypes.

        Args:
            x: features, shape (B, in_dim).

        Returns:
            Logits (before the temperature softmax), shape (B, out_dim).
        """
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=_NORMALIZE_EPS)
        return self.last_layer(x)
