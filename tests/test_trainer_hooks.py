"""The one training step of `Trainer`: hook order, schedules, clipping, records, resumption, injected validation."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dae.engine import DinoTrainer, SegmentationTrainer, Trainer, update_teacher
from dae.losses import DINOLoss
from dae.models import MultiCropWrapper
from dae.models.backbone2d import build_backbone
from dae.models.dino_head import DINOHead
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from dae.utils.schedules import CosineSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 4


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    return DataLoader(list(zip(x, y)), batch_size=2, shuffle=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


class Toy(Trainer):
    """A regression with an extra logged loss, a scheduled extra value and a log of the hook calls."""

    non_finite_hint = "try a smaller toy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []
        self.seen: list[dict[str, Any]] = []
        self.extra = CosineSchedule(1.0, 2.0, self.total_steps)

    def before_step(self) -> dict[str, float]:
        self.calls.append(("before_step", self.global_step))
        return {**super().before_step(), "extra": self.extra(self.global_step)}

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        self.calls.append(("compute_losses", self.global_step))
        x, y = batch
        pred = self.ddp_model(x)
        mse = ((pred - y) ** 2).mean()
        return {"loss": mse + 0.1 * pred.abs().mean(), "mse": mse}

    def before_update(self) -> None:
        self.calls.append(("before_update", self.global_step))
        self.seen.append(
            {
                "lrs": [group["lr"] for group in self.optimizer.param_groups],
                "grad_norms": [torch.linalg.vector_norm(p.grad).item() for p in self.model.parameters()],
                "params": [p.detach().clone() for p in self.model.parameters()],
            }
        )

    def after_step(self) -> None:
        self.calls.append(("after_step", self.global_step))
        self.seen[-1]["moved"] = any(
            not torch.equal(a, b) for a, b in zip(self.seen[-1]["params"], self.model.parameters())
        )

    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return {"loss": 1.0}, {}


def _toy(out: Path, trainer_class: type = Toy, **kwargs: Any) -> Trainer:
    model = _model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.02}], momentum=0.9
    )
    settings = dict(max_epochs=3, warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4, clip_grad=0.5, progress=False)
    return trainer_class(model, optimizer, _loader(), out, **{**settings, **kwargs})


def _steps(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics" / "train_steps.jsonl").read_text().splitlines()]


def test_hooks_run_in_order_and_feed_the_record(tmp_path: Path) -> None:
    trainer = _toy(tmp_path, max_epochs=1)
    trainer.run()
    order = ["before_step", "compute_losses", "before_update", "after_step"]
    assert trainer.calls == [(name, step) for step in range(STEPS_PER_EPOCH) for name in order]
    assert all(seen["moved"] for seen in trainer.seen)  # before_update before the update, after_step after it
    records = _steps(tmp_path)
    assert [list(r) for r in records] == [["step", "epoch", "loss", "mse", "lr", "extra", "grad_norm"]] * 4
    assert [r["extra"] for r in records] == [trainer.extra(s) for s in range(STEPS_PER_EPOCH)]


def test_learning_rate_of_every_group_follows_its_cosine_schedule(tmp_path: Path) -> None:
    trainer = _toy(tmp_path)
    trainer.run()
    total = 3 * STEPS_PER_EPOCH
    schedules = [CosineSchedule(peak, 1e-4, total, warmup_steps=STEPS_PER_EPOCH, start=1e-3) for peak in (0.1, 0.02)]
    assert [seen["lrs"] for seen in trainer.seen] == [[s(step) for s in schedules] for step in range(total)]
    assert [r["lr"] for r in _steps(tmp_path)] == [schedules[0](step) for step in range(total)]
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.1, 0.02]


@pytest.mark.parametrize("clip_mode", ["global", "per_parameter"])
def test_clip_modes(tmp_path: Path, clip_mode: str) -> None:
    clip = 1e-3
    trainer = _toy(tmp_path, max_epochs=1, clip_grad=clip, clip_mode=clip_mode)
    trainer.run()
    for seen, record in zip(trainer.seen, _steps(tmp_path), strict=True):
        norms = torch.tensor(seen["grad_norms"])
        assert record["grad_norm"] > clip  # the norm before clipping is logged
        if clip_mode == "global":
            assert torch.linalg.vector_norm(norms).item() == pytest.approx(clip, rel=1e-4)
        else:
            assert torch.all(norms <= clip) and norms.max().item() == pytest.approx(clip, rel=1e-3)
    with pytest.raises(ValueError, match="clip_mode"):
        _toy(tmp_path, clip_mode="norm")


class NanAtStep5(Toy):
    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(batch)
        return {k: v * float("nan") for k, v in losses.items()} if self.global_step == 5 else losses


def test_non_finite_loss_stops_the_run_naming_the_step_the_losses_and_the_hint(tmp_path: Path) -> None:
    # Read on the host every 10 steps and at the end of each 4-step epoch: step 5 is found at the end of epoch 2.
    trainer = _toy(tmp_path, NanAtStep5, log_interval=10)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss at epoch 2, step 5 \(lr 0.0\d+, extra 1.\d+\): "
        r"loss=nan, mse=nan, grad_norm=nan; try a smaller",
    ):
        trainer.run()
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2, 3, 4, 5]  # the records before the failure are kept
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert checkpoint["epoch"] == 1  # nothing after the failure was saved
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_validation_without_the_best_metric_is_an_error(tmp_path: Path) -> None:
    class Wrong(Toy):
        def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
            return {"accuracy": 1.0}, {}

    with pytest.raises(KeyError, match="'loss'"):
        _toy(tmp_path, Wrong, max_epochs=1, val_loader=_loader()).run()


class EmaToy(Toy):
    """DINO's shape: a scheduled momentum, per-parameter clipping and an EMA teacher updated in after_step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, clip_mode="per_parameter", **kwargs)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.momentum = CosineSchedule(0.9, 1.0, self.total_steps)

    def before_step(self) -> dict[str, float]:
        return {**super().before_step(), "momentum": self.momentum(self.global_step)}

    def after_step(self) -> None:
        super().after_step()
        update_teacher(self.model, self.teacher, self.momentum(self.global_step))

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])


@pytest.mark.parametrize("trainer_class", [Toy, EmaToy])
def test_k_epochs_and_a_resume_equal_one_run(tmp_path: Path, trainer_class: type) -> None:
    straight = _toy(tmp_path / "straight", trainer_class)
    straight.run()
    _toy(tmp_path / "split", trainer_class, epochs_per_run=2).run()
    # A checkpoint of earlier versions also held the LR scheduler's state; it is ignored.
    latest = tmp_path / "split" / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest)
    assert "scheduler" not in state
    save_checkpoint({**state, "scheduler": {"last_epoch": 8, "base_lrs": [0.1, 0.02]}}, latest)
    resumed = _toy(tmp_path / "split", trainer_class)
    resumed.run()
    assert resumed.calls[0] == ("before_step", 2 * STEPS_PER_EPOCH)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    if trainer_class is EmaToy:
        for a, b in zip(straight.teacher.parameters(), resumed.teacher.parameters(), strict=True):
            assert torch.equal(a, b)
    assert _steps(tmp_path / "straight") == _steps(tmp_path / "split")


def _crops_loader(n: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    sizes = (32, 32, 16, 16)
    items = [{"crops": [torch.randn(3, s, s, generator=generator) for s in sizes]} for _ in range(n)]
    return DataLoader(items, batch_size=2)


def _dino(out: Path, **kwargs: Any) -> DinoTrainer:
    torch.manual_seed(0)

    def network() -> MultiCropWrapper:
        backbone = build_backbone("vit_tiny", patch_size=16, in_chans=3, img_size=32)
        return MultiCropWrapper(backbone, DINOHead(192, 16, nlayers=1, bottleneck_dim=8))

    student = network()
    loss = DINOLoss(16, 4, nepochs=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    return DinoTrainer(
        student,
        network(),
        loss,
        optimizer=optimizer,
        train_loader=_crops_loader(),
        output_dir=out,
        max_epochs=2,
        progress=False,
        attention_images=1,
        **kwargs,
    )


def test_dino_trainer_calls_its_monitor_with_the_teacher_backbone(tmp_path: Path) -> None:
    calls: list[tuple[nn.Module, bool]] = []

    def monitor(backbone: nn.Module) -> dict[str, float]:
        calls.append((backbone, backbone.training))
        return {"knn_top1": torch.rand(()).item()}  # seeded by the trainer: the same at every call

    val_loader = DataLoader([{"image": torch.rand(3, 32, 32)} for _ in range(2)], batch_size=2)
    trainer = _dino(tmp_path, val_loader=val_loader, monitor=monitor)
    assert trainer.clip_mode == "per_parameter"
    history = trainer.run()
    assert [(backbone is trainer.teacher.backbone, training) for backbone, training in calls] == [(True, False)] * 2
    assert history[0]["val_knn_top1"] == history[1]["val_knn_top1"]
    assert {"train_wd", "train_momentum", "train_teacher_entropy"} <= set(history[0])
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    _, pictures = trainer.validate()
    assert pictures["val/teacher_last_layer_attention"].shape[0] == 3
    assert set(trainer.train_pictures()) == {"train/crops_global_then_local"}
    with pytest.raises(ValueError, match="go together"):
        _dino(tmp_path, val_loader=val_loader)
    with pytest.raises(ValueError, match="go together"):
        _dino(tmp_path, monitor=monitor)


class _TwoMetricMonitor:
    """A monitor whose top-1 peaks at epoch 1 and whose AUROC peaks at epoch 2."""

    metrics = ("knn_top1", "knn_auroc")

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        self.calls += 1
        return {"knn_top1": [0.8, 0.7][self.calls - 1], "knn_auroc": [0.6, 0.9][self.calls - 1]}


@pytest.mark.parametrize(("best_metric", "best_epoch"), [("knn_top1", 1), ("knn_auroc", 2)])
def test_dino_best_checkpoint_follows_the_chosen_monitor_metric(
    tmp_path: Path, best_metric: str, best_epoch: int
) -> None:
    val_loader = DataLoader([{"image": torch.rand(3, 32, 32)} for _ in range(2)], batch_size=2)
    trainer = _dino(tmp_path, val_loader=val_loader, monitor=_TwoMetricMonitor(), best_metric=best_metric)
    trainer.run()
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert (best["epoch"], best["best_metric"]) == (best_epoch, best_metric)
    assert trainer.best_epoch == best_epoch


def test_dino_refuses_a_best_metric_its_monitor_does_not_give(tmp_path: Path) -> None:
    val_loader = DataLoader([{"image": torch.rand(3, 32, 32)} for _ in range(2)], batch_size=2)
    with pytest.raises(ValueError, match=r"best_metric='knn_top5' is not a metric of the monitor.*knn_auroc"):
        _dino(tmp_path, val_loader=val_loader, monitor=_TwoMetricMonitor(), best_metric="knn_top5")


def test_segmentation_trainer_calls_its_evaluator_with_the_network(tmp_path: Path) -> None:
    calls: list[nn.Module] = []

    def evaluator(network: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        calls.append(network)
        return {"mean_dice": torch.rand(()).item()}, {"val/picture": torch.zeros(3, 4, 4)}

    generator = torch.Generator().manual_seed(2)
    items = [
        {
            "image": torch.randn(1, 4, 4, 4, generator=generator),
            "label": torch.randint(0, 2, (4, 4, 4), generator=generator),
        }
        for _ in range(2)
    ]
    torch.manual_seed(0)
    network = nn.Conv3d(1, 2, 1)
    kwargs = dict(
        loss_function=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        train_loader=DataLoader(items, batch_size=1),
        output_dir=tmp_path,
        max_epochs=2,
        progress=False,
    )
    history = SegmentationTrainer(network, evaluator=evaluator, val_loader=DataLoader(items), **kwargs).run()
    assert calls == [network, network]
    assert history[0]["val_mean_dice"] == history[1]["val_mean_dice"]
    with pytest.raises(ValueError, match="go together"):
        SegmentationTrainer(network, val_loader=DataLoader(items), **kwargs)


def test_dino_trainer_adds_the_weighted_koleo_term(tmp_path: Path) -> None:
    trainer = _dino(tmp_path, koleo_weight=0.1, log_interval=1)
    trainer.run()
    records = _steps(tmp_path)
    assert records
    for record in records:
        assert math.isfinite(record["koleo"])
        assert record["loss"] == pytest.approx(record["dino"] + 0.1 * record["koleo"], rel=1e-5)
    _dino(tmp_path / "off").run()
    assert all("koleo" not in record and "dino" not in record for record in _steps(tmp_path / "off"))
    with pytest.raises(ValueError, match="koleo_weight"):
        _dino(tmp_path / "bad", koleo_weight=-1.0)


def test_resuming_with_another_best_metric_says_best_pt_starts_afresh(tmp_path: Path, caplog) -> None:
    val_loader = DataLoader([{"image": torch.rand(3, 32, 32)} for _ in range(2)], batch_size=2)
    _dino(tmp_path, val_loader=val_loader, monitor=_TwoMetricMonitor()).run()
    trainer = _dino(tmp_path, val_loader=val_loader, monitor=_TwoMetricMonitor(), best_metric="knn_auroc")
    with caplog.at_level(logging.WARNING, logger="dae.engine.trainer"):
        trainer.load(tmp_path / "checkpoints" / "latest.pt")
    assert "chose best.pt by knn_top1, this run by knn_auroc" in caplog.text
    assert trainer.best_value == -math.inf
