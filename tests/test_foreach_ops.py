"""The foreach versions of the EMA, per-parameter clipping, LARS and fused AdamW against the former loops.

The former per-parameter loops are the baselines of ``benchmarks/step_ops.py``, imported from there.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from dae.engine import LARS, build_optimizer, clip_gradients, update_teacher

_SPEC = importlib.util.spec_from_file_location(
    "step_ops", Path(__file__).resolve().parents[1] / "benchmarks" / "step_ops.py"
)
assert _SPEC is not None and _SPEC.loader is not None
step_ops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(step_ops)

# 2-D and higher, 1-D and 0-D parameters, two all-zero ones (zero norms), and the last one without a gradient.
_SHAPES = [(8, 4), (16,), (3, 5, 2), (4, 4, 3, 3), (7,), (), (6, 6), (5, 3), (4,), (3, 3)]


def _params(seed: int) -> nn.ParameterList:
    generator = torch.Generator().manual_seed(seed)
    params = nn.ParameterList(nn.Parameter(torch.randn(shape, generator=generator)) for shape in _SHAPES)
    with torch.no_grad():
        params[7].zero_()
        params[8].zero_()
    return params


def _set_grads(params: nn.ParameterList, seed: int) -> None:
    """Gradients of norms from well below to well above the clip threshold 1, two zero ones, none on the last."""
    generator = torch.Generator().manual_seed(seed)
    for index, param in enumerate(params[:-1]):
        scale = 10.0 ** (index % 4 - 2)
        param.grad = (scale * torch.randn(param.shape, generator=generator)).to(param.dtype)
    params[1].grad.zero_()
    params[6].grad.zero_()  # 2-D without weight decay in LARS: a zero update norm
    params[-1].grad = None


def _grads(params: nn.ParameterList) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_ema_is_bit_identical_to_the_loop() -> None:
    student, teacher = _params(0), _params(1)
    reference = copy.deepcopy(teacher)
    for step, momentum in enumerate((0.996, 0.9, 1.0, 0.0)):
        with torch.no_grad():
            for param in student:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(step)))
        update_teacher(student, teacher, momentum)
        step_ops.ema_loop(student.parameters(), reference.parameters(), momentum)
        for new, old in zip(teacher, reference, strict=True):
            assert torch.equal(new, old)


def test_ema_shape_check() -> None:
    student, teacher = nn.Linear(1, 3), nn.Linear(1, 3)
    student.bias = nn.Parameter(torch.zeros(1))  # would broadcast into the teacher's (3,) in place, silently
    before = teacher.weight.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 1 differs in shape: student \(1,\), teacher \(3,\)"):
        update_teacher(student, teacher, 0.9)
    assert torch.equal(teacher.weight, before)
    update_teacher(nn.Module(), nn.Module(), 0.9)  # no parameters: nothing to do


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)])
def test_per_parameter_clipping_equals_the_loop(max_norm: float, dtypes: tuple[torch.dtype, ...]) -> None:
    # With several dtypes the parameters alternate between them, so the foreach code works per dtype.
    new = nn.ParameterList(p.to(dtypes[i % len(dtypes)]) for i, p in enumerate(_params(0)))
    old = copy.deepcopy(new)
    for step in range(3):
        for params in (new, old):
            _set_grads(params, seed=step)
        before = _grads(new)
        norm = clip_gradients(new.parameters(), max_norm, mode="per_parameter")
        expected = step_ops.clip_loop(old.parameters(), max_norm)
        assert norm.dtype == torch.float32
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        for param, reference, grad in zip(new, old, before, strict=True):
            if grad is None:
                assert param.grad is None and reference.grad is None
            elif max_norm == 0:
                assert torch.equal(param.grad, grad)  # measured only: untouched
            else:
                # A half-precision factor can round the other way when the two fp32 norms differ in the last bit.
                rtol = 1e-6 if param.dtype == torch.float32 else 2 * torch.finfo(param.dtype).eps
                torch.testing.assert_close(param.grad, reference.grad, rtol=rtol, atol=0)


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_per_parameter_clipping_of_an_infinite_gradient(max_norm: float) -> None:
    new, old = _params(0), _params(0)
    for params in (new, old):
        _set_grads(params, seed=0)
        params[2].grad[0, 0, 0] = math.inf
    before = _grads(new)
    norm = clip_gradients(new.parameters(), max_norm, mode="per_parameter")
    assert math.isinf(norm.item()) and math.isinf(step_ops.clip_loop(old.parameters(), max_norm).item())
    for param, reference, grad in zip(new, old, before, strict=True):
        if grad is None:
            continue
        if max_norm == 0:
            assert torch.equal(param.grad, grad)
        else:
            # The infinite gradient's factor is 0: NaN where it was infinite, 0 elsewhere, as in the loop.
            torch.testing.assert_close(param.grad, reference.grad, rtol=1e-6, atol=0, equal_nan=True)
    if max_norm > 0:
        assert new[2].grad.isnan().sum() == 1 and new[2].grad.nan_to_num().abs().sum() == 0


def _lars_groups(params: nn.ParameterList) -> list[dict]:
    return [
        {"params": [params[i] for i in (0, 1, 3, 7)], "weight_decay": 0.04},
        {"params": [params[i] for i in (2, 4, 5, 6, 8, 9)], "weight_decay": 0.0, "lr": 0.5, "eta": 0.02},
    ]


def test_lars_equals_the_loop() -> None:
    new = _params(0)
    old = copy.deepcopy(new)
    optimizer = LARS(_lars_groups(new), lr=0.1, momentum=0.9, eta=0.001)
    # The loop reads every setting from its groups: the optimizer's own, with the copies' parameters.
    old_groups = [{**group, "params": ref["params"]} for group, ref in zip(optimizer.param_groups, _lars_groups(old))]
    buffers: dict[torch.Tensor, torch.Tensor] = {}
    for step in range(3):
        for params in (new, old):
            _set_grads(params, seed=step)
        optimizer.step()
        step_ops.lars_loop(old_groups, buffers)
        for param, reference in zip(new, old, strict=True):
            torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-9)
            if reference in buffers:
                buffer = optimizer.state[param]["momentum_buffer"]
                torch.testing.assert_close(buffer, buffers[reference], rtol=1e-6, atol=1e-9)
            else:
                assert param not in optimizer.state
    assert len(optimizer.state) == len(buffers) == len(_SHAPES) - 1


def test_lars_state_dict_keeps_its_layout() -> None:
    params = _params(0)
    optimizer = LARS(_lars_groups(params), lr=0.1)
    _set_grads(params, seed=0)
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    assert all(set(entry) == {"momentum_buffer"} for entry in state["state"].values())
    restored = LARS(_lars_groups(copy.deepcopy(params)), lr=0.1)
    restored.load_state_dict(state)
    for param in restored.state:
        assert restored.state[param]["momentum_buffer"].shape == param.shape


def test_fused_adamw_equals_adamw() -> None:
    new = _params(0)
    old = copy.deepcopy(new)

    def groups(params: nn.ParameterList) -> list[dict]:
        return [{"params": list(params[:5]), "weight_decay": 0.04}, {"params": list(params[5:]), "weight_decay": 0.0}]

    fused = build_optimizer("adamw", groups(new), lr=1e-2, fused=True)
    plain = build_optimizer("adamw", groups(old), lr=1e-2)
    assert fused.defaults["fused"] is True and plain.defaults["fused"] is None
    for step in range(3):
        for params in (new, old):
            _set_grads(params, seed=step)
        fused.step()
        plain.step()
        for param, reference in zip(new, old, strict=True):
            torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6)


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every tensor-to-Python conversion (a host synchronisation on a GPU) append its name to a list."""
    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name, _original: Callable = original) -> object:
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_no_host_synchronisation(monkeypatch: pytest.MonkeyPatch) -> None:
    params, teacher = _params(0), _params(1)
    optimizer = LARS(_lars_groups(params), lr=0.1)
    calls = _count_host_reads(monkeypatch)
    assert bool(torch.ones(())) and calls == ["__bool__"]  # the counter counts
    calls.clear()
    for step in range(2):
        _set_grads(params, seed=step)
        clip_gradients(params.parameters(), 1.0, mode="per_parameter")
        clip_gradients(params.parameters(), 0.0, mode="per_parameter")
        optimizer.step()
        update_teacher(params, teacher, 0.996)
    monkeypatch.undo()
    assert calls == []
