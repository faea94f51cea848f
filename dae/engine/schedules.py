"""Per-iteration learning-rate schedules."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineSchedule", "warmup_cosine"]


def warmup_cosine(
    step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0, min_lr: float = 0.0
) -> float:
    """Learning rate at ``step``: linear warm-up from ``warmup_lr`` to ``base_lr``, then cosine to ``min_lr``.

    Step 0 gives ``warmup_lr`` (or ``base_lr`` without warm-up); step ``warmup_steps`` gives ``base_lr``; the
    last step, ``total_steps - 1``, gives ``min_lr``.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(LRScheduler):
    """Linear warm-up then cosine decay, stepped once per iteration (the schedule of the DAE paper and code).

    The base learning rate of each parameter group is the ``lr`` the optimizer was built with.

    Args:
        optimizer: the optimizer.
        total_steps: iterations in the whole run.
        warmup_steps: iterations of linear warm-up.
        warmup_lr: learning rate at the first iteration.
        min_lr: learning rate at the last iteration.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            warmup_cosine(self.last_epoch, base, self.total_steps, self.warmup_steps, self.warmup_lr, self.min_lr)
            for base in self.base_lrs
        ]
