"""DINO self-distillation: a student learns to match an EMA teacher across multi-crop views of an image.

One iteration, as in DINO (Caron et al. 2021) and DAX (Scheuplein et al. 2025):

1. (:meth:`DinoTrainer.before_step`) set the learning rate (warm-up + cosine, all groups) and the weight
   decay (cosine, the decayed group);
2. (:meth:`DinoTrainer.compute_losses`) the teacher sees only the 2 global crops, the student sees all
   crops; the loss compares every teacher view with every other student view (fp32, whatever the autocast),
   plus, optionally, DINOv2's KoLeo term on the student's backbone features of each global crop;
3. back-propagate, clip each parameter's gradient separately, drop the last-layer gradients during the
   first ``freeze_last_layer`` epochs (:meth:`DinoTrainer.before_update`), step;
4. (:meth:`DinoTrainer.after_step`) move the teacher towards the student by an EMA whose momentum rises
   from ``momentum_teacher`` to 1.

Step 3 and the bookkeeping are the shared :meth:`dae.engine.trainer.Trainer.train_step`, which calls these hooks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dae.engine.dino_steps import cancel_last_layer_gradients, update_teacher
from dae.engine.trainer import Trainer
from dae.losses.dino import DINOLoss
from dae.losses.koleo import KoLeoLoss
from dae.models.backbone2d import backbone_config, is_vit
from dae.models.multicrop import MultiCropWrapper
from dae.utils.performance import channels_last_module, compile_module
from dae.utils.pictures import attention_picture, crops_picture
from dae.utils.schedules import CosineSchedule
from dae.utils.seed import restore_rng_state
from dae.utils.tensors import plain_tensor

__all__ = ["ONE_HOT_ENTROPY_THRESHOLD", "UNIFORM_KL_THRESHOLD", "DinoTrainer", "dino_part", "teacher_collapse"]

logger = logging.getLogger(__name__)

#: collapse alarms on the epoch means: teacher KL to the uniform distribution, and teacher entropy (nats)
UNIFORM_KL_THRESHOLD = 0.05
ONE_HOT_ENTROPY_THRESHOLD = 0.05


def teacher_collapse(means: Mapping[str, float]) -> str | None:
    """Which collapse an epoch's means show: ``"uniform"`` (teacher KL to uniform below
    :data:`UNIFORM_KL_THRESHOLD`), ``"one-hot"`` (teacher entropy below :data:`ONE_HOT_ENTROPY_THRESHOLD`), or None.

    The loss alone is no sign: a sharp teacher and a flat student also give a loss close to ln K.
    """
    if means["teacher_kl_uniform"] < UNIFORM_KL_THRESHOLD:
        return "uniform"
    if means["teacher_entropy"] < ONE_HOT_ENTROPY_THRESHOLD:
        return "one-hot"
    return None


def dino_part(means: Mapping[str, float]) -> float:
    """The DINO loss without a KoLeo term (``dino`` when logged, else ``loss``): the value to compare with ln K."""
    return means.get("dino", means.get("loss", math.nan))


def _plain(value: Any) -> Any:
    """A JSON round trip: only plain types survive, so ``torch.load(weights_only=True)`` reads the result."""
    return json.loads(json.dumps(value, default=str))


class DinoTrainer(Trainer):
    """Train a student :class:`~dae.models.MultiCropWrapper` against its EMA teacher with the DINO loss.

    Checkpoints (``checkpoints/latest.pt`` ...) hold ``student``, ``teacher``, ``optimizer``, ``scaler``,
    ``epoch``, ``global_step``, ``dino_loss`` (the centre), ``backbone_config`` (what
    :func:`dae.models.load_backbone` needs to rebuild the backbone), ``args`` (the run's hyper-parameters as a
    plain dict) and the generator states; all load with ``torch.load(..., weights_only=True)``.

    Validation is optional and is a monitor of the teacher, e.g. the k-NN collapse check the DINO authors use
    (:class:`dae.evaluation.knn.KnnMonitor`): ``monitor(teacher_backbone)`` is called with the teacher's
    backbone in eval mode, under the trainer's validation seeding, every ``val_interval`` epochs, and returns
    metrics that include ``best_metric`` (``knn_top1`` by default), which selects ``best.pt`` and drives early
    stopping. ``val_loader`` schedules it and gives the
    images whose attention maps are drawn; the two go together.

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
        crop_transform: applied to the list of crops once they are on the device, before the networks, e.g.
            :class:`dae.data.device_augment.CropAugment` (uint8 to float, channels, normalisation, and
            optionally the colour, blur and solarise augmentation of the whole batch on the GPU); its
            ``state_dict`` (a generator) is checkpointed when it has one.
        koleo_weight: weight of DINOv2's KoLeo term (:class:`~dae.losses.KoLeoLoss`) on the student's backbone
            features, computed per global crop and summed over the two, as in DINOv2 (which uses 0.1); 0: off,
            as in DINO. When on, ``koleo`` (unweighted) and ``dino`` are logged next to the total ``loss``.
        monitor: the validation, ``teacher backbone -> {"knn_top1": ..., ...}``; required with ``val_loader``.
        best_metric: the monitor's metric that selects ``best.pt`` (higher is better), e.g. ``"knn_top1"`` or
            ``"knn_auroc"`` of :class:`~dae.evaluation.knn.KnnMonitor`.
        image_key: batch key of the images of ``val_loader`` (for the attention maps).
        attention_images: how many fixed validation images show their attention maps (ViTs only).
        run_config: hyper-parameters to store as ``args`` in the checkpoints.
        clip_mode: as in :class:`~dae.engine.trainer.Trainer`; DINO clips each parameter's gradient on its own,
            so ``clip_grad`` is the per-parameter norm (0: off).
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer`.

    Raises:
        ValueError: when only one of ``val_loader`` and ``monitor`` is given, or when the monitor lists its
            metrics (a ``metrics`` attribute) and ``best_metric`` is not one of them.
    """

    best_mode = "max"  # best_metric: set from the constructor argument
    summary_keys = ("loss", "teacher_entropy")
    model_key = "student"
    non_finite_hint = "try amp: bf16 or none, a lower lr, or clip_grad > 0"

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
        crop_transform: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        koleo_weight: float = 0.0,
        monitor: Callable[[nn.Module], Mapping[str, float]] | None = None,
        best_metric: str = "knn_top1",
        image_key: str = "image",
        attention_images: int = 4,
        run_config: Mapping[str, Any] | None = None,
        clip_mode: str = "per_parameter",
        **kwargs: Any,
    ) -> None:
        super().__init__(network, clip_mode=clip_mode, **kwargs)
        if (self.val_loader is None) != (monitor is None):
            raise ValueError(
                "val_loader and monitor go together: the val_loader schedules the monitor (e.g. a k-NN "
                f"dae.evaluation.knn.KnnMonitor) and shows the attention maps; got val_loader={self.val_loader!r}, "
                f"monitor={monitor!r}"
            )
        offered = getattr(monitor, "metrics", None)
        if offered is not None and best_metric not in offered:
            raise ValueError(f"best_metric={best_metric!r} is not a metric of the monitor, which gives {list(offered)}")
        self.best_metric = best_metric
        self.teacher = teacher.to(self.device)
        self.teacher.load_state_dict(network.state_dict())
        self.teacher.requires_grad_(False)
        if self.channels_last:
            channels_last_module(self.teacher)
        compile_module(self.teacher, self.compile)
        self.crop_transform = crop_transform
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.koleo_weight = koleo_weight
        self.koleo = KoLeoLoss() if koleo_weight > 0 else None
        self.loss_function = loss_function.to(self.device)
        self.freeze_last_layer = freeze_last_layer
        self.crops_key = crops_key
        self.monitor = monitor
        self.image_key = image_key
        self.attention_images = attention_images
        self.run_config = _plain(dict(run_config or {}))
        self.weight_decay_schedule = CosineSchedule(weight_decay, weight_decay_end, self.total_steps)
        self.momentum_schedule = CosineSchedule(momentum_teacher, 1.0, self.total_steps)
        self._last_crops: list[torch.Tensor] | None = None

    def describe(self) -> str:
        cfg = backbone_config(self.model.backbone)
        return f"DINO student/teacher {cfg}, {self.loss_function.out_dim} prototypes, {self.loss_function.ncrops} crops"

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        state = {
            "teacher": self.teacher.state_dict(),
            "dino_loss": self.loss_function.state_dict(),
            "backbone_config": backbone_config(self.model.backbone),
            "args": self.run_config,
        }
        if hasattr(self.crop_transform, "state_dict"):
            state["crop_transform"] = self.crop_transform.state_dict()
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss_function.load_state_dict(state["dino_loss"])
        if "crop_transform" in state and hasattr(self.crop_transform, "load_state_dict"):
            self.crop_transform.load_state_dict(state["crop_transform"])

    # ------------------------------------------------------------------ one iteration
    def before_step(self) -> dict[str, float]:
        """The learning rates, the weight decay of group 0 and the teacher momentum of this iteration."""
        scheduled = super().before_step()
        wd = self.weight_decay_schedule(self.global_step)
        self.optimizer.param_groups[0]["weight_decay"] = wd
        return {**scheduled, "wd": wd, "momentum": self.momentum_schedule(self.global_step)}

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The DINO loss (teacher on the 2 global crops, student on all), plus the weighted KoLeo term when on,
        and, at log steps, the diagnostics."""
        crops = [plain_tensor(c).to(self.device, non_blocking=True) for c in batch[self.crops_key]]
        if len(crops) != self.loss_function.ncrops:
            raise ValueError(
                f"the batch has {len(crops)} crops but the loss was built for ncrops={self.loss_function.ncrops}"
            )
        if self.crop_transform is not None:
            crops = self.crop_transform(crops)
        crops = [self.layout(c) for c in crops]
        if self.log_step:  # a copy, so that the batch is not kept alive for the pictures
            self._last_crops = [c[:1].clone() for c in crops]
        with self.autocast():
            teacher_output = self.teacher(crops[:2])  # only the 2 global views pass through the teacher
            if self.koleo is None:
                student_output = self.ddp_model(crops)
            else:
                student_output, student_features = self.ddp_model(crops, return_features=True)
        loss, metrics = self.loss_function(student_output, teacher_output, self.epoch, diagnostics=self.log_step)
        if self.koleo is not None:
            globals_ = student_features[: 2 * crops[0].shape[0]].chunk(2)
            koleo = sum(self.koleo(features) for features in globals_)
            metrics |= {"dino": loss.detach(), "koleo": koleo.detach()}
            loss = loss + self.koleo_weight * koleo
        return {"loss": loss, **metrics}

    def before_update(self) -> None:
        """No update of the head's last layer during the first ``freeze_last_layer`` epochs."""
        cancel_last_layer_gradients(self.model, self.epoch, self.freeze_last_layer)

    def after_step(self) -> None:
        """Move the teacher towards the updated student with this iteration's momentum."""
        update_teacher(self.model, self.teacher, self.momentum_schedule(self.global_step))

    def train_epoch(self) -> dict[str, float]:
        self.teacher.train()  # as in DINO: the teacher's BatchNorms use batch statistics
        means = super().train_epoch()
        self._warn_collapse(means)
        return means

    def _warn_collapse(self, means: Mapping[str, float]) -> None:
        collapse = teacher_collapse(means)
        if collapse == "uniform":
            logger.warning(
                "epoch %d: the teacher output is close to uniform (KL to uniform %.4f nats, loss %.4f, ln K %.4f): "
                "a uniform collapse. Usual remedies: a lower teacher_temp, BatchNorm in the head, a higher "
                "momentum_teacher, a smaller out_dim, another lr.",
                self.epoch + 1,
                means["teacher_kl_uniform"],
                dino_part(means),
                means["uniform_loss"],
            )
        elif collapse == "one-hot":
            logger.warning(
                "epoch %d: the teacher output is nearly one-hot (entropy %.4f nats): a collapse to one prototype. "
                "Usual remedies: a higher teacher_temp or centring momentum, a larger batch.",
                self.epoch + 1,
                means["teacher_entropy"],
            )

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The monitor's metrics on the teacher backbone, and the teacher's attention maps (ViTs)."""
        assert self.val_loader is not None and self.monitor is not None
        outer_rng, _ = self.validation_seeding()
        self.teacher.eval()
        metrics = {k: float(v) for k, v in self.monitor(self.teacher.backbone).items()}
        pictures = {}
        if is_vit(self.teacher.backbone) and self.attention_images > 0:
            first = next(iter(self.val_loader))[self.image_key][: self.attention_images]
            pictures["val/teacher_last_layer_attention"] = attention_picture(
                self.teacher.backbone, self.to_device(first, torch.float32)
            )
        self.teacher.train()
        restore_rng_state(outer_rng)
        return metrics, pictures

    def train_pictures(self) -> dict[str, torch.Tensor]:
        """The crops of the first image of the last batch: the global crops, then the local ones."""
        if self._last_crops is None:
            return {}
        return {"train/crops_global_then_local": crops_picture(self._last_crops)}
