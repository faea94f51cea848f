"""Training engine: the shared loop, the pretraining and segmentation trainers, evaluation, schedules."""

from dae.engine.optim import param_groups
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
    "PretrainTrainer",
    "SegmentationTrainer",
    "Trainer",
    "WarmupCosineSchedule",
    "evaluate_segmentation",
    "label_overlay",
    "load_model_weights",
    "orthogonal_slices_grid",
    "param_groups",
    "run_evaluation",
    "run_inference",
    "summarise_cases",
    "warmup_cosine",
    "write_tables",
]
