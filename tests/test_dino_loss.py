"""Tests of `dae.losses.DINOLoss`: hand-computed values, centring, schedule, mixed precision, 2-process centre."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dae.losses import DINOLoss

# Probabilities chosen so that every cross-entropy below is a short sum of logs.
TEACHER_PROBS = [[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]
STUDENT_PROBS = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]
# Pairs (teacher view iq, student view v), v != iq: (0,1), (0,2), (1,0), (1,2). With CE(p, q) = -sum p log q:
#   CE(p0, q1) = -(0.25 ln 0.1 + 0.5 ln 0.1 + 0.25 ln 0.8)
#   CE(p0, q2) = ln 3                       (q2 uniform, p0 sums to 1)
#   CE(p1, q0) = -(0.2 ln 0.5 + 0.3 ln 0.25 + 0.5 ln 0.25)
#   CE(p1, q2) = ln 3
HAND_LOSS = (
    -(0.75 * math.log(0.1) + 0.25 * math.log(0.8))
    + math.log(3)
    - (0.2 * math.log(0.5) + 0.8 * math.log(0.25))
    + math.log(3)
) / 4


def _logits(probs: list[list[float]], temperature: float) -> torch.Tensor:
    """Outputs whose softmax at ``temperature`` is ``probs``: ``temperature * log(p)``."""
    return temperature * torch.tensor(probs).log()


def test_loss_by_hand_k3_b1_three_crops() -> None:
    criterion = DINOLoss(out_dim=3, ncrops=3, teacher_temp=0.04, student_temp=0.1)
    loss, metrics = criterion(_logits(STUDENT_PROBS, 0.1), _logits(TEACHER_PROBS, 0.04), epoch=0)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(HAND_LOSS, rel=1e-5)
    # KL = CE - H(teacher); each teacher view occurs in 2 of the 4 pairs.
    h0 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    h1 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert metrics["teacher_entropy"].item() == pytest.approx((h0 + h1) / 2, rel=1e-5)
    assert metrics["kl_teacher_student"].item() == pytest.approx(HAND_LOSS - (h0 + h1) / 2, rel=1e-5)
    h_student = [-sum(p * math.log(p) for p in q) for q in STUDENT_PROBS]
    assert metrics["student_entropy"].item() == pytest.approx(sum(h_student) / 3, rel=1e-5)


def test_centre_is_subtracted_before_sharpening() -> None:
    criterion = DINOLoss(out_dim=3, ncrops=3)
    centre = torch.tensor([[0.3, -0.2, 1.5]])
    criterion.center.copy_(centre)
    # (t - c) / 0.04 = log p, so the hand value above holds again.
    teacher = centre + _logits(TEACHER_PROBS, 0.04)
    loss, _ = criterion(_logits(STUDENT_PROBS, 0.1), teacher, epoch=0)
    assert loss.item() == pytest.approx(HAND_LOSS, rel=1e-5)


def test_centre_update_after_one_call_and_in_state_dict() -> None:
    criterion = DINOLoss(out_dim=3, ncrops=3, center_momentum=0.9)
    assert "center" in criterion.state_dict()
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])
    criterion(torch.zeros(3, 3), teacher, epoch=0)
    # c = 0.9 * 0 + 0.1 * mean_batch(t) = 0.1 * [2, 1, 1]
    torch.testing.assert_close(criterion.center, torch.tensor([[0.2, 0.1, 0.1]]))
    criterion(torch.zeros(3, 3), torch.zeros(2, 3), epoch=0)
    torch.testing.assert_close(criterion.center, torch.tensor([[0.18, 0.09, 0.09]]))


def test_uniform_outputs_give_ln_k() -> None:
    k = 7
    criterion = DINOLoss(out_dim=k, ncrops=4)
    loss, metrics = criterion(torch.zeros(4 * 3, k), torch.zeros(2 * 3, k), epoch=0)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)
    assert metrics["uniform_loss"] == pytest.approx(math.log(k), rel=1e-6)
    assert metrics["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert metrics["student_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert metrics["teacher_kl_uniform"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_teacher_student"].item() == pytest.approx(0.0, abs=1e-6)
    tensors = [v for k, v in metrics.items() if k not in ("uniform_loss", "teacher_temp")]
    assert all(v.dtype == torch.float32 and v.ndim == 0 and not v.requires_grad for v in tensors)
    _, cheap = criterion(torch.zeros(4 * 3, k), torch.zeros(2 * 3, k), epoch=0, diagnostics=False)
    assert set(cheap) == {"uniform_loss", "teacher_temp"}


def test_metrics_for_a_one_hot_teacher() -> None:
    criterion = DINOLoss(out_dim=3, ncrops=2)
    # (10 - 0) / 0.04 = 250: the other probabilities are exp(-250), 0 in fp32, so the teacher is one-hot.
    teacher = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    loss, metrics = criterion(torch.zeros(2, 3), teacher, epoch=0)
    # The student is uniform: CE(one-hot, uniform) = ln 3, and H(one-hot) = 0.
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)
    assert metrics["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["teacher_kl_uniform"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert metrics["kl_teacher_student"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert metrics["student_entropy"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert metrics["teacher_temp"] == pytest.approx(0.04)


def test_teacher_temperature_schedule() -> None:
    criterion = DINOLoss(
        out_dim=4, ncrops=2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, nepochs=100
    )
    # Reference: linspace(0.04, 0.07, 30) for epochs 0..29, then 0.07.
    assert criterion.teacher_temperature(0) == pytest.approx(0.04)
    assert criterion.teacher_temperature(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert criterion.teacher_temperature(29) == pytest.approx(0.07)
    assert criterion.teacher_temperature(30) == pytest.approx(0.07)
    assert criterion.teacher_temperature(99) == pytest.approx(0.07)
    _, metrics = criterion(torch.zeros(2, 4), torch.zeros(2, 4), epoch=15)
    assert metrics["teacher_temp"] == pytest.approx(0.04 + 0.03 * 15 / 29)
    no_warmup = DINOLoss(out_dim=4, ncrops=2, warmup_teacher_temp=0.01, teacher_temp=0.05)
    assert no_warmup.teacher_temperature(0) == no_warmup.teacher_temperature(99) == 0.05
    with pytest.raises(ValueError, match="epoch"):
        criterion.teacher_temperature(-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_temp": 0.0}, "teacher_temp"),
        ({"student_temp": -0.1}, "student_temp"),
        ({"ncrops": 1}, "ncrops"),
        ({"warmup_teacher_temp_epochs": 11, "nepochs": 10}, "warmup_teacher_temp_epochs"),
        ({"center_momentum": 1.5}, "center_momentum"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DINOLoss(**{"out_dim": 4, "ncrops": 2, **kwargs})


def test_shape_errors() -> None:
    criterion = DINOLoss(out_dim=4, ncrops=3)
    with pytest.raises(ValueError, match="3 \\* B"):
        criterion(torch.zeros(4, 4), torch.zeros(2, 4), epoch=0)
    with pytest.raises(ValueError, match="2 \\* B"):
        criterion(torch.zeros(3, 4), torch.zeros(3, 4), epoch=0)
    with pytest.raises(ValueError):
        criterion(torch.zeros(3, 5), torch.zeros(2, 5), epoch=0)


def test_no_gradient_to_the_teacher() -> None:
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss, _ = DINOLoss(out_dim=5, ncrops=3)(student, teacher, epoch=0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4 * 2, 16, generator=generator)
    teacher = torch.randn(2 * 2, 16, generator=generator)
    reference, _ = DINOLoss(out_dim=16, ncrops=4)(student, teacher, epoch=0)
    low, _ = DINOLoss(out_dim=16, ncrops=4)(student.to(dtype), teacher.to(dtype), epoch=0)
    assert low.dtype == torch.float32
    # Only the rounding of the inputs differs (computed in fp32 from then on).
    same_inputs, _ = DINOLoss(out_dim=16, ncrops=4)(student.to(dtype).float(), teacher.to(dtype).float(), epoch=0)
    torch.testing.assert_close(low, same_inputs)
    torch.testing.assert_close(low, reference, rtol=2e-2, atol=2e-2)

    # Logits of 1e4 overflow exp() in fp16 and fp32; the loss must stay finite, also under autocast.
    big_student = (1e4 * torch.randn(4 * 2, 16, generator=generator)).to(dtype).requires_grad_()
    big_teacher = (1e4 * torch.randn(2 * 2, 16, generator=generator)).to(dtype)
    criterion = DINOLoss(out_dim=16, ncrops=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = criterion(big_student, big_teacher, epoch=0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert torch.isfinite(big_student.grad).all()
    assert torch.isfinite(criterion.center).all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _centre_worker(rank: int, world_size: int, port: int, teacher: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        criterion = DINOLoss(out_dim=teacher.shape[-1], ncrops=2)
        local = teacher[rank]
        criterion(torch.zeros_like(local), local, epoch=0)
        torch.save(criterion.center, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centre_is_averaged_over_two_processes(tmp_path: Path) -> None:
    # Rank r has teacher outputs teacher[r] (2 global views x B=1, K=3), different on each rank.
    teacher = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[-4.0, 0.0, 8.0], [0.0, 4.0, 0.0]]])
    mp.spawn(_centre_worker, args=(2, _free_port(), teacher, str(tmp_path)), nprocs=2, join=True)
    centres = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    # Global mean of the 4 rows = [0, 8, 12] / 4 = [0, 2, 3]; c = 0.1 * that.
    expected = torch.tensor([[0.0, 0.2, 0.3]])
    for centre in centres:
        torch.testing.assert_close(centre, expected)


def test_collapse_warnings_use_the_teacher_distribution_not_the_loss(caplog):
    from types import SimpleNamespace

    from dae.engine.dino import DinoTrainer

    trainer = SimpleNamespace(epoch=0)
    base = {"loss": math.log(1024), "uniform_loss": math.log(1024), "teacher_entropy": 6.0}
    with caplog.at_level("WARNING"):
        # loss at ln K, but a sharp teacher and a flat student: no collapse
        DinoTrainer._warn_collapse(trainer, {**base, "teacher_kl_uniform": 0.9})
        assert not caplog.records
        DinoTrainer._warn_collapse(trainer, {**base, "teacher_kl_uniform": 0.01})
        assert "uniform collapse" in caplog.text
        caplog.clear()
        DinoTrainer._warn_collapse(trainer, {**base, "teacher_kl_uniform": 0.01, "dino": 6.5, "loss": 5.0})
        assert "loss 6.5000" in caplog.text  # the DINO part is what compares with ln K, not the total with KoLeo
        caplog.clear()
        DinoTrainer._warn_collapse(trainer, {**base, "teacher_kl_uniform": 6.9, "teacher_entropy": 0.01})
        assert "one-hot" in caplog.text


def test_koleo_by_hand_on_the_unit_circle() -> None:
    from dae.losses import KoLeoLoss

    angles = torch.tensor([0.0, 0.1, math.pi])
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    # nearest neighbours: 0 <-> 0.1, and pi -> 0.1 (chord 2 cos(0.05) against 2 for the point at 0)
    expected = -(2 * math.log(2 * math.sin(0.05)) + math.log(2 * math.cos(0.05))) / 3
    loss = KoLeoLoss()(points * torch.tensor([[3.0], [0.5], [7.0]]))  # the norms do not matter
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_koleo_gradient_spreads_the_batch_and_stays_finite() -> None:
    from dae.losses import KoLeoLoss

    torch.manual_seed(0)
    base = torch.randn(6, 8)
    points = torch.cat([base, base[:1]]).requires_grad_(True)  # a duplicate: large but finite loss
    koleo = KoLeoLoss()
    loss = koleo(points)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(points.grad).all()

    spread = base.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([spread], lr=0.05)
    before = koleo(spread).item()
    for _ in range(20):
        optimizer.zero_grad()
        koleo(spread).backward()
        optimizer.step()
    assert koleo(spread).item() < before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert koleo(spread.detach().bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="B >= 2"):
        koleo(torch.randn(1, 8))
