"""Pretraining losses: voxel reconstruction and the cross-modal supervised contrastive term.

The contrastive term differs from the official DAE code, which used un-normalised 20,736-dim bottleneck
dot products scaled by ``exp(t)``, batch-order-dependent targets from ``np.unique`` and no gather across
GPUs (its loss went NaN under AMP); we implement the paper's stated intent, see
:mod:`dae.losses.contrastive`.
"""

from __future__ import annotations

from dae.losses.contrastive import SupervisedContrastiveLoss
from dae.losses.dae import DAELoss
from dae.losses.dino import DINOLoss
from dae.losses.koleo import KoLeoLoss
from dae.losses.reconstruction import ReconstructionLoss

__all__ = ["DAELoss", "DINOLoss", "KoLeoLoss", "ReconstructionLoss", "SupervisedContrastiveLoss"]
