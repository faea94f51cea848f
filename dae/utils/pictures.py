"""Pictures for TensorBoard and PNG files, shared by training (engine) and evaluation.

Every function returns a ``(C, H, W)`` float tensor in [0, 1] (C = 1 or 3), ready for
``SummaryWriter.add_image(..., dataformats="CHW")`` or :func:`save_picture`. Tiling uses
``torchvision.utils.make_grid`` and label colours ``monai.visualize.blend_images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.visualize import blend_images
from torch import nn
from torchvision.utils import make_grid, save_image

from dae.utils.tensors import min_max

__all__ = [
    "attention_picture",
    "crops_picture",
    "label_overlay",
    "orthogonal_slices_grid",
    "overlay_rows",
    "pca_picture",
    "pca_rgb",
    "save_picture",
]


def _grid(tiles: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """``make_grid`` with ``pad`` white pixels between tiles and none around them."""
    grid = make_grid(tiles, nrow=nrow, padding=pad, pad_value=1.0)
    return grid[:, pad:-pad, pad:-pad] if pad else grid


def save_picture(picture: torch.Tensor, path: str | Path) -> Path:
    """Save a ``(1 or 3, H, W)`` picture in [0, 1] as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(picture.detach().float().clamp(0, 1).cpu(), path)
    return path


def orthogonal_slices_grid(volumes: Sequence[torch.Tensor], size: int = 128, pad: int = 2) -> torch.Tensor:
    """Mid-slices of 3D volumes in the three planes, as one grey-scale picture.

    Row ``i`` shows ``volumes[i]`` (first channel); the columns are the slices through the middle of the
    first, second and third spatial axes. Each slice is resized to ``size`` x ``size`` and every row uses
    the intensity range of the first volume (the clean image), clipped to [0, 1].

    Args:
        volumes: tensors of shape (C, X, Y, Z), e.g. clean, disrupted and reconstructed crops.
        size: edge of each tile in pixels.
        pad: gap between tiles in pixels.

    Returns:
        A (1, H, W) float tensor in [0, 1].
    """
    if not volumes:
        raise ValueError("volumes is empty")
    ref = volumes[0][0].detach().float().cpu()
    lo, hi = float(ref.min()), float(ref.max())
    scale = hi - lo if hi > lo else 1.0
    tiles = []
    for vol in volumes:
        if vol.ndim != 4:
            raise ValueError(f"expected (C, X, Y, Z) volumes, got shape {tuple(vol.shape)}")
        v = ((vol[0].detach().float().cpu() - lo) / scale).clamp(0, 1)
        x, y, z = (s // 2 for s in v.shape)
        # Transpose and flip so that the last spatial axis points up, as radiologists view RAS volumes.
        for plane in (v[x, :, :], v[:, y, :], v[:, :, z]):
            tiles.append(F.interpolate(plane.T.flip(0)[None, None], size=(size, size), mode="bilinear")[0])
    return _grid(torch.stack(tiles), nrow=3, pad=pad)[:1]


def label_overlay(
    image: torch.Tensor,
    label: torch.Tensor,
    pred: torch.Tensor,
    size: int = 192,
    num_classes: int | None = None,
) -> torch.Tensor:
    """The image with the label (left) and the prediction (right) in colour, side by side.

    A 3D input shows the axial slice through the label's centre, turned so that anterior is up and the
    patient's right on the left, as radiologists read; a 2D input is shown as it is. Both tiles use the same
    colour per class.

    Args:
        image: ``(C, X, Y, Z)`` or ``(C, H, W)`` image (first channel drawn, min-max scaled).
        label: ``(X, Y, Z)`` or ``(H, W)`` integer label map.
        pred: integer prediction of the same shape.
        size: tile size in pixels.
        num_classes: classes including background, for the colours (default: the largest value shown + 1).

    Returns:
        ``(3, size, 2 * size)`` RGB picture in [0, 1].
    """
    if label.shape != pred.shape or image.shape[1:] != label.shape:
        raise ValueError(f"image {tuple(image.shape)}, label {tuple(label.shape)} and pred {tuple(pred.shape)} differ")
    grey, maps = image[0].detach().float().cpu(), [label.detach().cpu(), pred.detach().cpu()]
    if label.ndim == 3:
        foreground = torch.nonzero(label > 0)
        z = int(foreground[:, 2].float().mean()) if len(foreground) else label.shape[2] // 2
        grey, maps = grey[:, :, z].T.flip(0).flip(1), [m[:, :, z].T.flip(0).flip(1) for m in maps]
    top = max(num_classes - 1 if num_classes else max(int(m.max()) for m in maps), 1)
    grey = min_max(grey)[None]
    tiles = [blend_images(grey, (m.float() / top).clamp(0, 1)[None], alpha=0.55, rescale_arrays=False) for m in maps]
    tiles = [F.interpolate(torch.as_tensor(t)[None].float(), size=(size, size), mode="nearest")[0] for t in tiles]
    return torch.cat(tiles, dim=2)


def overlay_rows(
    images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, num_classes: int, size: int = 160
) -> torch.Tensor:
    """One :func:`label_overlay` row per 2D image: ``images [N, C, H, W]``, ``labels`` and ``preds [N, H, W]``."""
    rows = [label_overlay(i, lab, p, size=size, num_classes=num_classes) for i, lab, p in zip(images, labels, preds)]
    return _grid(torch.stack(rows), nrow=1)


@torch.no_grad()
def attention_picture(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-layer CLS-to-patch attention of a ViT, one row per image: the image, then one map per head.

    Args:
        backbone: a ViT with ``get_last_selfattention`` and ``patch_size``.
        images: ``(B, C, H, W)``; H and W multiples of the patch size.

    Returns:
        A ``(3, H', W')`` picture in [0, 1].
    """
    attn = backbone.get_last_selfattention(images).float()
    b, heads = attn.shape[:2]
    h, w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    maps = attn[:, :, 0, 1:].reshape(b * heads, 1, h, w)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")
    maps = min_max(maps, (1, 2, 3)).reshape(b, heads, *images.shape[-2:])
    grey = min_max(images.float().mean(1, keepdim=True), (1, 2, 3))
    tiles = torch.cat([grey, maps], dim=1).reshape(b * (heads + 1), 1, *images.shape[-2:])
    return make_grid(tiles, nrow=heads + 1, padding=2, pad_value=1.0)


def crops_picture(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first image's crops ``[B, C, h, w]`` side by side, each resized to the first crop's size."""
    size = crops[0].shape[-2:]
    tiles = [F.interpolate(c.float(), size=size, mode="nearest")[0] for c in crops]
    tiles = [min_max(t.mean(0, keepdim=True)) for t in tiles]
    return make_grid(tiles, nrow=len(tiles), padding=2, pad_value=1.0)


def pca_rgb(patch_grid: torch.Tensor) -> torch.Tensor:
    """Colour a patch-feature grid with its first three principal components (the DINO "PCA pictures").

    The components are fitted on all patches given (for a batch, jointly, so colours are comparable across
    images). Each component's sign is fixed so that its largest-magnitude projection is positive, and each
    channel is min-max scaled to [0, 1] (a constant channel becomes 0). With fewer than three components
    available the missing channels are 0.

    Args:
        patch_grid: ``[D, h, w]`` or ``[B, D, h, w]`` features.

    Returns:
        ``[3, h, w]`` or ``[B, 3, h, w]`` float32 in [0, 1].
    """
    if patch_grid.ndim not in (3, 4):
        raise ValueError(f"expected [D, h, w] or [B, D, h, w], got shape {tuple(patch_grid.shape)}")
    single = patch_grid.ndim == 3
    grid = patch_grid[None] if single else patch_grid
    batch, dim, height, width = grid.shape
    points = grid.detach().double().permute(0, 2, 3, 1).reshape(-1, dim)
    points = points - points.mean(dim=0)
    _, _, vh = torch.linalg.svd(points, full_matrices=False)
    projected = points @ vh[:3].T
    peaks = projected.gather(0, projected.abs().argmax(dim=0, keepdim=True))
    projected = torch.where(peaks < 0, -projected, projected)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = torch.where(high > low, (projected - low) / (high - low).clamp(min=1e-12), torch.zeros_like(projected))
    rgb = torch.zeros(points.shape[0], 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    rgb = rgb.reshape(batch, height, width, 3).permute(0, 3, 1, 2).float().contiguous()
    return rgb[0] if single else rgb


def pca_picture(images: torch.Tensor, patch_grid: torch.Tensor) -> torch.Tensor:
    """Rows of (grey image, PCA colours of its patch features): ``images [B, C, H, W]``, ``patch_grid [B, D, h, w]``."""
    colours = F.interpolate(pca_rgb(patch_grid.float()), size=images.shape[-2:], mode="nearest")
    grey = min_max(images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1).cpu())
    tiles = torch.stack([grey, colours.cpu()], 1).flatten(0, 1)
    return make_grid(tiles, nrow=2, padding=2, pad_value=1.0)
