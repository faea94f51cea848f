"""Training engine: the shared loop and its one step, the DAE, DINO and segmentation trainers, the optimizers."""

from dae.engine.dino import DinoTrainer, teacher_collapse
from dae.engine.dino_steps import cancel_last_layer_gradients, update_teacher
from dae.engine.lars import LARS
from dae.engine.optim import OPTIMIZERS, build_optimizer, fused_option, param_groups, scaled_lr
from dae.engine.pretrain import PretrainTrainer
from dae.engine.segmentation import SegmentationTrainer
from dae.engine.step import CLIP_MODES, backward_step, clip_gradients
from dae.engine.trainer import Trainer

__all__ = [
    "CLIP_MODES",
    "LARS",
    "OPTIMIZERS",
    "DinoTrainer",
    "PretrainTrainer",
    "SegmentationTrainer",
    "Trainer",
    "backward_step",
    "build_optimizer",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "fused_option",
    "param_groups",
    "scaled_lr",
    "teacher_collapse",
    "update_teacher",
]
