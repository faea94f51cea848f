"""Training engine: the pretraining loop, schedules, optimizer groups and TensorBoard pictures."""

from dae.engine.optim import param_groups
from dae.engine.schedules import WarmupCosineSchedule, warmup_cosine
from dae.engine.trainer import PretrainTrainer
from dae.engine.visualize import orthogonal_slices_grid

__all__ = ["PretrainTrainer", "WarmupCosineSchedule", "orthogonal_slices_grid", "param_groups", "warmup_cosine"]
