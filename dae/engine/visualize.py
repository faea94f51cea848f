"""Pictures for TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["orthogonal_slices_grid"]


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
        A (1, H, W) float tensor in [0, 1], for ``SummaryWriter.add_image(..., dataformats="CHW")``.
    """
    if not volumes:
        raise ValueError("volumes is empty")
    ref = volumes[0][0].detach().float().cpu()
    lo, hi = float(ref.min()), float(ref.max())
    scale = hi - lo if hi > lo else 1.0
    rows = []
    for vol in volumes:
        if vol.ndim != 4:
            raise ValueError(f"expected (C, X, Y, Z) volumes, got shape {tuple(vol.shape)}")
        v = ((vol[0].detach().float().cpu() - lo) / scale).clamp(0, 1)
        x, y, z = (s // 2 for s in v.shape)
        tiles = [v[x, :, :], v[:, y, :], v[:, :, z]]
        # Transpose and flip so that the last spatial axis points up, as radiologists view RAS volumes.
        tiles = [F.interpolate(t.T.flip(0)[None, None], size=(size, size), mode="bilinear")[0, 0] for t in tiles]
        row = torch.ones(size, 3 * size + 2 * pad)
        for i, tile in enumerate(tiles):
            row[:, i * (size + pad) : i * (size + pad) + size] = tile
        rows.append(row)
    grid = torch.ones(len(rows) * size + (len(rows) - 1) * pad, 3 * size + 2 * pad)
    for i, row in enumerate(rows):
        grid[i * (size + pad) : i * (size + pad) + size] = row
    return grid[None]
