"""Optimizer parameter groups."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


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
