"""Engine pieces: schedules, parameter groups, checkpoints, RNG capture, pictures and run records."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dae.bundle import save_run_record
from dae.engine import Trainer, param_groups
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from dae.utils.pictures import orthogonal_slices_grid
from dae.utils.schedules import CosineSchedule
from dae.utils.seed import capture_rng_state, restore_rng_state, seed_everything


def test_warmup_cosine_key_values():
    warmup_cosine = CosineSchedule(peak=1e-3, end=1e-4, total_steps=101, warmup_steps=10, start=1e-5)
    assert warmup_cosine(0) == pytest.approx(1e-5)
    assert warmup_cosine(5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert warmup_cosine(10) == pytest.approx(1e-3)
    # half-way through the cosine part: the mean of base and min
    assert warmup_cosine(55) == pytest.approx((1e-3 + 1e-4) / 2)
    assert warmup_cosine(100) == pytest.approx(1e-4)


class _Constant(Trainer):
    def compute_losses(self, batch):
        return {"loss": self.model(batch).sum()}


def test_schedule_drives_optimizer_per_iteration(tmp_path):
    net = nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(torch.ones(5, 1), batch_size=1)
    trainer = _Constant(net, opt, loader, tmp_path, max_epochs=1, warmup_epochs=0.4, min_lr=0.01, progress=False)
    lrs = []
    for batch in loader:
        lrs.append(trainer.train_step(batch)["lr"])
        assert lrs[-1] == opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(0.0)
    assert lrs[1] == pytest.approx(0.05)
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * 0.5)))
    assert lrs[4] == pytest.approx(0.01)


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="total_steps"):
        CosineSchedule(0.1, 0.0, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(0.1, 0.0, total_steps=3, warmup_steps=4)


def test_param_groups_exempt_biases_norms_and_position_tables():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(7, 2))
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    decay, no_decay = param_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [net.linear.weight.shape]
    ids = {id(p) for p in no_decay["params"]}
    assert ids == {id(net.linear.bias), id(net.norm.weight), id(net.norm.bias), id(net.relative_position_bias_table)}


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "latest.pt"
    save_checkpoint({"model": {"w": torch.arange(3)}, "epoch": 2}, path)
    save_checkpoint({"model": {"w": torch.arange(4)}, "epoch": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]  # no temporary file left
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4))


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    seed_everything(3)
    state = capture_rng_state()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    seed_everything(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_orthogonal_slices_grid_layout():
    vol = torch.rand(1, 20, 24, 28)
    grid = orthogonal_slices_grid([vol, vol * 0.5, vol], size=32, pad=2)
    assert grid.shape == (1, 3 * 32 + 2 * 2, 3 * 32 + 2 * 2)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0
    with pytest.raises(ValueError, match="X, Y, Z"):
        orthogonal_slices_grid([torch.rand(8, 8, 8)])


def test_save_run_record_writes_config_and_versions(tmp_path):
    save_run_record(tmp_path / "run", config={"epochs": 2, "lr": 1e-4})
    versions = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert versions["torch"] == torch.__version__.split("+")[0]
    assert "epochs: 2" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "command.txt").read_text().strip()


def test_single_process_distributed_helpers() -> None:
    from dae.utils.dist import convert_sync_batchnorm, default_device, destroy_distributed

    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    destroy_distributed()  # no process group: nothing to do
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    converted = convert_sync_batchnorm(model)
    expected = torch.nn.SyncBatchNorm if torch.cuda.is_available() else torch.nn.BatchNorm2d
    assert type(converted[1]) is expected
