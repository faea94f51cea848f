"""Helpers for ``torch.distributed`` that also work in a single process without a process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def init_distributed(backend: str | None = None) -> torch.device:
    """Initialise the default process group from the ``torchrun`` environment and return this rank's device.

    The backend is NCCL when CUDA is available and gloo otherwise, unless ``backend`` is given. Without
    ``WORLD_SIZE`` in the environment (a plain ``python`` launch) nothing is initialised and the first GPU,
    or the CPU, is returned.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return device


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all ranks (returns a new tensor; identity in a single process)."""
    if not is_distributed():
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns to each rank the summed gradient of its own part."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss depends on every rank's features: sum the gradients from all ranks. all_reduce
        # (not reduce_scatter) so that gloo works too.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape. In the backward pass each rank receives the sum over
    all ranks of the gradients that flowed into its own part, so that, after DDP averages the parameter
    gradients, they equal the gradient of the mean of the per-rank losses (as if computed on one device).
    Tensors that do not require a gradient are gathered without autograd.
    """
    if not is_distributed():
        return tensor
    if not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(tensor)
