"""``python -m dae.cli pretrain-report`` on a tiny finished DINO run, with and without an evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dae.cli import main
from tests.test_trainer_hooks import _dino

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(module_tmp_path: Path) -> Path:
    """Two epochs of a tiny DINO run with a fake k-NN monitor: metrics, checkpoints and TensorBoard pictures."""
    out = module_tmp_path / "dino_run"
    out.mkdir()
    val_loader = DataLoader([{"image": torch.rand(3, 32, 32)} for _ in range(2)], batch_size=2)
    _dino(out, val_loader=val_loader, monitor=lambda backbone: {"knn_top1": 0.5, "knn_auroc": 0.75}).run()
    return out


def test_report_has_curves_collapse_table_and_pictures(finished_run: Path, capsys) -> None:
    assert main(["pretrain-report", str(finished_run)]) == 0
    report = finished_run / "report"
    assert f"Wrote {report / 'index.md'}" in capsys.readouterr().out
    text = (report / "index.md").read_text()
    assert "2 epochs recorded, 4 iterations." in text
    assert "![curves](curves.png)" in text and (report / "curves.png").stat().st_size > 10_000
    assert (
        "k-NN monitor (top-1 on the validation list): first 0.5000 (epoch 1), best 0.5000 (epoch 1, `best.pt`)" in text
    )
    assert "k-NN monitor (AUROC on the validation list): first 0.7500 (epoch 1), best 0.7500 (epoch 1), last" in text
    assert "## Collapse diagnostics (last epoch)" in text and "| teacher entropy |" in text
    for picture in ("val_teacher_last_layer_attention.png", "train_crops_global_then_local.png"):
        assert (report / picture).read_bytes()[:4] == b"\x89PNG"
        assert f"]({picture})" in text
    html = (report / "index.html").read_text()
    assert "<table>" in html and '<img alt="curves" src="curves.png"' in html
    assert "Evaluation" not in text


def test_report_with_an_evaluation_shows_the_gain_over_random_init(finished_run: Path, tmp_path: Path) -> None:
    rows = [
        {"backbone": "ours", "protocol": "knn", "setting": "k=10", "metric": "auroc", "value": 0.9, "low": 0.85,
         "high": 0.94},
        {"backbone": "ours_random_init", "protocol": "knn", "setting": "k=20", "metric": "auroc", "value": 0.7,
         "low": 0.62, "high": 0.78},
    ]  # fmt: skip
    evaluation = tmp_path / "evaluation" / "demo_test"
    evaluation.mkdir(parents=True)
    (evaluation / "results.json").write_text(json.dumps(rows))
    assert main(["pretrain-report", str(finished_run), "--evaluation", str(evaluation), "--output", str(tmp_path)]) == 0
    text = (tmp_path / "index.md").read_text()
    assert "| ours | knn | auroc | 0.9000 [0.8500, 0.9400] | 0.7000 [0.6200, 0.7800] | +0.2000 | pretrained better" in (
        text
    )


def test_report_names_what_is_missing(tmp_path: Path, capsys) -> None:
    assert main(["pretrain-report", str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics' / 'epochs.jsonl'} is missing" in capsys.readouterr().err


def test_report_of_a_koleo_run_compares_the_dino_part_with_ln_k(tmp_path: Path) -> None:
    _dino(tmp_path, koleo_weight=1.0).run()
    assert main(["pretrain-report", str(tmp_path)]) == 0
    last = json.loads((tmp_path / "metrics" / "epochs.jsonl").read_text().splitlines()[-1])
    assert last["train_loss"] == pytest.approx(last["train_dino"] + last["train_koleo"], rel=1e-5)
    row = next(line for line in (tmp_path / "report" / "index.md").read_text().splitlines() if "no collapse" in line)
    assert f"| {last['train_dino']:.4f} | {last['train_uniform_loss']:.4f} |" in row
