"""Checkpoint failures name the file: full disks, stale temporaries, too little space, broken and unsafe files."""

from __future__ import annotations

import argparse
import errno
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dae.engine import Trainer
from dae.errors import CheckpointError, DiskSpaceError
from dae.evaluation.featureset import FeatureSet
from dae.models import load_model_weights, read_dino_checkpoint
from dae.utils import checkpoint as ckpt
from dae.utils.checkpoint import (
    CheckpointNotFoundError,
    estimate_checkpoint_bytes,
    load_checkpoint,
    prepare_checkpoint_dir,
    remove_stale_temporaries,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DiskUsage = namedtuple("DiskUsage", "total used free")


class Toy(Trainer):
    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": ((self.ddp_model(x) - y) ** 2).mean()}


def _toy(out: Path, **kwargs: Any) -> Toy:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loader = DataLoader(list(zip(torch.randn(4, 3), torch.randn(4, 2))), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Toy(model, optimizer, loader, out, max_epochs=2, progress=False, **kwargs)


def _truncated(path: Path) -> Path:
    save_checkpoint({"model": nn.Linear(16, 16).state_dict(), "epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class Custom:
    """Not a plain type: weights-only loading refuses it."""


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at x.cc:1] . unexpected pos 7 vs 5"),
    ],
)
def test_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    latest = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint({"epoch": 1}, latest)

    def write_then_fail(state: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(torch, "save", write_then_fail)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"epoch": 2}, latest)
    monkeypatch.undo()
    message = str(info.value)
    assert str(latest) in message and "latest.pt is unchanged" in message and " free in " in message
    assert ("No space left on device" if isinstance(failure, OSError) else "unexpected pos 7 vs 5") in message
    assert load_checkpoint(latest)["epoch"] == 1
    assert [p.name for p in latest.parent.iterdir()] == ["latest.pt"]


def test_prepare_removes_stale_temporaries_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".latest.pt.abc.tmp").write_bytes(b"x" * 100)
    for keep in ("latest.pt", "notes.tmp", ".hidden.tmp"):
        (folder / keep).write_bytes(b"")
    with caplog.at_level("WARNING"):
        prepare_checkpoint_dir(tmp_path, nn.Linear(2, 2))
    assert sorted(p.name for p in folder.iterdir()) == [".hidden.tmp", "latest.pt", "notes.tmp"]
    assert ".latest.pt.abc.tmp (100 B)" in caplog.text
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_estimate_counts_shared_tensors_once_and_moments_of_trainable_parameters() -> None:
    student, teacher = nn.Linear(10, 10), nn.Linear(10, 10).requires_grad_(False)
    size = 110 * 4
    assert estimate_checkpoint_bytes(student) == 3 * size
    assert estimate_checkpoint_bytes(student, student, optimizer_moments=1) == 2 * size
    assert estimate_checkpoint_bytes(student, teacher) == 4 * size
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert estimate_checkpoint_bytes(tied, optimizer_moments=0) == 40 * 4
    bn = nn.BatchNorm1d(8)  # weight, bias, running mean and var (float32) and num_batches_tracked (int64)
    assert estimate_checkpoint_bytes(bn, optimizer_moments=0) == 4 * 8 * 4 + 8


def test_disk_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = nn.Linear(256, 1024)  # 1 MiB + 4 KiB of float32, 3 x that with AdamW's moments
    needed = ckpt.CHECKPOINT_SPACE_MARGIN * estimate_checkpoint_bytes(network)
    seen = []

    def disk_usage(folder: Path) -> DiskUsage:
        seen.append(Path(folder))
        return DiskUsage(10 * needed, 9 * needed, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    free = needed // 3
    out = tmp_path / "run"  # does not exist yet: the parent's disk is asked
    with pytest.raises(DiskSpaceError) as info:
        prepare_checkpoint_dir(out, network)
    assert seen == [tmp_path]
    message = str(info.value)
    assert str(out / "checkpoints") in message and "2.0 MiB free" in message and "needs about 6.0 MiB" in message
    assert info.value.advice
    free = needed
    prepare_checkpoint_dir(out, network)


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = _truncated(tmp_path / "weights.pt")
    for load in (
        load_checkpoint,
        read_dino_checkpoint,
        FeatureSet.load,
        lambda p: load_model_weights(nn.Linear(16, 16), p),
    ):
        with pytest.raises(CheckpointError, match=r"weights\.pt .* is truncated or not a PyTorch checkpoint"):
            load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated: the data ends early"):
        load_checkpoint(path)
    with pytest.raises(CheckpointNotFoundError, match=r"missing\.pt does not exist") as info:
        load_checkpoint(tmp_path / "missing.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_resume_from_a_truncated_latest_names_it_and_a_kept_checkpoint(tmp_path: Path) -> None:
    _toy(tmp_path, save_interval=1, epochs_per_run=1).run()
    latest = _truncated(tmp_path / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match=rf"cannot resume: checkpoint {latest} .* truncated") as info:
        _toy(tmp_path).run()
    kept = tmp_path / "checkpoints" / "epoch_0001.pt"
    assert info.value.advice == (
        f"move {latest} away, then resume with --resume_from {kept} or start over with --resume false"
    )
    assert _toy(tmp_path, resume_from=kept).run()[-1]["epoch"] == 2
    assert _toy(tmp_path, resume="false")._resume_path is None


def test_unsafe_checkpoint_names_the_object_and_never_advises_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": {}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    error = info.value
    assert str(path) in str(error) and f"{__name__}.Custom" in str(error) and "state dict" in error.advice
    assert error.__cause__ is None and error.__suppress_context__
    assert "weights_only" not in str(error) + error.advice

    torch.save({"args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(CheckpointError, match=r"\(argparse\.Namespace\)"):
        load_checkpoint(path)
    assert load_checkpoint(path, allowed_globals=[argparse.Namespace])["args"].arch == "vit_small"
