"""One value schedule for the learning rate, weight decay, EMA momentum and temperatures, per iteration or epoch."""

from __future__ import annotations

import math

__all__ = ["CosineSchedule"]


class CosineSchedule:
    """A value that rises linearly from ``start`` to ``peak`` over ``warmup_steps``, then follows a cosine to ``end``.

    Step 0 gives ``start`` (``peak`` without warm-up); step ``warmup_steps`` gives ``peak``; the last step,
    ``total_steps - 1``, gives ``end``, which later steps keep. The same class drives every scheduled
    hyper-parameter, with names that say what the value does rather than assuming a learning rate:

    - learning rate: ``CosineSchedule(peak=lr, end=min_lr, total_steps=..., warmup_steps=..., start=warmup_lr)``;
    - DINO weight decay: ``CosineSchedule(peak=weight_decay, end=weight_decay_end, total_steps=...)``;
    - DINO teacher momentum: ``CosineSchedule(peak=0.996, end=1.0, total_steps=...)``;
    - DINO teacher temperature (per epoch, a warm-up then constant): ``CosineSchedule(peak=t, end=t,
      total_steps=epochs, warmup_steps=..., start=warmup_t)``.

    It holds no state besides its settings, so a resumed run only needs the step counter.

    Args:
        peak: value at the end of the warm-up.
        end: value at step ``total_steps - 1`` and after.
        total_steps: steps of the whole schedule, >= 1.
        warmup_steps: steps of the linear warm-up, in [0, total_steps].
        start: value at step 0 when there is a warm-up.
    """

    def __init__(self, peak: float, end: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.peak, self.end, self.start = float(peak), float(end), float(start)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)

    def __call__(self, step: int) -> float:
        """The value at ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        decay_steps = max(self.total_steps - 1 - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.end + 0.5 * (self.peak - self.end) * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(start={self.start:g}, peak={self.peak:g}, end={self.end:g}, "
            f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"
        )
