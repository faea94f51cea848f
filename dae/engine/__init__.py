"""Training engine: the shared loop, the DAE pretraining, DINO and segmentation trainers, evaluation, schedules."""

from dae.engine.dino import DinoTrainer, attention_picture
from dae.engine.dino_steps import (
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    teacher_momentum,
    update_teacher,
)
from dae.engine.lars import LARS
from dae.engine.optim import OPTIMIZERS, build_optimizer, param_groups
from dae.engine.pretrain import PretrainTrainer
from dae.engine.schedules import WarmupCosineSchedule, warmup_cosine
from dae.engine.seg_eval import (
    evaluate_segmentation,
    label_overlay,
    load_model_weights,
    run_evaluation,
    summarise_cases,
    write_tables,
)
from dae.engine.seg_infer import run_inference
from dae.engine.segmentation import SegmentationTrainer
from dae.engine.trainer import Trainer
from dae.engine.visualize import orthogonal_slices_grid

__all__ = [
    "LARS",
    "OPTIMIZERS",
    "DinoTrainer",
    "PretrainTrainer",
    "SegmentationTrainer",
    "Trainer",
    "WarmupCosineSchedule",
    "attention_picture",
    "build_optimizer",
    "cancel_last_layer_gradients",
    "clip_gradients_per_parameter",
    "evaluate_segmentation",
    "label_overlay",
    "load_model_weights",
    "orthogonal_slices_grid",
    "param_groups",
    "run_evaluation",
    "run_inference",
    "summarise_cases",
    "teacher_momentum",
    "update_teacher",
    "warmup_cosine",
    "write_tables",
]
