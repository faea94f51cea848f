"""GPU speed settings shared by every bundle: cuDNN autotuning, TF32, channels-last memory layout, compilation.

Each is a config key of the training bundles (``cudnn_benchmark``, ``tf32``, ``channels_last``, ``compile``,
``fused_adamw``); the bundle docs give their trade-offs. All of them are no-ops where they do not apply (cuDNN
and TF32 on a CPU), so a config is the same on a laptop and on a GPU node.
"""

from __future__ import annotations

import torch
from torch import nn

from dae.utils.config import resolve_flag

__all__ = ["backend_settings", "channels_last", "channels_last_module", "compile_module", "memory_format"]


def backend_settings(cudnn_benchmark: bool | str = True, tf32: bool | str = True) -> None:
    """Set the process-wide cuDNN autotuner and TF32 flags.

    Args:
        cudnn_benchmark: let cuDNN time its convolution algorithms on the first call of each input shape and
            keep the fastest. A gain for fixed crop sizes (pretraining, patch training); a loss when every
            batch has a new shape (whole-volume inference without padding), where it re-tunes every call.
        tf32: run fp32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa, fp32 range)
            on Ampere and later GPUs. Several times faster in fp32 runs; no effect on bf16/fp16 autocast regions
            or on a CPU. Turn off for bit-level comparisons with an fp32 reference.
    """
    torch.backends.cudnn.benchmark = resolve_flag(cudnn_benchmark, "cudnn_benchmark")
    precision = "tf32" if resolve_flag(tf32, "tf32") else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


def memory_format(ndim: int) -> torch.memory_format | None:
    """The channels-last layout of a tensor with ``ndim`` dimensions: 4 (2D images), 5 (volumes), else None."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout when it is a batch of 2D images or volumes; other tensors unchanged."""
    layout = memory_format(x.ndim)
    return x if layout is None else x.contiguous(memory_format=layout)


@torch.no_grad()
def channels_last_module(module: nn.Module) -> nn.Module:
    """Put every 4-D and 5-D parameter and buffer of ``module`` in channels-last layout, in place.

    ``nn.Module.to(memory_format=...)`` takes one layout for all, which fails on a network with both 2D and 3D
    convolutions, or 3D ones alone with ``torch.channels_last``; this picks the layout by rank.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        layout = memory_format(tensor.ndim)
        if layout is not None:
            tensor.data = tensor.data.contiguous(memory_format=layout)
    return module


def compile_module(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Compile ``module`` in place with ``torch.compile`` (``nn.Module.compile``) and return it.

    In place, so its ``state_dict`` keys stay those of the plain module and checkpoints load either way. The
    first iterations (and the first of each new input shape) pay the compilation; on a CPU inductor needs a
    C++ compiler.
    """
    if enabled:
        module.compile()
    return module
