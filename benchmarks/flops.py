"""FLOP per sample of a training step, their cache, and the GPU peaks that turn throughput into MFU.

The FLOP are counted by :class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and convolutions
(and fused attention), 2 FLOP per multiply-add, over one forward and backward of the trainer's losses on a real
batch; normalisation, activations, the loss's element-wise work and the optimizer update are not counted. The
count depends only on shapes, so it is made once per configuration and kept in ``benchmarks/flops_cache.json``
under a hash of the values that determine it.

The counted step runs for real on the trainer's device. Fake tensors (shapes only, no compute) give the same
totals many times faster, but with the trainer's real modules they leave fake gradients and autograd history on
real tensors, and they fail on any step that reads a value on the host; a one-off count does not need the speed.

MFU (model FLOP utilisation) is achieved FLOP/s over the device's dense peak for the run's precision, from the
NVIDIA datasheets (H100/H200 SXM, H100 PCIe, A100); other devices, CPUs included, have no peak here ("n/a").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

CACHE = Path(__file__).resolve().parent / "flops_cache.json"
Shape = tuple[int, ...]

#: dense peak TFLOP/s by GPU name (a regular expression, first match wins) and precision; NVIDIA datasheets
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100(?!.*NVL)|H200(?!.*NVL)", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def _cpu_attention(query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out: Shape, query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels but not the CPU one, so a ViT would count fewer FLOP on a CPU.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOP of the matrix products, convolutions and attention that ``fn()`` runs.

    A multiply-add counts 2; backward passes run inside ``fn`` are counted as well. E.g. ``nn.Linear(i, o)`` on a
    batch of ``b`` that requires grad: ``2*b*i*o`` forward, twice that backward (input and weight gradients).

    Args:
        fn: the computation, run once.

    Returns:
        The total FLOP.
    """
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


def training_flops(trainer: Any, batch: Any) -> int:
    """The FLOP of one forward and backward of ``trainer.compute_losses(batch)["loss"]``, run for real.

    Compiled modules run eagerly meanwhile (the count does not trigger compilation), and the gradients are
    dropped afterwards. The step's other effects remain (disruption generator, DINO centre, BatchNorm
    statistics): count before the warm-up iterations.

    Args:
        trainer: a :class:`dae.engine.Trainer`.
        batch: a batch of its training loader.

    Returns:
        The total FLOP of the step, for the whole batch.
    """
    with torch.compiler.set_stance("force_eager"):
        flop = count_flops(lambda: trainer.compute_losses(batch)["loss"].backward())
    trainer.model.zero_grad(set_to_none=True)
    return flop


def cache_key(description: Mapping[str, object]) -> str:
    """A stable short hash of ``description`` (JSON with sorted keys)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of the FLOP cache at ``path`` (none when it does not exist)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_cache_entry(path: Path, description: Mapping[str, object], flop_per_sample: float, counted: str) -> None:
    """Add (or replace) the entry of ``description`` in the FLOP cache at ``path``, atomically; one line per entry.

    Args:
        path: the cache file.
        description: what determines the count.
        flop_per_sample: the count.
        counted: how it was counted (device, torch version, time), for the reader.
    """
    entries = read_cache(path)
    entries[cache_key(description)] = {
        "description": dict(description),
        "flop_per_sample": flop_per_sample,
        "counted": counted,
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True, default=str)}" for k, v in sorted(entries.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp, path)


def sample_flops(trainer: Any, batch: Any, samples: int, description: Mapping[str, object], cache: Path) -> float:
    """FLOP per sample of a training step: from ``cache``, or counted on ``batch`` and added to it.

    Args:
        trainer: a :class:`dae.engine.Trainer`; counting runs one forward and backward (see :func:`training_flops`).
        batch: a batch of its training loader.
        samples: the number of samples in ``batch``.
        description: everything that determines the count (benchmark, network shape, input sizes); JSON-able.
        cache: the cache file.

    Returns:
        The step's FLOP divided by ``samples``.
    """
    entry = read_cache(cache).get(cache_key(description))
    if entry is not None:
        print(f"FLOP/sample from {cache.name}: {entry['flop_per_sample'] / 1e12:.4g} TFLOP")
        return float(entry["flop_per_sample"])
    tic = time.perf_counter()
    flop = training_flops(trainer, batch) / samples
    seconds = time.perf_counter() - tic
    write_cache_entry(cache, description, flop, f"{trainer.device}, torch {torch.__version__}, {seconds:.1f} s")
    print(f"FLOP/sample counted in {seconds:.1f} s: {flop / 1e12:.4g} TFLOP, added to {cache}")
    return flop


def precision(amp: str, tf32: bool, device: torch.device) -> str:
    """The precision of a run's matrix products: ``bf16``, ``fp16``, ``tf32`` or ``fp32``.

    Args:
        amp: the bundle's ``amp`` (``none``, ``bf16``, ``fp16``).
        tf32: the bundle's ``tf32``; it applies without autocast on GPUs with TF32 tensor cores (Ampere and later).
        device: the training device.
    """
    if amp != "none":
        return amp
    has_tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return "tf32" if tf32 and has_tf32 else "fp32"


def gpu_peak(name: str, precision: str) -> float | None:
    """The dense peak TFLOP/s of the GPU called ``name`` at ``precision``, or None when :data:`PEAK_TFLOPS` has none."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return peaks.get(precision)
    return None


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense peak TFLOP/s of ``device`` at ``precision``; None for CPUs and GPUs without an entry."""
    return gpu_peak(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


def format_mfu(achieved_tflops: float, peak: float | None) -> str:
    """MFU as a percentage of ``peak``, or ``"n/a"`` without a peak."""
    return "n/a" if peak is None else f"{achieved_tflops / peak:.1%}"
