"""Per-iteration steps of DINO training: per-parameter gradient clipping, last-layer freeze, EMA teacher."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from dae.engine.schedules import warmup_cosine

__all__ = ["cancel_last_layer_gradients", "clip_gradients_per_parameter", "teacher_momentum", "update_teacher"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip the gradient of each parameter of ``model`` separately to L2 norm ``clip``, as DINO does.

    This is not a clipping of the global norm: every parameter whose gradient norm exceeds ``clip`` is
    rescaled to (just under) ``clip``, the others are left unchanged. With fp16 gradient scaling, unscale the
    gradients first. Call it after the backward pass and before the optimizer step.

    Args:
        model: the student (DDP-wrapped or not).
        clip: maximum gradient norm per parameter; ``clip <= 0`` only measures.

    Returns:
        The global L2 norm of all gradients before clipping (fp32 scalar; 0 when no parameter has one).
    """
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(grad.float()) for grad in grads]
    if clip > 0:
        for grad, norm in zip(grads, norms):
            # A tensor factor capped at 1 instead of the reference's `if coef < 1`: no device synchronisation.
            grad.mul_((clip / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
    return torch.linalg.vector_norm(torch.stack(norms))


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
    for index, (student_param, teacher_param) in enumerate(zip(student_params, teacher_params)):
        if student_param.shape != teacher_param.shape:
            raise ValueError(
                f"parameter {index} differs in shape: student {tuple(student_param.shape)}, "
                f"teacher {tuple(teacher_param.shape)}"
            )
        teacher_param.mul_(momentum).add_(student_param.detach(), alpha=1 - momentum)


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """Teacher EMA momentum at iteration ``step``: cosine from ``base`` (step 0) to 1 (step ``total_steps - 1``)."""
    return warmup_cosine(step, base_lr=base, total_steps=total_steps, min_lr=1.0)
