"""Optimizer parameter groups and the optimizers of the DINO branch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from dae.engine.lars import LARS
from dae.utils.config import resolve_flag

__all__ = ["OPTIMIZERS", "build_optimizer", "fused_option", "param_groups", "scaled_lr"]

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Biases, normalisation weights (all 1-D parameters) and the Swin relative-position bias tables are not
    weight-decayed. The reference DAE code meant to exempt the bias tables too, but its name filter never
    matched the real parameter names, so they were decayed there.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or "relative_position_bias_table" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_option(fused: bool | str) -> bool | None:
    """torch's ``fused`` argument of AdamW (and Adam) for the flag ``fused``, read strictly: True, or None.

    None rather than False: an explicit ``fused=False`` also turns off torch's default multi-tensor (``foreach``)
    implementation, leaving a per-parameter loop. Bundles that build ``torch.optim.AdamW`` themselves pass
    ``fused: "$dae.engine.fused_option(@fused_adamw)"``.
    """
    return True if resolve_flag(fused, "fused") else None


def build_optimizer(
    name: str,
    groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 0.0,
    momentum: float = 0.9,
    fused: bool = False,
) -> Optimizer:
    """Build the optimizer named ``name`` for DINO-style training, where the loop sets lr (and wd) every iteration.

    ``fused=True`` makes AdamW update all parameters in one kernel per device and dtype (instead of the
    multi-tensor ``foreach`` version, a few kernels per step operation, or a Python loop on CPU). Its results
    agree with the default AdamW to rounding, not bit for bit; all parameters must be floating point and on a
    device type with fused kernels (CUDA and CPU among them), which torch checks when the optimizer is built.
    It works with a ``GradScaler``: the scaler hands its inf/NaN flag to the kernel, which skips the update on
    the device, where the default AdamW makes the scaler read the flag on the host (a synchronisation).

    Args:
        name: ``"adamw"`` (torch defaults apart from ``lr``), ``"sgd"`` (with ``momentum``) or ``"lars"``
            (:class:`dae.engine.lars.LARS` with ``momentum``); case-insensitive.
        groups: parameters or parameter groups, e.g. from :func:`param_groups`.
        lr: initial learning rate.
        momentum: momentum of SGD and LARS (unused by AdamW).
        fused: use the fused AdamW kernel (AdamW only).

    Returns:
        The optimizer.

    Raises:
        ValueError: for an unknown ``name``, or ``fused=True`` with another optimizer than AdamW.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if fused_option(fused) and key != "adamw":
        raise ValueError(f"fused is for adamw only, got optimizer {name!r}")
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused_option(fused))
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return LARS(groups, lr=lr, momentum=momentum)


def scaled_lr(lr: float, total_batch_size: int, reference_batch_size: int = 256) -> float:
    """The linear scaling rule of DINO and DAX: ``lr`` is given for ``reference_batch_size`` images per step."""
    if total_batch_size < 1 or reference_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {total_batch_size} and {reference_batch_size}")
    return lr * total_batch_size / reference_batch_size
