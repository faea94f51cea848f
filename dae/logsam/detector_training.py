"""Training the text-conditioned heatmap detector on cached image embeddings.

The image encoder is frozen, so each slice's embedding is computed once (:class:`dae.logsam.data.EmbeddingCache`)
and held in memory (:class:`EmbeddedSliceDataset`); the prompt embeddings are one fixed (K, D) tensor, one caption
per tumour class. Every training image is seen with all K prompts: its tumour map is the target of its class's
prompt and an empty map the target of the others (:func:`~dae.logsam.heatmap_detector.heatmap_targets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dae.engine.trainer import Trainer
from dae.logsam.data import EmbeddingCache, read_grey
from dae.logsam.heatmap_detector import (
    box_iou_pairs,
    decode_boxes,
    heatmap_detection_loss,
    heatmap_targets,
    heatmap_to_image,
    mask_to_heatmap,
)
from dae.utils.dist import all_reduce_mean
from dae.utils.seed import restore_rng_state

__all__ = ["EmbeddedSliceDataset", "HeatmapDetectorTrainer", "detection_picture"]

_TRUE_COLOUR = (0.0, 1.0, 0.0)
_PREDICTED_COLOUR = (1.0, 1.0, 0.0)
_HEAT_COLOUR = (1.0, 0.0, 0.0)


class EmbeddedSliceDataset(Dataset):
    """Slices of a LoGSAM datalist with their image embeddings and tumour maps, all held in memory.

    Items: ``features`` (C, h, w) float image embedding, ``target`` (1, h, w) tumour share of each grid cell,
    ``class_index`` (int, the index of the entry's class in ``class_names``), ``box`` (4,) float true box in image
    pixels, ``image_size`` (2,) long (H, W) and ``image`` (the image path, for pictures).

    Args:
        entries: checked entries with a ``mask`` and a tumour ``class`` (see
            :func:`dae.logsam.data.load_logsam_datalist`).
        features: the (C, h, w) embedding of each entry's image, all of one shape.
        class_names: the prompts' classes in prompt order (e.g. ``ClassTable.tumour_names``).
        keep_aspect: the frame convention of the segmenter (see :mod:`dae.logsam.heatmap_detector`).

    Raises:
        ValueError: when the counts differ, or an entry has no mask or a class outside ``class_names`` (naming
            the entry's index and image), or the embeddings differ in shape.
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        features: Sequence[torch.Tensor],
        class_names: Sequence[str],
        keep_aspect: bool = True,
    ) -> None:
        if len(entries) != len(features):
            raise ValueError(f"{len(entries)} entries but {len(features)} embeddings")
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) > 1 or any(len(s) != 3 for s in shapes):
            raise ValueError(f"embeddings must all be (C, h, w) of one shape, got shapes {sorted(shapes)}")
        self.class_names = list(class_names)
        self.items: list[dict[str, Any]] = []
        for index, (entry, feature) in enumerate(zip(entries, features)):
            if "mask" not in entry or entry.get("class") not in self.class_names:
                raise ValueError(
                    f"entry [{index}] {entry.get('image')}: needs a 'mask' and a 'class' in {self.class_names}, got "
                    f"class {entry.get('class')!r}{'' if 'mask' in entry else ' and no mask'}"
                )
            mask = torch.from_numpy(read_grey(entry["mask"]))[None, None]
            self.items.append(
                {
                    "features": feature,
                    "target": mask_to_heatmap(mask, tuple(feature.shape[-2:]), keep_aspect)[0],
                    "class_index": self.class_names.index(entry["class"]),
                    "box": torch.tensor(entry["box"], dtype=torch.float32),
                    "image_size": torch.tensor(mask.shape[-2:]),
                    "image": str(entry["image"]),
                }
            )

    @classmethod
    def from_cache(
        cls,
        entries: Sequence[Mapping[str, Any]],
        cache: EmbeddingCache,
        class_names: Sequence[str],
        keep_aspect: bool = True,
    ) -> EmbeddedSliceDataset:
        """The dataset with each image's embedding taken from (or computed into) ``cache``."""
        features = [cache.get(entry["image"]).features[0] for entry in entries]
        return cls(entries, features, class_names, keep_aspect)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _draw_box(picture: torch.Tensor, box: torch.Tensor, colour: tuple[float, float, float]) -> None:
    """Draw a 1-pixel outline of ``box`` (x1/y1 exclusive) into a (3, H, W) picture, in place; NaN: nothing."""
    if torch.isnan(box).any():
        return
    height, width = picture.shape[-2:]
    x0, y0 = int(box[0].clamp(0, width - 1)), int(box[1].clamp(0, height - 1))
    x1, y1 = int(box[2].clamp(1, width)) - 1, int(box[3].clamp(1, height)) - 1
    value = torch.tensor(colour)[:, None]
    picture[:, [y0, y1], x0 : x1 + 1] = value[..., None]
    picture[:, y0 : y1 + 1, [x0, x1]] = value[..., None]


def detection_picture(
    image: np.ndarray,
    heatmap: torch.Tensor,
    true_box: torch.Tensor,
    predicted_box: torch.Tensor,
    keep_aspect: bool = True,
) -> torch.Tensor:
    """The slice with a heatmap in red, the true box in green and the predicted box in yellow.

    Args:
        image: (H, W) uint8 slice.
        heatmap: (h, w) probabilities of the prompt.
        true_box: (4,) box in image pixels.
        predicted_box: (4,) box in image pixels (NaN: none drawn).
        keep_aspect: the frame convention (see :mod:`dae.logsam.heatmap_detector`).

    Returns:
        (3, H, W) picture in [0, 1].
    """
    grey = torch.from_numpy(image).float() / 255.0
    heat = heatmap_to_image(heatmap[None].cpu(), image.shape, keep_aspect)[0].clamp(0, 1) * 0.6
    colour = torch.tensor(_HEAT_COLOUR)[:, None, None]
    picture = grey * (1.0 - heat) + colour * heat
    _draw_box(picture, true_box, _TRUE_COLOUR)
    _draw_box(picture, predicted_box, _PREDICTED_COLOUR)
    return picture


class HeatmapDetectorTrainer(Trainer):
    """Train a :class:`~dae.logsam.heatmap_detector.TextConditionedHeatmapDetector` on cached embeddings.

    Each batch of an :class:`EmbeddedSliceDataset` runs with all K prompt embeddings; the loss is
    :func:`~dae.logsam.heatmap_detector.heatmap_detection_loss` (cross-entropy over all K maps, soft Dice of the
    true class's map and, with ``peak_weight``, the classification term on the maps' peaks). Validation reports
    ``loss``, ``class_accuracy`` (the class whose prompt's map has the highest peak), ``box_iou`` (mean IoU of the
    box decoded from the true class's map with the true box; no box counts 0), ``recall_at_50`` (share of slices
    with that IoU >= 0.5) and ``box_found`` (share with a box). ``best.pt`` is chosen by ``box_iou``: in the
    dictation pipeline the class comes from the report, and the box of that class's prompt is what the segmenter
    receives.

    Args:
        network: the detector; called as ``network(features (B, C, h, w), prompts (B, K, D))``.
        prompt_embeddings: (K, D) embeddings of the K class captions, in ``class_index`` order.
        dice_weight: weight of the Dice term.
        pos_weight: weight of the tumour side of the cell-wise cross-entropy.
        peak_weight: weight of the classification term (softmax cross-entropy over the K maps' peak logits).
        threshold: probability above which a pixel belongs to a decoded box's region. This default and
            ``peak_weight``'s were chosen on the validation list of ``jsons/logsam_demo.json`` (LiteMedSAM
            embeddings, MiniLM captions): without the classification term the maps localise as well but hardly
            tell the classes apart; 0.3 gave the best validation box IoU of 0.1-0.5.
        relative_threshold: take ``threshold`` as a fraction of each map's peak (see
            :func:`~dae.logsam.heatmap_detector.decode_boxes`).
        flip_probability: chance of mirroring a training slice's embedding and tumour map left-right (the brain
            is roughly symmetric; 0 disables).
        keep_aspect: the frame convention of the segmenter (see :mod:`dae.logsam.heatmap_detector`).
        num_pictures: validation slices shown in TensorBoard (the first ones of the loader).
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer`.
    """

    best_metric = "box_iou"
    best_mode = "max"
    summary_keys = ("loss",)

    def __init__(
        self,
        network: nn.Module,
        prompt_embeddings: torch.Tensor,
        dice_weight: float = 1.0,
        pos_weight: float = 1.0,
        peak_weight: float = 1.0,
        threshold: float = 0.3,
        relative_threshold: bool = False,
        flip_probability: float = 0.0,
        keep_aspect: bool = True,
        num_pictures: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        if prompt_embeddings.ndim != 2:
            raise ValueError(f"prompt_embeddings must be (K, D), got shape {tuple(prompt_embeddings.shape)}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        self.prompts = prompt_embeddings.detach().float().to(self.device)
        self.dice_weight = dice_weight
        self.pos_weight = pos_weight
        self.peak_weight = peak_weight
        self.threshold = threshold
        self.relative_threshold = relative_threshold
        self.flip_probability = flip_probability
        self.keep_aspect = keep_aspect
        self.num_pictures = num_pictures

    def _losses(
        self, network: nn.Module, features: torch.Tensor, batch: Mapping[str, Any], flip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self.to_device(batch["target"], torch.float32)
        if flip is not None:
            features = torch.where(flip[:, None, None, None], features.flip(-1), features)
            target = torch.where(flip[:, None, None, None], target.flip(-1), target)
        targets = heatmap_targets(target, self.to_device(batch["class_index"]), self.prompts.shape[0])
        with self.autocast():
            logits = network(features, self.prompts.expand(features.shape[0], -1, -1))
        return logits, heatmap_detection_loss(logits, targets, self.dice_weight, self.pos_weight, self.peak_weight)

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        features = self.to_device(batch["features"], torch.float32)
        flip = None
        if self.flip_probability > 0:
            flip = torch.rand(features.shape[0], device=self.device) < self.flip_probability
        return self._losses(self.ddp_model, features, batch, flip)[1]

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Loss, class accuracy and box metrics over the validation loader, and a few detection pictures."""
        assert self.val_loader is not None
        outer_rng, _ = self.validation_seeding()
        self.model.eval()
        losses, correct, ious, found, pictures = [], [], [], [], []
        for batch in self.val_loader:
            features = self.to_device(batch["features"], torch.float32)
            logits, loss = self._losses(self.model, features, batch)
            probs = torch.sigmoid(logits.float())
            truth = batch["class_index"].long()
            scores = probs.flatten(2).amax(-1).cpu()
            correct.append(scores.argmax(1) == truth)
            true_maps = probs[torch.arange(len(truth)), truth.to(self.device)]
            boxes = torch.cat(
                [
                    decode_boxes(
                        m[None], tuple(size.tolist()), self.threshold, self.keep_aspect, self.relative_threshold
                    )[0]
                    for m, size in zip(true_maps, batch["image_size"])
                ]
            )
            ious.append(box_iou_pairs(boxes, batch["box"]))
            found.append(~boxes.isnan().any(1))
            losses.append(loss["loss"].detach().cpu().expand(len(truth)))
            for i in range(min(self.num_pictures - len(pictures), len(truth))):
                image = read_grey(batch["image"][i])
                pictures.append(detection_picture(image, true_maps[i], batch["box"][i], boxes[i], self.keep_aspect))
        restore_rng_state(outer_rng)
        iou = torch.cat(ious)
        values = torch.stack(
            [
                torch.cat(losses).mean(),
                torch.cat(correct).float().mean(),
                iou.mean(),
                (iou >= 0.5).float().mean(),
                torch.cat(found).float().mean(),
            ]
        ).to(self.device)
        keys = ("loss", "class_accuracy", "box_iou", "recall_at_50", "box_found")
        metrics = dict(zip(keys, all_reduce_mean(values).tolist()))
        return metrics, ({"validation/detections": _side_by_side(pictures)} if pictures else {})


def _side_by_side(pictures: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """(3, H, W) pictures of one height in a row, ``gap`` white pixels apart."""
    white = torch.ones(3, pictures[0].shape[1], gap)
    parts = [part for picture in pictures for part in (picture, white)][:-1]
    return torch.cat(parts, dim=2)
