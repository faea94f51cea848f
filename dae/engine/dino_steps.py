"""The DINO-specific parts of a training iteration: the last-layer freeze and the EMA teacher.

:class:`~dae.engine.dino.DinoTrainer` calls them from its step hooks; the per-parameter gradient clipping is
:func:`dae.engine.step.clip_gradients` with ``mode="per_parameter"``, and the momentum schedule a
:class:`~dae.utils.schedules.CosineSchedule`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["cancel_last_layer_gradients", "update_teacher"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop the gradients of the head's last layer during the first ``freeze_epochs`` epochs.

    Sets ``grad`` to None on every parameter whose name contains ``"last_layer"`` while
    ``epoch < freeze_epochs``, so that the optimizer skips it (no momentum and no weight decay either).
    DINO does this to stabilise the start of training.

    Args:
        model: the student (DDP-wrapped or not).
        epoch: current epoch (0-based).
        freeze_epochs: number of epochs during which the last layer stays fixed.
    """
    if epoch >= freeze_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Move the teacher's parameters towards the student's: ``t = momentum * t + (1 - momentum) * s``.

    Only parameters are averaged; buffers (e.g. BatchNorm running statistics) are left untouched, as in DINO.
    Either network may be wrapped in DDP or DataParallel.

    Args:
        student: the student network.
        teacher: the teacher network, with the same parameters (in number, order and shape).
        momentum: EMA momentum in [0, 1]; 1 keeps the teacher unchanged.
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    student_params = list(_unwrap(student).parameters())
    teacher_params = list(_unwrap(teacher).parameters())
    if len(student_params) != len(teacher_params):
        raise ValueError(
            f"student and teacher differ in their parameters: {len(student_params)} and {len(teacher_params)} tensors"
        )
    # Shapes compared on the host (no kernel) before anything moves: an in-place add would broadcast silently.
    mismatched = [i for i, (s, t) in enumerate(zip(student_params, teacher_params)) if s.shape != t.shape]
    if mismatched:
        index = mismatched[0]
        raise ValueError(
            f"parameter {index} differs in shape: student {tuple(student_params[index].shape)}, "
            f"teacher {tuple(teacher_params[index].shape)}"
        )
    if not teacher_params:  # foreach ops reject empty lists
        return
    # The loop's `t.mul_(momentum).add_(s, alpha=1 - momentum)` for all parameters at once, bit for bit; under
    # no_grad the student's parameters need no detach.
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
