"""End-to-end runs of the ``dae_pretrain`` bundle through the real command line, on the embedded demo data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dae.models import DisruptiveAutoencoder
from dae.utils.checkpoint import load_checkpoint
from tests.bundle_cli import read_jsonl, run_bundle

# Two iterations per epoch: 7 training volumes, 3 per batch, the last one dropped.
SMALL = ["--batch_size", "3", "--num_samples", "1", "--val_num_samples", "1", "--cache_num_workers", "1"]


def run_pretrain(
    out: Path, *overrides: str, configs=("train.yaml", "demo.yaml"), launcher=None, one_thread=False
) -> str:
    proc = run_bundle(
        "dae_pretrain", configs, "--output_dir", str(out), *SMALL, *overrides, launcher=launcher, one_thread=one_thread
    )
    return proc.stdout + proc.stderr


def step_losses(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics" / "train_steps.jsonl")


@pytest.mark.slow
def test_two_step_run_leaves_checkpoint_images_and_config(tmp_path):
    out = tmp_path / "run"
    log = run_pretrain(out, "--epochs", "1", "--choice", "all")
    assert "reconstruction (train)" in log
    assert "estimated cache size" in log
    steps = step_losses(out)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor([s["loss"], s["contrastive"]])).all() for s in steps)

    state = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert state["epoch"] == 1 and state["global_step"] == 2
    assert (out / "checkpoints" / "best.pt").is_file()
    model = DisruptiveAutoencoder(feature_size=12, num_heads=(1, 2, 3, 4), proj_hidden_dim=128, proj_dim=32)
    model.load_state_dict(state["model"])  # the checkpoint is the demo network, complete

    config = (out / "config.yaml").read_text()
    assert "choice: all" in config and "epochs: 1" in config
    assert json.loads((out / "versions.json").read_text())["monai"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val/clean_disrupted_reconstruction" in events.Tags()["images"]
    assert "train/clean_disrupted_reconstruction" in events.Tags()["images"]
    assert {"train/reconstruction", "train/contrastive", "train/loss", "train/lr", "val/loss"} <= set(
        events.Tags()["scalars"]
    )


@pytest.mark.slow
def test_resume_continues_the_same_curve(tmp_path):
    # The straight run loads in-process; the split one with 2 persistent workers: the crops must not change.
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_pretrain(straight, "--epochs", "2", "--num_workers", "0", one_thread=True)
    run_pretrain(split, "--epochs", "2", "--epochs_per_run", "1", "--num_workers", "2", one_thread=True)
    assert len(step_losses(split)) == 2
    log = run_pretrain(split, "--epochs", "2", "--num_workers", "2", one_thread=True)
    assert "resumed from" in log
    a, b = step_losses(straight), step_losses(split)
    assert [s["step"] for s in a] == [s["step"] for s in b] == [1, 2, 3, 4]
    assert a[2]["reconstruction"] != a[0]["reconstruction"]  # epoch 2 draws other crops than epoch 1
    for x, y in zip(a, b):
        for key in ("loss", "reconstruction", "contrastive"):
            assert x[key] == pytest.approx(y[key], abs=1e-6, rel=0), (x["step"], key)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        # A fresh process may sum in another order (CPU kernels depend on buffer alignment): ~1e-7 noise that
        # one large-learning-rate step amplifies in the gradient norm.
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = run_pretrain(
        out,
        "--epochs",
        "1",
        "--batch_size",
        "2",
        configs=("train.yaml", "demo.yaml", "multi_gpu_train.yaml"),
        launcher=torchrun,
    )
    # 7 volumes over 2 ranks = 4 per rank (padded), 2 per batch: 2 iterations, logged once (rank 0).
    assert [s["step"] for s in step_losses(out)] == [1, 2]
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["global_step"] == 2
    assert "reconstruction (train)" in log


def test_bad_datalist_fails_before_training(tmp_path):
    datalist = tmp_path / "bad.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "ct/totalseg/example_ct.nii.gz", "modality": "CT"},
                    {"image": "ct/missing.nii.gz", "modality": "CT"},
                    {"image": "ct/totalseg/example_ct.nii.gz", "modality": "PET"},
                ],
                "validation": [{"image": "ct/totalseg/example_ct.nii.gz", "modality": "CT"}],
            }
        )
    )
    overrides = ["--datalist", str(datalist), "--output_dir", str(tmp_path / "run")]
    proc = run_bundle("dae_pretrain", ("train.yaml", "demo.yaml"), *overrides, check=False)
    assert proc.returncode != 0
    assert "[1]" in proc.stderr and "missing.nii.gz" in proc.stderr
    assert "[2]" in proc.stderr and "PET" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
