"""DINO self-distillation: a student learns to match an EMA teacher across multi-crop views of an image.

One iteration, as in DINO (Caron et al. 2021) and DAX (Scheuplein et al. 2025):

1. set the learning rate (warm-up + cosine, all groups) and the weight decay (cosine, the decayed group);
2. the teacher sees only the 2 global crops, the student sees all crops; the loss compares every teacher
   view with every other student view (fp32, whatever the autocast);
3. back-propagate, clip each parameter's gradient separately, drop the last-layer gradients during the
   first ``freeze_last_layer`` epochs, step;
4. move the teacher towards the student by an EMA whose momentum rises from ``momentum_teacher`` to 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from dae.engine.dino_steps import (
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    teacher_momentum,
    update_teacher,
)
from dae.engine.schedules import warmup_cosine
from dae.engine.trainer import Trainer
from dae.evaluation.features import DinoBackboneExtractor, extract_features
from dae.evaluation.knn import knn_predict
from dae.evaluation.metrics import accuracy
from dae.losses.dino import DINOLoss
from dae.models.backbone2d import backbone_config, is_vit
from dae.models.multicrop import MultiCropWrapper
from dae.utils.seed import restore_rng_state
from dae.utils.tensors import min_max

__all__ = ["DinoTrainer", "attention_picture"]

logger = logging.getLogger(__name__)

#: collapse alarms on the epoch means: teacher KL to the uniform distribution, and teacher entropy (nats)
_UNIFORM_KL = 0.05
_ONE_HOT_ENTROPY = 0.05


def _plain(value: Any) -> Any:
    """A JSON round trip: only plain types survive, so ``torch.load(weights_only=True)`` reads the result."""
    return json.loads(json.dumps(value, default=str))


@torch.no_grad()
def attention_picture(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-layer CLS-to-patch attention of a ViT, one row per image: the image, then one map per head.

    Args:
        backbone: a ViT with ``get_last_selfattention`` and ``patch_size``.
        images: ``(B, C, H, W)``; H and W multiples of the patch size.

    Returns:
        A ``(3, H', W')`` picture in [0, 1] for TensorBoard.
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


class DinoTrainer(Trainer):
    """Train a student :class:`~dae.models.MultiCropWrapper` against its EMA teacher with the DINO loss.

    Checkpoints (``checkpoints/latest.pt`` ...) hold ``student``, ``teacher``, ``optimizer``, ``scheduler``,
    ``scaler``, ``epoch``, ``global_step``, ``dino_loss`` (the centre), ``backbone_config`` (what
    :func:`dae.models.load_backbone` needs to rebuild the backbone), ``args`` (the run's hyper-parameters as a
    plain dict) and the generator states; all load with ``torch.load(..., weights_only=True)``.

    Validation is optional and is a k-NN monitor, the collapse check the DINO authors use: the teacher's CLS
    features of ``probe_loader`` (labelled training images) vote for the images of ``val_loader``; ``best.pt``
    tracks the best ``knn_top1``. Every rank runs it on the whole probe set (no sampler), so give it a few
    hundred to a few thousand images.

    Args:
        network: the student (backbone + DINO head), trained.
        teacher: a network of the same architecture without drop-path; it starts as a copy of the student and
            is never trained by gradients.
        loss_function: the DINO loss (its centre is checkpointed).
        weight_decay: weight decay at the first iteration, applied to the first parameter group only.
        weight_decay_end: weight decay at the last iteration (cosine in between).
        momentum_teacher: EMA momentum at the first iteration, raised to 1 by a cosine.
        freeze_last_layer: epochs during which the head's last layer gets no update.
        crops_key: batch key of the list of crops ``[global_1, global_2, local_1, ...]``, each ``(B, C, h, w)``.
        probe_loader: labelled images whose features the k-NN monitor votes with.
        image_key / label_key: batch keys of the probe and validation loaders.
        knn_k / knn_temperature: the monitor's neighbours and temperature.
        attention_images: how many fixed validation images show their attention maps (ViTs only).
        run_config: hyper-parameters to store as ``args`` in the checkpoints.
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer`; ``clip_grad`` is the per-parameter
            clipping norm here (0: off).
    """

    best_metric = "knn_top1"
    best_mode = "max"
    summary_keys = ("loss", "teacher_entropy")
    model_key = "student"

    def __init__(
        self,
        network: MultiCropWrapper,
        teacher: MultiCropWrapper,
        loss_function: DINOLoss,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        freeze_last_layer: int = 1,
        crops_key: str = "crops",
        probe_loader: DataLoader | None = None,
        image_key: str = "image",
        label_key: str = "label",
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        attention_images: int = 4,
        run_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        if kwargs.get("val_loader") is not None and probe_loader is None:
            raise ValueError("the k-NN monitor needs a probe_loader (labelled images) besides the val_loader")
        self.teacher = teacher.to(self.device)
        self.teacher.load_state_dict(network.state_dict())
        self.teacher.requires_grad_(False)
        self.loss_function = loss_function.to(self.device)
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay_end
        self.momentum_teacher = momentum_teacher
        self.freeze_last_layer = freeze_last_layer
        self.crops_key = crops_key
        self.probe_loader = probe_loader
        self.image_key = image_key
        self.label_key = label_key
        self.knn_k = knn_k
        self.knn_temperature = knn_temperature
        self.attention_images = attention_images
        self.run_config = _plain(dict(run_config or {}))
        self.total_steps = self.max_epochs * self.steps_per_epoch
        self._last_crops: list[torch.Tensor] | None = None

    def describe(self) -> str:
        cfg = backbone_config(self.model.backbone)
        return f"DINO student/teacher {cfg}, {self.loss_function.out_dim} prototypes, {self.loss_function.ncrops} crops"

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.state_dict(),
            "dino_loss": self.loss_function.state_dict(),
            "backbone_config": backbone_config(self.model.backbone),
            "args": self.run_config,
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss_function.load_state_dict(state["dino_loss"])

    # ------------------------------------------------------------------ one iteration
    def _set_schedules(self) -> tuple[float, float]:
        step = self.global_step
        wd = warmup_cosine(step, self.weight_decay, self.total_steps, min_lr=self.weight_decay_end)
        self.optimizer.param_groups[0]["weight_decay"] = wd
        return wd, teacher_momentum(step, self.total_steps, self.momentum_teacher)

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        wd, momentum = self._set_schedules()
        lr = self.optimizer.param_groups[0]["lr"]
        crops = [self.to_device(c) for c in batch[self.crops_key]]
        if len(crops) != self.loss_function.ncrops:
            raise ValueError(
                f"the batch has {len(crops)} crops but the loss was built for ncrops={self.loss_function.ncrops}"
            )
        self._last_crops = [c[:1].detach() for c in crops]
        with self.autocast():
            teacher_output = self.teacher(crops[:2])  # only the 2 global views pass through the teacher
            student_output = self.ddp_model(crops)
        loss, metrics = self.loss_function(student_output, teacher_output, self.epoch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite DINO loss at epoch {self.epoch + 1}, step {self.global_step} (lr {lr:.3g}); "
                "try amp: bf16 or none, a lower lr, or clip_grad > 0"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients_per_parameter(self.model, self.clip_grad)
        cancel_last_layer_gradients(self.model, self.epoch, self.freeze_last_layer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        update_teacher(self.model, self.teacher, momentum)
        self.global_step += 1
        record = {"loss": float(loss.detach())}
        record.update({k: float(v) for k, v in metrics.items()})
        record.update(lr=lr, wd=wd, momentum=momentum, grad_norm=float(grad_norm))
        return record

    def train_epoch(self) -> dict[str, float]:
        self.teacher.train()  # as in DINO: the teacher's BatchNorms use batch statistics
        means = super().train_epoch()
        self._warn_collapse(means)
        return means

    def _warn_collapse(self, means: Mapping[str, float]) -> None:
        # The loss alone is no sign: a sharp teacher and a flat student also give a loss close to ln K.
        if means["teacher_kl_uniform"] < _UNIFORM_KL:
            logger.warning(
                "epoch %d: the teacher output is close to uniform (KL to uniform %.4f nats, loss %.4f, ln K %.4f): "
                "a uniform collapse. Usual remedies: a lower teacher_temp, BatchNorm in the head, a higher "
                "momentum_teacher, a smaller out_dim, another lr.",
                self.epoch + 1,
                means["teacher_kl_uniform"],
                means["loss"],
                means["uniform_loss"],
            )
        elif means["teacher_entropy"] < _ONE_HOT_ENTROPY:
            logger.warning(
                "epoch %d: the teacher output is nearly one-hot (entropy %.4f nats): a collapse to one prototype. "
                "Usual remedies: a higher teacher_temp or centring momentum, a larger batch.",
                self.epoch + 1,
                means["teacher_entropy"],
            )

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        assert self.val_loader is not None and self.probe_loader is not None
        outer_rng, _ = self.validation_seeding()
        self.teacher.eval()
        extractor = DinoBackboneExtractor(self.teacher.backbone, n_last_blocks=1)
        keys = {"image_key": self.image_key, "label_key": self.label_key, "device": self.device}
        train = extract_features(extractor, self.probe_loader, amp_dtype=self.amp_dtype, **keys)
        val = extract_features(extractor, self.val_loader, amp_dtype=self.amp_dtype, **keys)
        k, num_classes = min(self.knn_k, len(train)), max(train.num_classes, val.num_classes)
        scores = knn_predict(train.cls, train.labels, val.cls, k, self.knn_temperature, num_classes=num_classes)
        top1 = accuracy(scores, val.labels)
        pictures = {}
        if is_vit(self.teacher.backbone) and self.attention_images > 0:
            first = next(iter(self.val_loader))[self.image_key][: self.attention_images]
            pictures["val/teacher_last_layer_attention"] = attention_picture(
                self.teacher.backbone, self.to_device(first).float()
            )
        self.teacher.train()
        restore_rng_state(outer_rng)
        return {"knn_top1": top1}, pictures

    @torch.no_grad()
    def train_pictures(self) -> dict[str, torch.Tensor]:
        """The crops of the first image of the last batch: the global crops, then the local ones."""
        if self._last_crops is None:
            return {}
        size = self._last_crops[0].shape[-2:]
        tiles = [F.interpolate(c.float(), size=size, mode="nearest")[0] for c in self._last_crops]
        tiles = [min_max(t.mean(0, keepdim=True)) for t in tiles]
        return {"train/crops_global_then_local": make_grid(tiles, nrow=len(tiles), padding=2, pad_value=1.0)}
