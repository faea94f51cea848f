"""Pretraining networks: the Disruptive Autoencoder around MONAI's SwinUNETR and its projection head."""

from __future__ import annotations

from dae.models.dae import DAEOutput, DisruptiveAutoencoder
from dae.models.heads import ProjectionHead

__all__ = ["DAEOutput", "DisruptiveAutoencoder", "ProjectionHead"]
