"""Fine-tuning Grounding DINO with LoRA on boxed tumour classes, as LoGSAM did, on the project's :class:`Trainer`.

Each training image's caption names its class and ``int(n_pos * 3.0)`` other classes drawn at random (the
reference's negative sampling), so that the model learns which phrase the box belongs to, not only where a
tumour is. The loss is the reference's: the Hungarian matcher with costs class 2, box L1 5, GIoU 1, and the total
``1 * focal CE + 10 * L1 + 1 * GIoU`` on the last decoder layer's predictions (the reference's training log fits
it exactly, e.g. ``0.4830 + 10 * 0.0074 + 0.0458 = 0.6029``).

Hugging Face's own ``outputs.loss`` weighs the classification term 2 (hard-coded in ``transformers`` 5.24; the
config has no class-loss coefficient) and adds the two-stage encoder proposals' losses (``*_enc``), which the
reference did not train; :func:`logsam_loss` sums the reference's three terms from ``outputs.loss_dict`` instead.
:func:`configure_logsam_loss` still sets the config's matcher costs (read by the loss at every call) and its box
coefficients, so that a saved config records them.

Validation takes each image's top-1 box for its own class's caption and reports the mean IoU with the true box
and the share with IoU >= 0.5. Checkpoints hold the adapter only (the frozen weights come from the base model),
so they are small and a resumed run continues exactly; :meth:`GroundingDinoTrainer.export` writes the merged
model as a plain Hugging Face folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import box_convert, box_iou
from torchvision.utils import make_grid

from dae.engine.trainer import Trainer
from dae.logsam.data import read_grey
from dae.logsam.grounding_dino import CaptionTable, class_phrases, join_phrases
from dae.logsam.lora import adapter_state_dict, export_merged
from dae.utils.dist import all_reduce_mean
from dae.utils.seed import restore_rng_state
from dae.utils.tensors import min_max

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import GroundingDinoConfig, GroundingDinoProcessor

__all__ = [
    "LOGSAM_LOSS_WEIGHTS",
    "LOGSAM_MATCHER_COSTS",
    "BoxDataset",
    "GroundingDinoTrainer",
    "box_picture",
    "collate_boxes",
    "configure_logsam_loss",
    "logsam_loss",
    "sample_caption",
]

logger = logging.getLogger(__name__)

#: The reference's loss: total = 1 * focal CE + 10 * L1 + 1 * GIoU (last decoder layer only).
LOGSAM_LOSS_WEIGHTS: Mapping[str, float] = {"loss_ce": 1.0, "loss_bbox": 10.0, "loss_giou": 1.0}
#: The reference's Hungarian matcher costs, as ``GroundingDinoConfig`` attributes.
LOGSAM_MATCHER_COSTS: Mapping[str, float] = {"class_cost": 2.0, "bbox_cost": 5.0, "giou_cost": 1.0}

_MODEL_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")
_PAD_ID = 0  # BERT's [PAD]; Grounding DINO's label maps also treat id 0 as a phrase delimiter


def configure_logsam_loss(config: GroundingDinoConfig) -> None:
    """Set the reference's matcher costs and box loss coefficients on a ``GroundingDinoConfig`` (in place).

    ``class_cost`` 2, ``bbox_cost`` 5, ``giou_cost`` 1; ``bbox_loss_coefficient`` 10, ``giou_loss_coefficient`` 1.
    The classification weight is not a config attribute (see the module docstring and :func:`logsam_loss`).
    """
    for name, value in LOGSAM_MATCHER_COSTS.items():
        setattr(config, name, value)
    config.bbox_loss_coefficient = LOGSAM_LOSS_WEIGHTS["loss_bbox"]
    config.giou_loss_coefficient = LOGSAM_LOSS_WEIGHTS["loss_giou"]


def logsam_loss(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's weighted total and its three terms, in fp32, from a Grounding DINO ``outputs.loss_dict``.

    Returns:
        ``{"loss", "loss_ce", "loss_bbox", "loss_giou"}`` as scalar tensors.
    """
    terms = {key: loss_dict[key].float() for key in LOGSAM_LOSS_WEIGHTS}
    total = sum(LOGSAM_LOSS_WEIGHTS[key] * value for key, value in terms.items())
    return {"loss": total, **terms}


# ---------------------------------------------------------------------------------------------------- captions
def sample_caption(
    positive_classes: Sequence[str],
    all_classes: Sequence[str],
    negative_rate: float = 3.0,
    *,
    rng: np.random.RandomState | np.random.Generator,
    phrases: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, int]]:
    """A training caption: the image's classes and randomly drawn other classes, in random order.

    As the reference: ``max(1, int(n_pos * negative_rate))`` negatives (none for a rate of 0), lower-case
    phrases separated by ``" . "``. Unlike the reference, the order is shuffled (the reference put the positives
    first, a position the model could learn) and negatives are drawn without replacement, at most all other
    classes (the reference repeated classes when it ran short, which would give one class two phrases).

    Args:
        positive_classes: the classes boxed in the image (repeats count once).
        all_classes: every class a caption may name.
        negative_rate: negatives per positive class.
        rng: the random generator.
        phrases: ``class -> caption phrase``; default the class name itself.

    Returns:
        ``(caption, labels)`` where ``labels[class]`` is the index of the class's phrase in the caption: the
        ``class_labels`` value Grounding DINO's label maps give that phrase.

    Raises:
        ValueError: for a positive class outside ``all_classes`` or a rate below 0.
    """
    positives = list(dict.fromkeys(positive_classes))
    unknown = [name for name in positives if name not in all_classes]
    if unknown:
        raise ValueError(f"classes {unknown} are not among the caption classes {list(all_classes)}")
    if negative_rate < 0:
        raise ValueError(f"negative_rate must be >= 0, got {negative_rate}")
    others = [name for name in all_classes if name not in positives]
    wanted = max(1, int(len(positives) * negative_rate)) if negative_rate > 0 else 0
    count = min(wanted, len(others))
    negatives = [others[i] for i in rng.choice(len(others), size=count, replace=False)] if count else []
    chosen = positives + negatives
    names = [chosen[i] for i in rng.permutation(len(chosen))]
    caption = join_phrases([phrases[name] if phrases is not None else name for name in names])
    return caption, {name: names.index(name) for name in positives}


# ---------------------------------------------------------------------------------------------------- data
class BoxDataset(Dataset):
    """Datalist entries as Grounding DINO training samples: image, sampled caption and the normalised box.

    Each entry needs ``image`` (an 8-bit grey PNG, relative to ``base_dir`` or absolute), ``class`` (a detectable
    class) and ``box`` (``[x0, y0, x1, y1]`` pixels, x1/y1 exclusive), e.g. from
    :func:`dae.logsam.data.load_logsam_datalist`. The grey image is repeated to RGB and goes through the
    processor (resize, ImageNet normalisation); the caption comes from :func:`sample_caption` with the dataset's
    generator, which the trainer re-seeds every epoch (``set_random_state``), so a resumed run draws the same
    captions.

    Args:
        entries: the datalist entries.
        processor: the model's ``GroundingDinoProcessor``.
        classes: a :class:`~dae.logsam.classes.ClassTable` or a mapping ``class -> caption phrase`` of the
            detectable classes.
        base_dir: the folder relative image paths start from (default: the working directory).
        negative_rate: negative classes per positive in the caption; 0 gives the class's own caption, as at
            inference (use it for validation).
        seed: the generator's seed until the trainer re-seeds it.

    Raises:
        ValueError: naming every entry without ``image``, ``class`` or a 4-number ``box``, or whose class has no
            caption.
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        processor: GroundingDinoProcessor,
        classes: CaptionTable | Mapping[str, str],
        base_dir: str | Path | None = None,
        negative_rate: float = 3.0,
        seed: int = 0,
    ) -> None:
        if not entries:
            raise ValueError("BoxDataset needs at least one entry")
        self.phrases = class_phrases(classes)
        problems = [f"  [{i}] {problem}" for i, entry in enumerate(entries) for problem in self._problems(entry)]
        if problems:
            raise ValueError("\n".join([f"{len(problems)} problems of datalist entries for the detector:", *problems]))
        self.entries = list(entries)
        self.processor = processor
        self.base_dir = Path(base_dir) if base_dir is not None else Path()
        self.negative_rate = negative_rate
        self.R = np.random.RandomState(seed)

    def _problems(self, entry: Mapping[str, Any]) -> list[str]:
        problems = [
            f"key '{key}' is missing (keys: {sorted(entry)})" for key in ("image", "class", "box") if key not in entry
        ]
        if "class" in entry and entry["class"] not in self.phrases:
            problems.append(f"key 'class' ({entry['class']!r}): no detector caption; classes: {list(self.phrases)}")
        box = entry.get("box")
        numbers = isinstance(box, Sequence) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if "box" in entry and not numbers:
            problems.append(f"key 'box' ({box!r}): must be 4 numbers [x0, y0, x1, y1]")
        return problems

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> BoxDataset:
        """Re-seed the caption sampling (MONAI's ``set_rnd`` calls this, as for its random transforms)."""
        self.R = state if state is not None else np.random.RandomState(seed)
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``pixel_values`` (3, h, w), ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (L,),
        ``labels`` ``{"class_labels": (1,), "boxes": (1, 4) normalised cxcywh}``, ``caption`` and ``image``."""
        entry = self.entries[index]
        path = Path(entry["image"])
        path = path if path.is_absolute() else self.base_dir / path
        grey = read_grey(path)
        height, width = grey.shape
        x0, y0, x1, y1 = (float(v) for v in entry["box"])
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {entry['box']} of {path} does not lie inside its {width} x {height} image")
        caption, labels = sample_caption(
            [entry["class"]], list(self.phrases), self.negative_rate, rng=self.R, phrases=self.phrases
        )
        encoded = self.processor(images=np.repeat(grey[:, :, None], 3, axis=2), text=caption, return_tensors="pt")
        box = torch.tensor([[(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]])
        return {
            "pixel_values": encoded["pixel_values"][0],
            "input_ids": encoded["input_ids"][0],
            "attention_mask": encoded["attention_mask"][0],
            "token_type_ids": encoded["token_type_ids"][0],
            "labels": {"class_labels": torch.tensor([labels[entry["class"]]]), "boxes": box.float()},
            "caption": caption,
            "image": str(path),
        }


def collate_boxes(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch :class:`BoxDataset` samples: images zero-padded (bottom, right) with ``pixel_mask``, text padded.

    Returns:
        ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W) long (1 = image), ``input_ids``,
        ``attention_mask``, ``token_type_ids`` (B, L), and the lists ``labels``, ``caption`` and ``image``.
    """
    height = max(item["pixel_values"].shape[1] for item in items)
    width = max(item["pixel_values"].shape[2] for item in items)
    length = max(item["input_ids"].shape[0] for item in items)
    pixels = torch.zeros(len(items), 3, height, width)
    pixel_mask = torch.zeros(len(items), height, width, dtype=torch.long)
    text = {key: torch.full((len(items), length), _PAD_ID, dtype=torch.long) for key in _MODEL_INPUTS[2:]}
    for row, item in enumerate(items):
        _, h, w = item["pixel_values"].shape
        pixels[row, :, :h, :w] = item["pixel_values"]
        pixel_mask[row, :h, :w] = 1
        for key, padded in text.items():
            padded[row, : item[key].shape[0]] = item[key]
    return {
        "pixel_values": pixels,
        "pixel_mask": pixel_mask,
        **text,
        "labels": [item["labels"] for item in items],
        "caption": [item["caption"] for item in items],
        "image": [item["image"] for item in items],
    }


# ---------------------------------------------------------------------------------------------------- pictures
def box_picture(
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    true_box: torch.Tensor,
    pred_box: torch.Tensor,
    size: int = 128,
) -> torch.Tensor:
    """One processed image in grey with its true box in green and the predicted box in red.

    Args:
        pixel_values: ``(3, H, W)`` processor output (any normalisation; min-max scaled for display).
        pixel_mask: ``(H, W)``, 1 on the image, 0 on the padding (cropped away).
        true_box: ``(4,)`` normalised cxcywh.
        pred_box: ``(4,)`` normalised cxcywh.
        size: edge of the (square) picture.

    Returns:
        ``(3, size, size)`` in [0, 1].
    """
    rows, cols = int(pixel_mask.any(dim=1).sum()), int(pixel_mask.any(dim=0).sum())
    grey = min_max(pixel_values[:, :rows, :cols].detach().float().mean(0).cpu())
    picture = F.interpolate(grey[None, None], size=(size, size), mode="bilinear")[0].expand(3, -1, -1).clone()
    for box, colour in ((true_box, (0.0, 1.0, 0.0)), (pred_box, (1.0, 0.0, 0.0))):
        x0, y0, x1, y1 = (box_convert(box.detach().float().cpu()[None], "cxcywh", "xyxy")[0] * size).round().long()
        x0, x1 = int(x0.clamp(0, size - 1)), int(x1.clamp(0, size - 1))
        y0, y1 = int(y0.clamp(0, size - 1)), int(y1.clamp(0, size - 1))
        paint = torch.tensor(colour)[:, None]
        picture[:, y0, x0 : x1 + 1] = paint
        picture[:, y1, x0 : x1 + 1] = paint
        picture[:, y0 : y1 + 1, x0] = paint
        picture[:, y0 : y1 + 1, x1] = paint
    return picture


# ---------------------------------------------------------------------------------------------------- training
def _allow_frozen_weights_missing(module: nn.Module, incompatible: Any) -> None:
    """Load-state-dict post-hook: a checkpoint of the adapter only need not hold the frozen base weights.

    Missing adapter keys still fail a strict load, as do unexpected keys.
    """
    adapter = set(adapter_state_dict(module))
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key in adapter]


class GroundingDinoTrainer(Trainer):
    """LoRA fine-tuning of Grounding DINO on :class:`BoxDataset` batches (:func:`collate_boxes`).

    Training minimises :func:`logsam_loss` (call :func:`configure_logsam_loss` on the model's config first for
    the reference's matcher costs). Validation (``val_loader`` over a :class:`BoxDataset` with
    ``negative_rate=0``) reports ``mean_iou`` and ``recall_iou50`` of each image's top-1 box; ``mean_iou``
    selects ``best.pt``. Checkpoints hold only the adapter (:func:`~dae.logsam.lora.adapter_state_dict`) under
    ``model``; the optimizer should cover the trainable (adapter) parameters only, e.g.
    ``dae.engine.build_optimizer``, which skips frozen parameters.

    Args:
        network: the model wrapped by :func:`~dae.logsam.lora.apply_lora`.
        picture_count: validation images shown with their boxes in TensorBoard.
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer` (optimizer, loaders, output_dir,
            max_epochs, amp, ...).
    """

    best_metric = "mean_iou"
    best_mode = "max"
    summary_keys = ("loss", "loss_ce", "loss_bbox", "loss_giou")
    non_finite_hint = "lower the learning rate, or check the datalist's boxes (x0 < x1, y0 < y1 inside the image)"

    def __init__(self, network: PeftModel, picture_count: int = 4, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.picture_count = picture_count
        self.model.register_load_state_dict_post_hook(_allow_frozen_weights_missing)

    def describe(self) -> str:
        """The model and its trainable share, for the first log line."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return f"Grounding DINO + LoRA ({trainable:,} of {total:,} parameters trainable)"

    def state_dict(self) -> dict[str, Any]:
        """The base trainer's state with only the adapter's tensors under ``model``."""
        state = super().state_dict()
        state[self.model_key] = adapter_state_dict(self.model)
        return state

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {key: self.to_device(batch[key]) for key in _MODEL_INPUTS}
        inputs["pixel_values"] = inputs["pixel_values"].float()
        return inputs

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        labels = [{key: value.to(self.device) for key, value in target.items()} for target in batch["labels"]]
        with self.autocast():
            outputs = self.ddp_model(**self._inputs(batch), labels=labels)
        return logsam_loss(outputs.loss_dict)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Mean IoU and recall at IoU 0.5 of the top-1 box over the validation loader, and box pictures."""
        assert self.val_loader is not None
        outer_rng, _ = self.validation_seeding()
        self.model.eval()
        ious, tiles = [], []
        for batch in self.val_loader:
            inputs = self._inputs(batch)
            with self.autocast():
                outputs = self.model(**inputs)
            best = outputs.logits.float().sigmoid().amax(dim=-1).argmax(dim=-1)
            predicted = outputs.pred_boxes.float()[torch.arange(len(best), device=best.device), best]
            for row, target in enumerate(batch["labels"]):
                truth = target["boxes"].to(self.device)
                pred_xyxy = box_convert(predicted[row : row + 1], "cxcywh", "xyxy")
                ious.append(box_iou(pred_xyxy, box_convert(truth, "cxcywh", "xyxy")).amax())
                if len(tiles) < self.picture_count:
                    tiles.append(
                        box_picture(inputs["pixel_values"][row], inputs["pixel_mask"][row], truth[0], predicted[row])
                    )
        restore_rng_state(outer_rng)
        iou = torch.stack(ious)
        mean_iou, recall = all_reduce_mean(torch.stack([iou.mean(), (iou >= 0.5).float().mean()])).tolist()
        pictures = (
            {"val/true_green_predicted_red": make_grid(tiles, nrow=len(tiles), padding=2, pad_value=1.0)}
            if tiles
            else {}
        )
        return {"mean_iou": mean_iou, "recall_iou50": recall}, pictures

    def export(self, out_dir: str | Path, processor: GroundingDinoProcessor) -> Path:
        """Write the merged model and ``processor`` as a plain Hugging Face folder (the training model is kept)."""
        return export_merged(self.model, out_dir, processor)
