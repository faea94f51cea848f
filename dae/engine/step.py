"""The one optimisation step of the project: backward, unscale, clip, update; used by every training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["CLIP_MODES", "backward_step", "clip_gradients"]

#: ``"global"``: one norm over all gradients (``torch.nn.utils.clip_grad_norm_``);
#: ``"per_parameter"``: each parameter's gradient on its own, as DINO does.
CLIP_MODES = ("global", "per_parameter")


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip gradients to ``max_norm`` and return the global L2 norm of all gradients before clipping.

    ``mode="global"`` rescales all gradients together when their joint norm exceeds ``max_norm``;
    ``mode="per_parameter"`` rescales each parameter whose own gradient norm exceeds ``max_norm`` (to just
    under it) and leaves the others alone. ``max_norm <= 0`` only measures. Parameters without a gradient
    are ignored. Unscale fp16 gradients first.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {list(CLIP_MODES)}, got {mode!r}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if mode == "global":
        # Measured apart from the clipping, so that "only measure" never touches the gradients (an infinite
        # norm would otherwise turn every gradient into NaN through the factor inf / inf).
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    norms = []
    for grads in _by_device_and_dtype([p.grad for p in params]):
        # One fp32 norm per gradient, whatever the gradient's dtype, in one foreach call.
        group_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if max_norm > 0:
            # A tensor factor capped at 1 instead of the reference's `if coef < 1`: no device synchronisation.
            factors = (max_norm / (group_norms + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
            torch._foreach_mul_(grads, factors.unbind())
        norms.append(group_norms.to(params[0].grad.device))
    return torch.linalg.vector_norm(torch.cat(norms))


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` split by device and dtype (in first-seen order), as foreach ops and ``torch.stack`` need."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())


def backward_step(
    loss: torch.Tensor,
    optimizer: Optimizer,
    parameters: Iterable[torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float = 0.0,
    clip_mode: str = "global",
    before_update: Callable[[], None] | None = None,
) -> torch.Tensor | None:
    """Zero the gradients, back-propagate ``loss``, clip, and step ``optimizer`` (through ``scaler`` if given).

    Args:
        loss: the scalar to minimise.
        optimizer: the optimizer.
        parameters: the parameters whose gradients are clipped and measured; None: neither (e.g. a probe's
            heads, whose norm nobody reads).
        scaler: a gradient scaler for fp16 (gradients are unscaled before clipping), or None.
        clip_grad: maximum gradient norm; 0 only measures.
        clip_mode: ``"global"`` or ``"per_parameter"`` (see :func:`clip_gradients`).
        before_update: called after clipping and before the update, e.g. to drop some gradients.

    Returns:
        The global gradient norm of ``parameters`` before clipping, or None without ``parameters``.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = None if parameters is None else clip_gradients(parameters, clip_grad, clip_mode)
    if before_update is not None:
        before_update()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm
