"""Networks: the Disruptive Autoencoder around MONAI's SwinUNETR, its projection head, pretrained-weight loading."""

from __future__ import annotations

from dae.models.dae import DAEOutput, DisruptiveAutoencoder
from dae.models.heads import ProjectionHead
from dae.models.pretrained import PretrainedLoadReport, init_from_pretrained, load_pretrained_swinunetr

__all__ = [
    "DAEOutput",
    "DisruptiveAutoencoder",
    "PretrainedLoadReport",
    "ProjectionHead",
    "init_from_pretrained",
    "load_pretrained_swinunetr",
]
