"""Supervised fine-tuning for segmentation, validated by an injected whole-volume evaluator."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dae.engine.trainer import Trainer
from dae.utils.seed import restore_rng_state

__all__ = ["SegmentationTrainer"]


class SegmentationTrainer(Trainer):
    """Fine-tune a segmentation network (e.g. MONAI ``SwinUNETR``) on labelled crops.

    Training minimises ``loss_function(logits, label)`` (e.g. ``DiceCELoss``) on random crops. Validation is
    ``evaluator(network)``, e.g. :class:`dae.evaluation.volumes.SegmentationEvaluator` (sliding windows over
    every validation volume, per-class Dice, tables in ``output_dir/validation/``), called under the trainer's
    validation seeding every ``val_interval`` epochs; its ``mean_dice`` selects ``best.pt``.

    Args:
        network: maps (B, C_in, X, Y, Z) to (B, num_classes, X, Y, Z) logits.
        loss_function: takes logits and the integer label map (B, 1, X, Y, Z).
        evaluator: ``network -> (metrics, pictures)``, the metrics (averaged over ranks) with ``mean_dice``,
            the pictures ``{tag: (C, H, W) in [0, 1]}``; required with ``val_loader`` (which schedules it and
            whose dataset is seeded for it).
        image_key: batch key of the images.
        label_key: batch key of the label maps.
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer`.

    Raises:
        ValueError: when only one of ``val_loader`` and ``evaluator`` is given.
    """

    best_metric = "mean_dice"
    best_mode = "max"
    summary_keys = ("loss",)

    def __init__(
        self,
        network: nn.Module,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        evaluator: Callable[[nn.Module], tuple[dict[str, float], dict[str, torch.Tensor]]] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        if (self.val_loader is None) != (evaluator is None):
            raise ValueError(
                "val_loader and evaluator go together: the val_loader schedules the evaluator (e.g. a "
                f"dae.evaluation.volumes.SegmentationEvaluator over it); got val_loader={self.val_loader!r}, "
                f"evaluator={evaluator!r}"
            )
        self.loss_function = loss_function
        self.evaluator = evaluator
        self.image_key = image_key
        self.label_key = label_key

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = self.to_device(batch[self.image_key], torch.float32)
        labels = self.to_device(batch[self.label_key])
        with self.autocast():
            logits = self.ddp_model(images)
        # The loss (softmax, Dice ratios, cross-entropy) runs in fp32 so that fp16 cannot overflow.
        return {"loss": self.loss_function(logits.float(), labels)}

    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The evaluator's metrics and pictures, with the validation generators seeded."""
        assert self.val_loader is not None and self.evaluator is not None
        outer_rng, _ = self.validation_seeding()
        metrics, pictures = self.evaluator(self.model)
        restore_rng_state(outer_rng)
        return metrics, pictures
