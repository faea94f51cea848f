"""Segment volumes with a fine-tuned network and write label maps in the geometry of their inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from monai.data import decollate_batch
from monai.transforms import Transform
from torch import nn
from tqdm.auto import tqdm

from dae.models.pretrained import load_model_weights
from dae.utils.precision import amp_dtype
from dae.utils.tensors import autocast

__all__ = ["run_inference"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def run_inference(
    network: nn.Module,
    checkpoint: str | Path,
    loader: Iterable[dict[str, Any]],
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
    postprocessing: Transform,
    device: str | torch.device = "cpu",
    amp: str = "none",
    image_key: str = "image",
    pred_key: str = "pred",
) -> int:
    """Run ``inferer`` over every volume of ``loader`` and hand each prediction to ``postprocessing``.

    ``postprocessing`` receives one decollated dictionary per volume with the logits under ``pred_key`` (a
    MetaTensor carrying the image's metadata and applied transforms), typically argmax, ``Invertd`` back to
    the input's grid and ``SaveImaged``, as in the bundles' ``inference.yaml``.

    Args:
        network: the segmentation network (architecture of the checkpoint).
        checkpoint: fine-tuned weights, loaded completely (:func:`~dae.models.pretrained.load_model_weights`).
        loader: batches of volumes under ``image_key``.
        inferer: e.g. ``monai.inferers.SlidingWindowInferer``; called as ``inferer(images, network)``.
        postprocessing: applied to each decollated volume.
        device: where to run.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
        image_key: batch key of the images.
        pred_key: key the logits are stored under.

    Returns:
        The number of volumes processed.
    """
    device, dtype = torch.device(device), amp_dtype(amp)
    network = load_model_weights(network, checkpoint).to(device).eval()
    count = 0
    for batch in tqdm(loader, desc="inference", mininterval=1.0):
        images = batch[image_key].to(device)
        with autocast(device, dtype):
            batch[pred_key] = inferer(images, network).float()
        for item in decollate_batch(batch):
            postprocessing(item)
            count += 1
    logger.info("segmented %d volumes", count)
    return count
