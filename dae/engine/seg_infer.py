"""Segment volumes with a fine-tuned network and write label maps in the geometry of their inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import decollate_batch
from monai.transforms import Transform
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dae.engine.seg_eval import load_model_weights
from dae.engine.trainer import AMP_DTYPES
from dae.utils.tensors import autocast

__all__ = ["run_inference"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def run_inference(
    network: nn.Module,
    checkpoint: str | Path,
    loader: DataLoader,
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

    Returns:
        The number of volumes processed.
    """
    device = torch.device(device)
    network = load_model_weights(network, checkpoint).to(device).eval()
    amp_dtype = AMP_DTYPES[amp]
    count = 0
    for batch in tqdm(loader, desc="inference", mininterval=1.0):
        images = batch[image_key].to(device)
        with autocast(device, amp_dtype):
            batch[pred_key] = inferer(images, network).float()
        for item in decollate_batch(batch):
            postprocessing(item)
            count += 1
    logger.info("segmented %d volumes", count)
    return count
