"""Tests of `dae.losses`: hand-computed values, invariances, mixed precision and a 2-process gather."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dae.losses import DAELoss, ReconstructionLoss, SupervisedContrastiveLoss


def _unit(degrees: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def _sim(a: float, b: float, temperature: float) -> float:
    """Cosine similarity of unit vectors at angles ``a`` and ``b`` (degrees), over the temperature."""
    return math.cos(math.radians(a - b)) / temperature


def test_supcon_one_positive_each_by_hand() -> None:
    # Angles 0, 60, 150, 270 degrees, labels [0, 0, 1, 1], temperature 0.5: s_ij = cos(a_i - a_j) / 0.5.
    # Each anchor has exactly one positive p, so L_i = -(s_ip - log(sum_{a != i} exp(s_ia))).
    angles, t = [0.0, 60.0, 150.0, 270.0], 0.5

    def anchor_loss(i: int, p: int) -> float:
        others = [j for j in range(4) if j != i]
        return -(_sim(angles[i], angles[p], t) - math.log(sum(math.exp(_sim(angles[i], angles[j], t)) for j in others)))

    # e.g. anchor 0: s_01 = cos 60 / .5 = 1, s_02 = cos 150 / .5 = -1.732, s_03 = cos 270 / .5 = 0
    # L_0 = -(1 - log(e^1 + e^-1.732 + e^0)) = log(e + 0.177 + 1) - 1 = 0.3669
    assert anchor_loss(0, 1) == pytest.approx(math.log(math.e + math.exp(-math.sqrt(3)) + 1) - 1)
    expected = (anchor_loss(0, 1) + anchor_loss(1, 0) + anchor_loss(2, 3) + anchor_loss(3, 2)) / 4

    features = torch.tensor([_unit(a) for a in angles], dtype=torch.float64)
    loss = SupervisedContrastiveLoss(temperature=t)(features, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_two_positives_and_anchor_without_positive_by_hand() -> None:
    # Angles 0, 90, 180 (label 0) and 45 (label 1), temperature 1, arbitrary norms (normalised away).
    # Anchors 0..2 have two positives each; anchor 3 has none and is left out of the mean.
    r = math.sqrt(2) / 2  # cos 45
    # anchor 0: s = {1: 0, 2: -1, 3: r};  L_0 = -1/2 [(0 - lse_0) + (-1 - lse_0)], lse_0 = log(1 + e^-1 + e^r)
    lse0 = math.log(1 + math.exp(-1) + math.exp(r))
    loss0 = -0.5 * ((0 - lse0) + (-1 - lse0))
    # anchor 1 (90): s = {0: 0, 2: 0, 3: r};  L_1 = lse_1 = log(2 + e^r)
    loss1 = math.log(2 + math.exp(r))
    # anchor 2 (180): s = {0: -1, 1: 0, 3: cos 135 = -r};  L_2 = -1/2 [(-1 - lse_2) + (0 - lse_2)]
    lse2 = math.log(math.exp(-1) + 1 + math.exp(-r))
    loss2 = -0.5 * ((-1 - lse2) + (0 - lse2))
    expected = (loss0 + loss1 + loss2) / 3

    features = torch.tensor([_unit(0, 1.0), _unit(90, 3.0), _unit(180, 0.5), _unit(45, 7.0)], dtype=torch.float64)
    loss = SupervisedContrastiveLoss(temperature=1.0)(features, torch.tensor([0, 0, 0, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_invariant_to_batch_order_and_label_values() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    loss_fn = SupervisedContrastiveLoss()
    reference = loss_fn(features, labels)
    perm = torch.randperm(8, generator=generator)
    torch.testing.assert_close(loss_fn(features[perm], labels[perm]), reference)
    # The official targets came from np.unique, i.e. depended on which label values were present.
    torch.testing.assert_close(loss_fn(features, 10 - 3 * labels), reference)


def test_supcon_without_positives_is_zero_with_graph() -> None:
    features = torch.randn(4, 8, requires_grad=True)
    loss = SupervisedContrastiveLoss()(features, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(features.grad, torch.zeros(4, 8))


def test_supcon_gradients_finite() -> None:
    features = torch.randn(6, 8, requires_grad=True)
    SupervisedContrastiveLoss(temperature=0.1)(features, torch.tensor([0, 1, 0, 1, 2, 2])).backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


def test_supcon_stable_under_low_precision_with_huge_features() -> None:
    generator = torch.Generator().manual_seed(0)
    features = (torch.randn(8, 128, generator=generator) * 1e4).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss_fn = SupervisedContrastiveLoss()
    reference = loss_fn(features.bfloat16().float(), labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(features.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert torch.isfinite(features.grad).all()

    # fp16 features of this size: a naive un-normalised dot product overflows (|x|^2 ~ 1e10 > 65504) ...
    half = features.detach().half()
    naive = F.cross_entropy((half @ half.T).float(), torch.arange(8))
    assert not torch.isfinite(naive)
    # ... ours normalises in fp32 first.
    torch.testing.assert_close(loss_fn(half, labels), loss_fn(half.float(), labels))


def test_supcon_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        SupervisedContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3,\)"):
        SupervisedContrastiveLoss()(torch.randn(4, 8), torch.arange(3))


def test_reconstruction_loss_by_hand() -> None:
    prediction = torch.tensor([0.0, 1.0, -2.0, 3.0]).view(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    # L1: (0 + 1 + 2 + 3) / 4 = 1.5;  L2: (0 + 1 + 4 + 9) / 4 = 3.5
    assert ReconstructionLoss("l1")(prediction, target).item() == pytest.approx(1.5)
    assert ReconstructionLoss("l2")(prediction, target).item() == pytest.approx(3.5)
    assert ReconstructionLoss()(prediction.bfloat16(), target.bfloat16()).dtype == torch.float32


def test_reconstruction_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 2, 3\)"):
        ReconstructionLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="'l3'"):
        ReconstructionLoss("l3")


def test_dae_loss_total(monkeypatch: pytest.MonkeyPatch) -> None:
    prediction, target = torch.ones(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4)
    features, labels = torch.randn(2, 8), torch.tensor([0, 0])
    out = DAELoss(contrastive_weight=0.5)(prediction, target, features, labels)
    assert out["reconstruction"].item() == pytest.approx(1.0)
    expected_contrastive = SupervisedContrastiveLoss()(features, labels)
    torch.testing.assert_close(out["contrastive"], expected_contrastive)
    torch.testing.assert_close(out["loss"], 1.0 + 0.5 * expected_contrastive)

    skipped = DAELoss(reconstruction="l2", contrastive_weight=0.0)

    def must_not_run(*_args: object) -> torch.Tensor:
        raise AssertionError("contrastive loss computed with weight 0")

    monkeypatch.setattr(skipped.contrastive, "forward", must_not_run)
    out = skipped(prediction, target, features, labels)
    assert out["contrastive"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["reconstruction"])
    with pytest.raises(ValueError, match="-1"):
        DAELoss(contrastive_weight=-1)


def _gathered_loss_worker(
    rank: int, world_size: int, init_file: str, features: torch.Tensor, labels: torch.Tensor, out_dir: str
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        part = features.chunk(world_size)[rank].clone().requires_grad_()
        loss = SupervisedContrastiveLoss()(part, labels.chunk(world_size)[rank])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": part.grad}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_supcon_gathered_over_two_processes(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, generator=generator)
    # Every anchor has a positive, some only on the other rank, so each rank averages 4 anchors.
    labels = torch.tensor([0, 0, 1, 2, 1, 2, 3, 3])
    mp.spawn(
        _gathered_loss_worker,
        args=(2, str(tmp_path / "store"), features, labels, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    full_features = features.clone().requires_grad_()
    full = SupervisedContrastiveLoss()(full_features, labels)
    full.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, full)
    # DDP averages gradients over the 2 ranks: each rank's gradient / 2 must equal the single-process one,
    # which needs the gradients that other ranks' anchors send back through the gather.
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["grad"] / 2, full_features.grad.chunk(2)[rank])
    # Without the gather, rank 0 alone would see different negatives (and rank 1's 1s and 2s no positives).
    local = SupervisedContrastiveLoss(gather_distributed=False)(features[:4], labels[:4])
    assert not torch.allclose(local, results[0]["loss"])
