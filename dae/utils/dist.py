"""Helpers for ``torch.distributed`` that also work in a single process without a process group."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

__all__ = [
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "convert_sync_batchnorm",
    "default_device",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "global_batch_size",
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


def global_batch_size(batch_size: int) -> int:
    """``batch_size`` per process times the number of processes.

    The number of processes is the process group's, or, before the group is set up, torchrun's ``WORLD_SIZE``
    (1 without torchrun), so that a config can scale the learning rate before ``init_distributed`` runs.
    """
    initialised = dist.is_available() and dist.is_initialized()
    return batch_size * (get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def default_device() -> torch.device:
    """The device of a single-process run: the first GPU when CUDA is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def destroy_distributed() -> None:
    """Tear down the default process group if one is set up (the end of a torchrun job); else do nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its BatchNorms synchronised across ranks on GPUs; unchanged on CPU (gloo has no kernels)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module) if torch.cuda.is_available() else module


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


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape. In the backward pass each rank receives the sum over
    all ranks of the gradients that flowed into its own part, so that, after DDP averages the parameter
    gradients, they equal the gradient of the mean of the per-rank losses (as if computed on one device).
    This is ``torch.distributed.nn.functional.all_gather`` (its backward is a reduce-scatter on NCCL and an
    all-to-all plus sum elsewhere, so gloo works too); torch marks it deprecated in favour of the functional
    collectives, and that notice is silenced here. A tensor without gradient (e.g. labels) goes through the
    same gather. In a single process the tensor is returned as it is.
    """
    if not is_distributed():
        return tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return torch.cat(dist_nn.all_gather(tensor), dim=0)
