"""LARS optimizer (You et al., 2017) as used by DINO and DAX for ResNet pretraining."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from dae.engine.step import _by_device_and_dtype

__all__ = ["LARS"]


class LARS(Optimizer):
    """SGD with momentum and a layer-wise trust ratio (the variant of DINO, after Barlow Twins).

    For every parameter ``p`` with gradient ``g`` that is not 1-D (biases and normalisation weights are)::

        d = g + weight_decay * p
        d = d * eta * ||p|| / ||d||      (the ratio is 1 when ||p|| or ||d|| is 0)

    1-D parameters use ``d = g``, without decay or adaptation. Then, for all parameters::

        mu = momentum * mu + d
        p  = p - lr * mu

    ``lr`` and ``weight_decay`` are read per parameter group, so a group with ``weight_decay=0`` is not decayed.
    The learning rate defaults to 0 because the training loop sets it every iteration. A step costs a few
    ``torch._foreach_*`` calls per parameter group (and per device and dtype in it), not a loop over parameters,
    and never synchronises with the host.

    Why not ``timm.optim.Lars``: its trust ratio is ``eta * ||p|| / (||g|| + weight_decay * ||p||)``, the
    triangle bound of DINO's ``||g + weight_decay * p||``, and it adapts the parameters of every group whose
    weight decay is not 0 (or of all groups with ``always_adapt``) instead of every parameter that is not 1-D.
    On DINO's groups (2-D weights decayed, 1-D ones not) the 1-D parameters agree exactly, but a decayed
    weight moves differently whenever its gradient is not parallel to it (by 3.7% of the update for a random
    gradient in ``tests/test_dino_optim.py::test_lars_against_timm``), and a weight in a group without decay
    is adapted here and not by timm; so DINO's formula is kept.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, >= 0.
        weight_decay: weight-decay coefficient, >= 0.
        momentum: momentum coefficient, >= 0.
        eta: trust coefficient, >= 0.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("eta", eta)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in _by_device_and_dtype([p for p in group["params"] if p.grad is not None]):
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """One step of ``params`` (with gradients, on one device, of one dtype) with a few foreach calls."""
        flat = [p for p in params if p.ndim == 1]
        adapted = [p for p in params if p.ndim != 1]
        updates = [p.grad for p in flat]
        if adapted:
            decayed = torch._foreach_add([p.grad for p in adapted], adapted, alpha=group["weight_decay"])
            param_norms = torch.stack(torch._foreach_norm(adapted))
            update_norms = torch.stack(torch._foreach_norm(decayed))
            # torch.where rather than a Python branch: no host-device synchronisation.
            ratios = torch.where(
                (param_norms > 0) & (update_norms > 0),
                group["eta"] * param_norms / update_norms,
                torch.ones_like(param_norms),
            )
            torch._foreach_mul_(decayed, ratios.unbind())
            updates += decayed
        ordered = flat + adapted
        buffers = []
        for param in ordered:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, updates)
        torch._foreach_add_(ordered, buffers, alpha=-group["lr"])
