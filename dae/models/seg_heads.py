"""Segmentation heads on a frozen backbone's patch grid, as in DINOv2ForRadiology's ``segmentation.py``.

``"linear"`` (:class:`LinearSegHead`)
    a 1x1 convolution (weights N(0, 0.01), zero bias) followed by bilinear upsampling to the image size;
``"unet"`` (:class:`UNetSegHead`)
    a small up-sampling decoder (transposed convolutions and conv-BN-ReLU blocks) on the same grid.

Both map a grid ``[B, in_dim, h, w]`` and an image size to logits ``[B, num_classes, *size]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODERS", "LinearSegHead", "UNetSegHead", "build_seg_head"]

#: the decoders :func:`build_seg_head` knows
DECODERS = ("linear", "unet")


class LinearSegHead(nn.Module):
    """1x1 convolution on the patch grid, then bilinear upsampling of the logits to the image size.

    Args:
        in_dim: channels of the patch grid (the extractor's ``embed_dim``).
        num_classes: output classes, background included.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, num_classes, *size]`` of a grid ``[B, in_dim, h, w]``."""
        return F.interpolate(self.conv(grid), size=tuple(size), mode="bilinear", align_corners=False)


class UNetSegHead(nn.Module):
    """A small up-sampling decoder on the last patch grid (U-Net-like, without skips: there is one grid).

    Each of ``num_up_blocks`` blocks doubles the resolution with ``ConvTranspose2d(k=2, s=2)`` and refines with
    ``Conv3x3 + BatchNorm + ReLU``; widths go ``hidden_dim, hidden_dim / 2, ...`` (at least ``min_dim``). A 1x1
    convolution gives the logits, bilinearly resized to the image size (exact for patch sizes that are powers
    of two with ``log2(patch)`` blocks; otherwise the last factor, e.g. 14 / 8, is interpolated). With the
    defaults it has about 0.44 M parameters on a ViT-S grid (D = 384), 0.63 M on ViT-B (D = 768).

    Args:
        in_dim: channels of the patch grid.
        num_classes: output classes, background included.
        num_up_blocks: number of x2 up-sampling blocks.
        hidden_dim: width after the first block.
        min_dim: smallest width.

    Raises:
        ValueError: for ``num_up_blocks < 1``.
    """

    def __init__(
        self, in_dim: int, num_classes: int, num_up_blocks: int = 4, hidden_dim: int = 128, min_dim: int = 16
    ) -> None:
        super().__init__()
        if num_up_blocks < 1:
            raise ValueError(f"num_up_blocks must be >= 1, got {num_up_blocks}")
        blocks: list[nn.Module] = []
        width = in_dim
        for index in range(num_up_blocks):
            out = max(hidden_dim // 2**index, min_dim)
            blocks.append(
                nn.Sequential(
                    nn.ConvTranspose2d(width, out, kernel_size=2, stride=2),
                    nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, num_classes, *size]`` of a grid ``[B, in_dim, h, w]``."""
        logits = self.classifier(self.blocks(grid))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


def build_seg_head(decoder: str, in_dim: int, num_classes: int, patch_size: int) -> nn.Module:
    """A fresh head of kind ``decoder`` for a grid of ``in_dim`` channels from patches of ``patch_size`` pixels.

    The U-Net head gets ``log2(patch_size)`` up-sampling blocks (1 to 4) with its default widths.

    Raises:
        ValueError: for an unknown decoder.
    """
    if decoder == "linear":
        return LinearSegHead(in_dim, num_classes)
    if decoder == "unet":
        return UNetSegHead(in_dim, num_classes, num_up_blocks=min(4, max(1, int(math.log2(patch_size)))))
    raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
