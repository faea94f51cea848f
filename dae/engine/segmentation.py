"""Supervised fine-tuning for segmentation, validated on whole volumes with sliding-window inference."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dae.engine.seg_eval import evaluate_segmentation, summarise_cases, write_tables
from dae.engine.trainer import Trainer
from dae.utils.dist import is_main_process
from dae.utils.seed import restore_rng_state

__all__ = ["SegmentationTrainer"]

logger = logging.getLogger(__name__)


class SegmentationTrainer(Trainer):
    """Fine-tune a segmentation network (e.g. MONAI ``SwinUNETR``) on labelled crops.

    Training minimises ``loss_function(logits, label)`` (e.g. ``DiceCELoss``) on random crops; validation
    segments every validation volume whole with ``inferer`` (sliding windows) and reports the mean Dice over
    foreground classes, which selects ``best.pt``, plus per-class Dice (and HD95 when ``val_hd95``). The
    per-case table of each validation is written to ``output_dir/validation/``.

    Args:
        network: maps (B, C_in, X, Y, Z) to (B, num_classes, X, Y, Z) logits.
        loss_function: takes logits and the integer label map (B, 1, X, Y, Z).
        inferer: whole-volume inferer called as ``inferer(images, network)``.
        class_names: names of all classes, background first (their number is the number of classes).
        val_hd95: also compute HD95 at validation (slower; always computed by ``evaluate``).
        image_key: batch key of the images.
        label_key: batch key of the label maps.
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer`.
    """

    best_metric = "mean_dice"
    best_mode = "max"
    summary_keys = ("loss",)

    def __init__(
        self,
        network: nn.Module,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
        class_names: Sequence[str],
        val_hd95: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        if len(class_names) < 2:
            raise ValueError(f"class_names must list the background and at least one class, got {class_names}")
        self.loss_function = loss_function
        self.inferer = inferer
        self.class_names = list(class_names)
        self.val_hd95 = val_hd95
        self.image_key = image_key
        self.label_key = label_key

    def describe(self) -> str:
        return f"{type(self.model).__name__} for {len(self.class_names)} classes"

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = self.to_device(batch[self.image_key]).float()
        labels = self.to_device(batch[self.label_key])
        with self.autocast():
            logits = self.ddp_model(images)
        # The loss (softmax, Dice ratios, cross-entropy) runs in fp32 so that fp16 cannot overflow.
        return {"loss": self.loss_function(logits.float(), labels)}

    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        assert self.val_loader is not None
        outer_rng, _ = self.validation_seeding()
        cases, picture = evaluate_segmentation(
            self.model,
            self.val_loader,
            self.inferer,
            num_classes=len(self.class_names),
            device=self.device,
            amp_dtype=self.amp_dtype,
            hd95=self.val_hd95,
            image_key=self.image_key,
            label_key=self.label_key,
        )
        restore_rng_state(outer_rng)
        summary = summarise_cases(cases, self.class_names[1:])
        if is_main_process():
            write_tables(cases, summary, self.class_names[1:], self.output_dir / "validation")
        metrics = {k: v for k, v in summary.items() if k.startswith("mean_")}
        metrics.update({k: v for k, v in summary.items() if "/" in k})
        return metrics, {} if picture is None else {"val/label_vs_prediction": picture}
