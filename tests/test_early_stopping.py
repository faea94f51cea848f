"""Early stopping on the validation metric: a fake monitor curve, across a resume, and the argument checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dae.utils.checkpoint import load_checkpoint
from tests.test_trainer_hooks import Toy, _loader, _toy

pytestmark = pytest.mark.usefixtures("one_thread")

# Higher is better, as the DINO k-NN monitor: best at epoch 3, then four validations without a better value.
CURVE = [0.50, 0.55, 0.60, 0.58, 0.60, 0.59, 0.57, 0.70, 0.75, 0.80]
INITIAL = 0.65  # the initial weights score better than the first epochs


class Monitored(Toy):
    """A toy whose validation reads the fake monitor curve at the current epoch."""

    best_metric = "knn_top1"
    best_mode = "max"

    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return {"knn_top1": INITIAL if self.epoch == 0 else CURVE[self.epoch - 1]}, {}


def monitored(out: Path, **kwargs: Any) -> Monitored:
    return _toy(out, Monitored, **{"max_epochs": len(CURVE), "val_loader": _loader(), **kwargs})


def test_stops_after_patience_validations_without_improvement(tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO"):
        history = monitored(tmp_path, early_stop_patience=3).run()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]  # 0.58, 0.60 (not better), 0.59: three stale
    assert "stopping early at epoch 6 of 10: knn_top1 has not improved for 3 validations (best 0.6000 at epoch 3" in (
        caplog.text
    )
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert (best["epoch"], best["best_value"]) == (3, 0.60)
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["stale_validations"] == 3


def test_without_patience_the_run_goes_to_the_end(tmp_path: Path) -> None:
    assert len(monitored(tmp_path).run()) == len(CURVE)


def test_patience_survives_a_resume_and_a_stopped_run_stays_stopped(tmp_path: Path) -> None:
    straight = monitored(tmp_path / "straight", early_stop_patience=3).run()
    split = tmp_path / "split"
    monitored(split, early_stop_patience=3, epochs_per_run=4).run()  # 0.58 at epoch 4: one stale validation
    resumed = monitored(split, early_stop_patience=3).run()
    assert [h["epoch"] for h in resumed] == [h["epoch"] for h in straight]
    assert monitored(split, early_stop_patience=3).run() == resumed  # launched again: nothing more is trained
    assert load_checkpoint(split / "checkpoints" / "latest.pt")["epoch"] == 6


def test_patience_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="early_stop_patience must be a positive integer"):
        monitored(tmp_path, early_stop_patience=0)
    with pytest.raises(ValueError, match="needs a validation"):
        _toy(tmp_path, early_stop_patience=2)


def test_initial_weights_are_epoch_zero_once_and_never_best(tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO"):
        history = monitored(tmp_path / "straight", validate_at_start=True, max_epochs=4).run()
    assert history[0] == {"epoch": 0, "step": 0, "seconds": history[0]["seconds"], "val_knn_top1": INITIAL}
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert "epoch 0 (initial weights)  | val knn_top1 0.6500" in caplog.text
    assert load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["epoch"] == 3  # 0.60, not 0.65

    split = tmp_path / "split"
    monitored(split, validate_at_start=True, max_epochs=4, epochs_per_run=2).run()
    resumed = monitored(split, validate_at_start=True, max_epochs=4).run()  # no second epoch 0
    assert [(h["epoch"], h.get("val_knn_top1")) for h in resumed] == [
        (h["epoch"], h.get("val_knn_top1")) for h in history
    ]
    restarted = monitored(split, validate_at_start=True, max_epochs=4, resume=False).run()  # a fresh start
    assert [h["epoch"] for h in restarted] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="validate_at_start needs a validation"):
        _toy(tmp_path / "none", Monitored, max_epochs=2, validate_at_start=True)
