"""A small text-conditioned heatmap detector on top of frozen image and sentence encoders.

The detector answers "where is the tumour this prompt names?" with a heatmap over the segmenter's image
embedding grid (LiteMedSAM: 256 x 64 x 64): one logit per cell. It is trained with the tumour mask, reduced to the
grid, as the target of the true class's prompt and an empty map as the target of every other class's prompt, so
the peak of a map also says whether the prompt's class is present: the class whose prompt gives the highest peak
is the predicted class (a classification term on the peaks trains that score directly, see
:func:`heatmap_detection_loss`). The box handed to the box-prompted segmenter is the box of the largest connected
region of the map above a threshold, in image pixels.

Frame convention: the grid covers the segmenter's square input frame. ``keep_aspect=True`` (LiteMedSAM, SAM) means
the image was scaled so that its longest side fills the frame and padded at the bottom and right;
``keep_aspect=False`` (MedSAM ViT-B) means the image was stretched to the square. Square images are the same
either way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = [
    "TextConditionedHeatmapDetector",
    "box_iou_pairs",
    "decode_boxes",
    "heatmap_detection_loss",
    "heatmap_targets",
    "heatmap_to_image",
    "mask_to_heatmap",
]

_CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected regions


def _conv_block(channels_in: int, channels_out: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel, padding=padding, dilation=dilation, bias=False),
        nn.GroupNorm(8, channels_out),
        nn.GELU(),
    )


class TextConditionedHeatmapDetector(nn.Module):
    """Heatmap logits of "this prompt's tumour is here" from a frozen image embedding and a prompt embedding.

    Layers: a 1x1 reduction and a 3x3 convolution of the image embedding (shared by all prompts); FiLM from the
    prompt embedding (a per-channel scale and shift, starting at identity); two 3x3 convolutions, the second
    dilated for context; then the dot product of each cell's feature with a projection of the prompt embedding,
    plus a bias that starts at the log-odds of ``prior`` (tumours cover a few per cent of a slice).

    Args:
        image_channels: channels C of the image embedding (256 for (Lite)MedSAM).
        text_dim: size D of the prompt embedding (384 for MiniLM-L6).
        hidden: channels of the detector's own features (a multiple of 8).
        prior: initial probability of every cell.
        dropout: share of the image embedding's channels zeroed per image in training (``Dropout2d``), against
            over-fitting the few hundred slices a demo trains on.
    """

    def __init__(
        self,
        image_channels: int = 256,
        text_dim: int = 384,
        hidden: int = 64,
        prior: float = 0.02,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden % 8:
            raise ValueError(f"hidden must be a multiple of 8 (GroupNorm with 8 groups), got {hidden}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        self.hidden = hidden
        self.dropout = nn.Dropout2d(dropout)
        self.image = nn.Sequential(_conv_block(image_channels, hidden, 1), _conv_block(hidden, hidden, 3))
        self.film = nn.Linear(text_dim, 2 * hidden)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.refine = nn.Sequential(_conv_block(hidden, hidden, 3), _conv_block(hidden, hidden, 3, dilation=2))
        self.query = nn.Linear(text_dim, hidden)
        self.bias = nn.Parameter(torch.tensor(math.log(prior / (1.0 - prior))))

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Heatmap logits of one prompt, or of K prompts, per image; the image layers run once per image.

        Args:
            features: (B, C, h, w) image embeddings.
            text: (B, D) prompt embeddings (one per image) or (B, K, D) (K per image, e.g. one caption per tumour
                class: ``prompts.expand(B, -1, -1)``).

        Returns:
            (B, 1, h, w) logits for (B, D) prompts, (B, K, h, w) for (B, K, D).
        """
        if text.ndim not in (2, 3) or text.shape[0] != features.shape[0]:
            raise ValueError(f"text must be (B, D) or (B, K, D) with B = {features.shape[0]}, got {tuple(text.shape)}")
        return self._conditioned(self.image(self.dropout(features)), text if text.ndim == 3 else text[:, None])

    def _conditioned(self, shared: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) logits from the shared (B, H, h, w) features and (B, K, D) prompt embeddings."""
        b, k = text.shape[:2]
        scale, shift = self.film(text).chunk(2, dim=-1)
        x = shared[:, None] * (1.0 + scale[..., None, None]) + shift[..., None, None]
        x = self.refine(x.flatten(0, 1)).unflatten(0, (b, k))
        query = self.query(text) / math.sqrt(self.hidden)
        return torch.einsum("bkchw,bkc->bkhw", x, query) + self.bias


def _frame_size(image_size: tuple[int, int], keep_aspect: bool) -> tuple[int, int]:
    """(rows, columns) of the square input frame in image pixels (see the module's frame convention)."""
    height, width = image_size
    return (max(height, width),) * 2 if keep_aspect else (height, width)


def mask_to_heatmap(masks: torch.Tensor, heatmap_size: tuple[int, int], keep_aspect: bool = True) -> torch.Tensor:
    """Tumour masks reduced to the heatmap grid: the tumour share of each cell.

    Args:
        masks: (B, 1, H, W) masks (non-zero = tumour), all of the same image size.
        heatmap_size: (h, w) of the grid.
        keep_aspect: the frame convention (module docstring).

    Returns:
        (B, 1, h, w) float maps in [0, 1].
    """
    height, width = masks.shape[-2:]
    rows, cols = _frame_size((height, width), keep_aspect)
    framed = F.pad((masks != 0).float(), (0, cols - width, 0, rows - height))
    return F.adaptive_avg_pool2d(framed, heatmap_size)


def heatmap_targets(shares: torch.Tensor, class_index: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Training targets of K prompts: each image's tumour map in its class's prompt slot, empty maps elsewhere.

    Args:
        shares: (B, 1, h, w) tumour maps (see :func:`mask_to_heatmap`).
        class_index: (B,) index of each image's prompt in ``0..num_prompts-1``.
        num_prompts: K.

    Returns:
        (B, K, h, w) targets.
    """
    onehot = F.one_hot(class_index.long(), num_prompts).to(shares.dtype)
    return shares * onehot[..., None, None]


def heatmap_detection_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dice_weight: float = 1.0,
    pos_weight: float = 1.0,
    peak_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Cross-entropy over all cells, soft Dice of the maps with a tumour and a classification term, in fp32.

    The classification term trains the score that classifies (the peak of each prompt's map) directly: the
    cross-entropy of the softmax over the K peak logits of an image with a tumour, whose target is its class's
    prompt. The cell-wise terms alone leave the class to a handful of cells under the tumour in the wrong-class
    maps. Being relative, the term stops pushing once the true prompt leads, so it does not shrink the maps.

    Args:
        logits: (B, K, h, w) heatmap logits.
        targets: (B, K, h, w) targets in [0, 1] (see :func:`heatmap_targets`).
        dice_weight: weight of the Dice term.
        pos_weight: weight of the tumour side of the cell-wise cross-entropy (tumours cover few cells).
        peak_weight: weight of the classification term (0: off).

    Returns:
        ``{"loss", "bce", "dice", "peak"}`` scalars; ``dice`` and ``peak`` are 0 when no target has a tumour.
    """
    logits, targets = logits.float(), targets.float()
    weight = torch.tensor(pos_weight, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    present = targets.flatten(2).amax(-1) > 0
    tumour = present.any(1)
    peaks = logits.flatten(2).amax(-1)[tumour]
    peak = F.cross_entropy(peaks, present[tumour].float().argmax(1)) if len(peaks) else logits.new_zeros(())
    probs = torch.sigmoid(logits).flatten(2)[present]
    truth = targets.flatten(2)[present]
    overlap = 2.0 * (probs * truth).sum(-1) + 1.0
    dice = (1.0 - overlap / (probs.sum(-1) + truth.sum(-1) + 1.0)).sum() / present.sum().clamp(min=1)
    return {"loss": bce + dice_weight * dice + peak_weight * peak, "bce": bce, "dice": dice, "peak": peak}


def heatmap_to_image(probs: torch.Tensor, image_size: tuple[int, int], keep_aspect: bool = True) -> torch.Tensor:
    """Heatmaps resampled (bilinear) onto the image's pixels.

    Args:
        probs: (B, h, w) or (B, 1, h, w) maps.
        image_size: (H, W) of the image.
        keep_aspect: the frame convention (module docstring).

    Returns:
        (B, H, W) float maps.
    """
    maps = probs.reshape(-1, 1, *probs.shape[-2:]).float()
    framed = F.interpolate(maps, size=_frame_size(image_size, keep_aspect), mode="bilinear", align_corners=False)
    return framed[:, 0, : image_size[0], : image_size[1]]


def decode_boxes(
    heatmap_probs: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    keep_aspect: bool = True,
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of the largest connected region above ``threshold`` of each heatmap, in image pixels.

    Each map is resampled onto the image (:func:`heatmap_to_image`) before thresholding, so box edges are not
    limited to the grid's cells.

    Args:
        heatmap_probs: (B, h, w) or (B, 1, h, w) probabilities.
        image_size: (H, W) of the images.
        threshold: probability a pixel must exceed to belong to a region; with ``relative``, a fraction of each
            map's peak instead.
        keep_aspect: the frame convention (module docstring).
        relative: threshold each map at ``threshold`` times its own peak, so that every map that is not all zero
            gives a box: for a class the report names, the most likely place even when the detector is unsure.

    Returns:
        ``boxes`` (B, 4) float ``[x0, y0, x1, y1]`` (x1/y1 exclusive), a row of NaN where no pixel exceeds the
        threshold (no box), and ``scores`` (B,): each map's peak probability (defined with or without a box; the
        prompt with the highest score is the predicted class).
    """
    maps = heatmap_to_image(heatmap_probs.detach(), image_size, keep_aspect).cpu()
    scores = heatmap_probs.detach().float().flatten(1).amax(1).cpu()
    limits = threshold * maps.flatten(1).amax(1) if relative else torch.full((maps.shape[0],), threshold)
    boxes = torch.full((maps.shape[0], 4), float("nan"))
    for i, above in enumerate((maps > limits[:, None, None]).numpy()):
        regions, count = ndimage.label(above, structure=_CONNECTIVITY)
        if count == 0:
            continue
        largest = 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
        ys, xs = np.nonzero(regions == largest)
        boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes, scores


def box_iou_pairs(boxes: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes[i]`` with ``other[i]``, both (N, 4) ``[x0, y0, x1, y1]`` (x1/y1 exclusive); 0 for a NaN box."""
    boxes, other = boxes.float(), other.float()
    width = (torch.minimum(boxes[:, 2], other[:, 2]) - torch.maximum(boxes[:, 0], other[:, 0])).clamp(min=0)
    height = (torch.minimum(boxes[:, 3], other[:, 3]) - torch.maximum(boxes[:, 1], other[:, 1])).clamp(min=0)
    overlap = width * height

    def area(b: torch.Tensor) -> torch.Tensor:
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    iou = overlap / (area(boxes) + area(other) - overlap)
    return torch.nan_to_num(iou, nan=0.0)
