"""Per-parameter Python loops against their ``torch._foreach_*`` versions, on a DINO student's parameters.

Builds a student like DINO's (a ``dae.models.build_backbone`` backbone and a ``DINOHead`` with ``--out_dim``
prototypes, default ViT-S/16 and 65536), gives every trainable parameter a random gradient and times, in one
process and in alternating blocks, the former per-parameter loops (written below; ``tests/test_foreach_ops.py``
proves the new code equal to them) against the code of ``dae.engine``:

* ``ema``: the teacher update, ``dae.engine.update_teacher``;
* ``clip``: per-parameter gradient clipping at 3, ``dae.engine.clip_gradients(..., mode="per_parameter")``;
* ``lars``: one step of ``dae.engine.LARS``;
* ``adamw``: one step of the default ``torch.optim.AdamW`` against the fused one (``build_optimizer(...,
  fused=True)``).

Each line gives the median milliseconds per call of the old and the new code and their ratio new / old. The
values move a little from call to call (the same parameters are updated again and again); only time matters.

Examples::

    # ViT-S/16 with 65536 prototypes, on the GPU when there is one
    python benchmarks/step_ops.py
    # a quick CPU run
    python benchmarks/step_ops.py --device cpu --out_dim 1024 --repeats 5
    # ResNet-50 with DAX's 60000 prototypes
    python benchmarks/step_ops.py --arch resnet50 --out_dim 60000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dae.engine import LARS, build_optimizer, clip_gradients, param_groups, update_teacher
from dae.models import DINOHead, build_backbone

CLIP = 3.0  # DINO's default clip_grad


@torch.no_grad()
def ema_loop(student_params: Iterable[torch.Tensor], teacher_params: Iterable[torch.Tensor], momentum: float) -> None:
    """The former teacher update: ``t = momentum * t + (1 - momentum) * s``, parameter by parameter."""
    for student_param, teacher_param in zip(student_params, teacher_params, strict=True):
        teacher_param.mul_(momentum).add_(student_param.detach(), alpha=1 - momentum)


@torch.no_grad()
def clip_loop(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The former per-parameter clipping; returns the global norm of all gradients before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]
    if max_norm > 0:
        for param, norm in zip(params, norms):
            param.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(param.grad.dtype))
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def lars_loop(groups: Iterable[dict], buffers: dict[torch.Tensor, torch.Tensor]) -> None:
    """The former ``LARS.step``, parameter by parameter.

    Args:
        groups: parameter groups with all of ``params``, ``lr``, ``weight_decay``, ``momentum`` and ``eta``.
        buffers: the momentum buffer of each parameter, filled on the first step.
    """
    for group in groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            update = param.grad
            if param.ndim != 1:
                update = update.add(param, alpha=group["weight_decay"])
                param_norm = torch.linalg.vector_norm(param)
                update_norm = torch.linalg.vector_norm(update)
                ratio = torch.where(
                    (param_norm > 0) & (update_norm > 0),
                    group["eta"] * param_norm / update_norm,
                    torch.ones_like(param_norm),
                )
                update = update.mul(ratio)
            if param not in buffers:
                buffers[param] = torch.zeros_like(param)
            buffers[param].mul_(group["momentum"]).add_(update)
            param.add_(buffers[param], alpha=-group["lr"])


def build_student(arch: str, patch_size: int, out_dim: int) -> nn.Module:
    """A DINO student: the backbone and its projection head (DINO's ViT head: no BatchNorm, frozen norms)."""
    backbone = build_backbone(arch, patch_size=patch_size)
    return nn.ModuleDict({"backbone": backbone, "head": DINOHead(backbone.embed_dim, out_dim)})


def time_pair(
    old: Callable[[], object], new: Callable[[], object], device: torch.device, repeats: int, calls: int
) -> tuple[float, float]:
    """Median seconds per call of ``old`` and ``new``, timed in alternating blocks of ``calls`` calls."""

    def block(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        # The order alternates too, so that neither side always runs on a cache the other warmed.
        for side in (0, 1) if repeat % 2 == 0 else (1, 0):
            times[side].append(block((old, new)[side]))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", help="a dae.models.build_backbone architecture")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=65536, help="prototypes of the DINO head")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed blocks per side; the median is reported")
    parser.add_argument("--calls", type=int, default=1, help="calls per timed block")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    student = build_student(args.arch, args.patch_size, args.out_dim).to(device)
    teacher = copy.deepcopy(student)
    params = [p for p in student.parameters() if p.requires_grad]
    for param in params:
        param.grad = torch.randn_like(param)
    lars_groups = [{**g, "lr": 1e-4, "momentum": 0.9, "eta": 1e-3} for g in param_groups(student, 0.04)]
    lars, lars_buffers = LARS(param_groups(student, 0.04), lr=1e-4), {}
    adamw, adamw_fused = (build_optimizer("adamw", param_groups(student, 0.04), 1e-4, fused=f) for f in (False, True))
    ops = {
        "ema": (
            lambda: ema_loop(student.parameters(), teacher.parameters(), 0.996),
            lambda: update_teacher(student, teacher, 0.996),
        ),
        "clip": (lambda: clip_loop(params, CLIP), lambda: clip_gradients(params, CLIP, mode="per_parameter")),
        "lars": (lambda: lars_loop(lars_groups, lars_buffers), lars.step),
        "adamw": (adamw.step, adamw_fused.step),
    }

    numel = sum(p.numel() for p in params)
    print(
        f"{args.arch}/{args.patch_size} + DINOHead({args.out_dim}) on {device} (torch {torch.__version__}): "
        f"{len(params)} trainable tensors, {numel / 1e6:.1f}M parameters; median of {args.repeats} x {args.calls} calls"
    )
    for name, (old, new) in ops.items():
        for _ in range(args.warmup):
            old()
            new()
        old_s, new_s = time_pair(old, new, device, args.repeats, args.calls)
        print(f"{name:<6} old {old_s * 1e3:9.3f} ms   new {new_s * 1e3:9.3f} ms   new/old {new_s / old_s:.2f}")


if __name__ == "__main__":
    main()
