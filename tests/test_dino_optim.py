"""Tests of the DINO optimisation steps: LARS, `build_optimizer`, per-parameter clipping, freeze, EMA teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.optim import Lars as TimmLars
from torch import nn

from dae.engine import (
    LARS,
    backward_step,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    scaled_lr,
    update_teacher,
)
from dae.utils.dist import global_batch_size
from dae.utils.schedules import CosineSchedule


def _lars_two_steps() -> tuple[nn.Parameter, nn.Parameter, LARS]:
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    bias = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = LARS([weight, bias], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.3)
    for _ in range(2):
        weight.grad = torch.tensor([[1.5, -2.0]])
        bias.grad = torch.tensor([0.5, -1.0])
        optimizer.step()
    return weight, bias, optimizer


def test_lars_two_steps_by_hand() -> None:
    weight, bias, _ = _lars_two_steps()
    # Step 1, 2-D weight p = [3, 4] (norm 5), g = [1.5, -2]: d = g + 0.5 p = [3, 0] (norm 3),
    # q = 0.3 * 5 / 3 = 0.5, d = [1.5, 0], mu = d, p = p - 0.1 mu = [2.85, 4].
    # Step 2: d = g + 0.5 p = [2.925, 0] (norm 2.925), ||p|| = sqrt(2.85^2 + 16),
    # q d = [0.3 * ||p||, 0], mu = 0.9 [1.5, 0] + [0.3 ||p||, 0], p = [2.85 - 0.1 mu_0, 4].
    norm = math.sqrt(2.85**2 + 16)
    expected_weight = [[2.85 - 0.1 * (0.9 * 1.5 + 0.3 * norm), 4.0]]
    torch.testing.assert_close(weight.detach(), torch.tensor(expected_weight))
    # 1-D bias, no decay, no adaptation: mu1 = g, b = [0.95, 2.1]; mu2 = 0.9 g + g = 1.9 g,
    # b = [0.95 - 0.1 * 1.9 * 0.5, 2.1 + 0.1 * 1.9 * 1] = [0.855, 2.29].
    torch.testing.assert_close(bias.detach(), torch.tensor([0.855, 2.29]))


def test_lars_groups_and_zero_norms() -> None:
    decayed = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    plain = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    zero = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS(
        [{"params": [decayed], "weight_decay": 0.5}, {"params": [plain, zero], "weight_decay": 0.0, "lr": 1.0}],
        lr=0.1,
        eta=0.3,
    )
    for param in (decayed, plain):
        param.grad = torch.tensor([[1.5, -2.0]])
    zero.grad = torch.ones(2, 2)
    optimizer.step()
    # Decayed group: as in the hand computation above, [3 - 0.1 * 1.5, 4].
    torch.testing.assert_close(decayed.detach(), torch.tensor([[2.85, 4.0]]))
    # No decay, lr 1: d = g (norm 2.5), q = 0.3 * 5 / 2.5 = 0.6, p = [3 - 0.9, 4 + 1.2].
    torch.testing.assert_close(plain.detach(), torch.tensor([[2.1, 5.2]]))
    # ||p|| = 0: the trust ratio is 1, p = -1 * g.
    torch.testing.assert_close(zero.detach(), -torch.ones(2, 2))

    still = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    still.grad = torch.zeros(1, 2)
    LARS([still], lr=0.1).step()
    # ||d|| = 0: ratio 1, no NaN, no move.
    torch.testing.assert_close(still.detach(), torch.tensor([[3.0, 4.0]]))


def test_lars_state_round_trip() -> None:
    weight, bias, optimizer = _lars_two_steps()
    # A deep copy, as after torch.save / torch.load: state_dict() shares the momentum buffers.
    state = copy.deepcopy(optimizer.state_dict())
    assert len(state["state"]) == 2 and "momentum_buffer" in state["state"][0]
    weight_copy, bias_copy = (nn.Parameter(p.detach().clone()) for p in (weight, bias))
    restored = LARS([weight_copy, bias_copy], lr=0.5)
    restored.load_state_dict(state)
    assert restored.param_groups[0]["lr"] == 0.1 and restored.param_groups[0]["eta"] == 0.3
    for opt, params in ((optimizer, (weight, bias)), (restored, (weight_copy, bias_copy))):
        params[0].grad = torch.tensor([[0.3, 0.7]])
        params[1].grad = torch.tensor([-0.2, 0.4])
        opt.step()
    torch.testing.assert_close(weight_copy, weight)
    torch.testing.assert_close(bias_copy, bias)


def _one_step(optimizer_class: type, groups: list[dict], grads: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    params = [nn.Parameter(p.clone()) for group in groups for p in group["params"]]
    it = iter(params)
    copies = [{**group, "params": [next(it) for _ in group["params"]]} for group in groups]
    optimizer = optimizer_class(copies, lr=0.1, momentum=0.9, **kwargs)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()
    return [param.detach() for param in params]


def test_lars_against_timm() -> None:
    """timm's Lars is not DINO's: where they agree and where not (why dae.engine.LARS is kept)."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)
    grads = [torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)]
    groups = [{"params": [weight], "weight_decay": 0.04}, {"params": [bias], "weight_decay": 0.0}]  # DINO's split
    ours = _one_step(LARS, groups, grads, eta=0.001)
    timm = _one_step(TimmLars, groups, grads, trust_coeff=0.001, eps=0.0)
    # Not decayed and 1-D: plain SGD with momentum in both.
    torch.testing.assert_close(ours[1], timm[1], rtol=0, atol=0)
    # Decayed weight: DINO divides by ||g + wd p||, timm by ||g|| + wd ||p||.
    d = grads[0] + 0.04 * weight
    norm = torch.linalg.vector_norm
    torch.testing.assert_close(ours[0], weight - 0.1 * 0.001 * norm(weight) / norm(d) * d)
    torch.testing.assert_close(
        timm[0], weight - 0.1 * 0.001 * norm(weight) / (norm(grads[0]) + 0.04 * norm(weight)) * d
    )
    assert (norm(ours[0] - weight) / norm(timm[0] - weight)).item() == pytest.approx(1.037, abs=1e-3)  # 3.7%
    # ... which agree when the gradient is parallel to the weight.
    parallel = [2.5 * weight, grads[1]]
    torch.testing.assert_close(
        _one_step(LARS, groups, parallel, eta=0.001)[0], _one_step(TimmLars, groups, parallel, trust_coeff=0.001)[0]
    )
    # A weight in a group without decay: adapted by DINO (any parameter that is not 1-D), not by timm.
    plain = [{"params": [weight], "weight_decay": 0.0}]
    ours = _one_step(LARS, plain, grads[:1], eta=0.001)
    timm = _one_step(TimmLars, plain, grads[:1], trust_coeff=0.001)
    torch.testing.assert_close(ours[0], weight - 0.1 * 0.001 * norm(weight) / norm(grads[0]) * grads[0])
    torch.testing.assert_close(timm[0], weight - 0.1 * grads[0])


def test_lars_rejects_negative_arguments() -> None:
    with pytest.raises(ValueError, match="eta"):
        LARS([nn.Parameter(torch.zeros(2))], eta=-1.0)


def test_build_optimizer() -> None:
    model = nn.Linear(3, 2)

    def groups() -> list[dict]:
        return [{"params": [model.weight], "weight_decay": 0.04}, {"params": [model.bias], "weight_decay": 0.0}]

    adamw = build_optimizer("AdamW", groups(), lr=1e-3)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.04, 0.0]
    sgd = build_optimizer("sgd", model.parameters())
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.0
    lars = build_optimizer("lars", groups(), lr=0.3)
    assert type(lars) is LARS and lars.defaults["momentum"] == 0.9 and lars.param_groups[0]["lr"] == 0.3
    with pytest.raises(ValueError, match="adamw, sgd, lars"):
        build_optimizer("adam", groups())
    # The default leaves torch its choice (multi-tensor on CUDA); fused=True is AdamW's one-kernel update.
    assert adamw.defaults["fused"] is None and adamw.defaults["foreach"] is None
    assert build_optimizer("adamw", groups(), fused=True).defaults["fused"] is True
    for name in ("sgd", "LARS"):
        with pytest.raises(ValueError, match="fused is for adamw"):
            build_optimizer(name, groups(), fused=True)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(2, 2)
        self.last_layer = nn.Linear(2, 3, bias=False)
        self.norm = nn.BatchNorm1d(2)


def test_clip_gradients_global_and_measure_only() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], 0.0).item() == pytest.approx(5.0)  # measured, not changed
    assert a.grad.tolist() == [3.0, 0.0]
    assert clip_gradients([a, b], 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.8]), atol=1e-5, rtol=0)
    # Measuring only leaves finite gradients finite when another one is infinite.
    a.grad, b.grad = torch.tensor([math.inf, 0.0]), torch.tensor([2.0, 2.0])
    assert math.isinf(clip_gradients([a, b], 0.0).item())
    assert b.grad.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients([a], 1.0, mode="layer")


def test_clip_gradients_per_parameter() -> None:
    model = _Head()
    model.mlp.weight.grad = torch.full((2, 2), 5.0)  # norm 10
    model.mlp.bias.grad = torch.tensor([0.06, 0.08])  # norm 0.1
    model.last_layer.weight.grad = torch.tensor([[0.0, 3.0], [4.0, 0.0], [0.0, 0.0]])  # norm 5
    small = model.mlp.bias.grad.clone()
    total = clip_gradients(model.parameters(), 0.0, mode="per_parameter")
    assert total.item() == pytest.approx(math.sqrt(100 + 0.01 + 25))
    torch.testing.assert_close(model.mlp.weight.grad, torch.full((2, 2), 5.0))

    total = clip_gradients(model.parameters(), 1.0, mode="per_parameter")
    # The norm before clipping; each parameter is clipped on its own, not by a global factor.
    assert total.item() == pytest.approx(math.sqrt(100 + 0.01 + 25))
    for grad in (model.mlp.weight.grad, model.last_layer.weight.grad):
        assert torch.linalg.vector_norm(grad).item() <= 1.0
        assert torch.linalg.vector_norm(grad).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(model.last_layer.weight.grad, torch.tensor([[0.0, 0.6], [0.8, 0.0], [0.0, 0.0]]))
    assert torch.equal(model.mlp.bias.grad, small)
    assert clip_gradients(nn.Linear(2, 2).parameters(), 1.0, mode="per_parameter").item() == 0.0


def test_cancel_last_layer_gradients() -> None:
    model = nn.Sequential(_Head())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    cancel_last_layer_gradients(model, epoch=1, freeze_epochs=1)
    assert all(param.grad is not None for param in model.parameters())
    cancel_last_layer_gradients(model, epoch=0, freeze_epochs=1)
    for name, param in model.named_parameters():
        assert (param.grad is None) == ("last_layer" in name), name


def test_update_teacher_averages_parameters_only() -> None:
    student = _Head()
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.data.fill_(1.0)
    for param in student.parameters():
        param.data.fill_(2.0)
    student.norm.running_mean.fill_(5.0)
    teacher.norm.running_mean.fill_(-3.0)
    # DataParallel stands in for DDP (same `.module` wrapping) without a process group.
    update_teacher(nn.DataParallel(student), teacher, momentum=0.9)
    for param in teacher.parameters():
        # 0.9 * 1 + 0.1 * 2
        torch.testing.assert_close(param.detach(), torch.full_like(param, 1.1))
    torch.testing.assert_close(teacher.norm.running_mean, torch.full((2,), -3.0))
    assert all(param.grad is None for param in teacher.parameters())

    with pytest.raises(ValueError, match="parameters"):
        update_teacher(student, nn.Linear(2, 2), momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student, teacher, momentum=1.5)


def test_teacher_momentum_schedule() -> None:
    teacher_momentum = CosineSchedule(peak=0.996, end=1.0, total_steps=101)  # as DinoTrainer builds it
    assert teacher_momentum(0) == pytest.approx(0.996)
    # Half-way the cosine is at the mean of base and 1.
    assert teacher_momentum(50) == pytest.approx(0.998)
    assert teacher_momentum(100) == pytest.approx(1.0)


def test_linear_lr_scaling_with_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert global_batch_size(64) == 64
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's variable, read before the process group exists
    assert global_batch_size(64) == 256
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="batch sizes"):
        scaled_lr(0.3, 0)


def test_backward_step_without_parameters_neither_clips_nor_measures() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    loss = (model(torch.ones(1, 2)) * 100).sum()
    assert backward_step(loss, optimizer) is None
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * model.weight.grad)  # the full, unclipped step
    norm = backward_step((model(torch.ones(1, 2)) * 100).sum(), optimizer, parameters=model.parameters(), clip_grad=1.0)
    assert norm.item() == pytest.approx(100 * math.sqrt(3), rel=1e-5)
