"""End-to-end runs of the ``dae_pretrain`` bundle through the real command line, on the embedded demo data."""

from __future__ import annotations

import json
import socket
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
    assert "Cache 'memory', estimated from the headers" in log
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


def run_in_two_launches(out: Path, *overrides: str) -> None:
    """Two epochs in two launches (the second resumes); each launch one thread, for bit-identical sums."""
    run_pretrain(out, "--epochs", "2", "--epochs_per_run", "1", *overrides, one_thread=True)
    assert [s["step"] for s in step_losses(out)] == [1, 2]
    log = run_pretrain(out, "--epochs", "2", *overrides, one_thread=True)
    assert "resumed from" in log


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [s["step"] for s in a] == [s["step"] for s in b]
    for x, y in zip(a, b):
        for key in ("loss", "reconstruction", "contrastive"):
            assert x[key] == pytest.approx(y[key], abs=1e-6, rel=0), (x["step"], key)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        # A fresh process may sum in another order (CPU kernels depend on buffer alignment): ~1e-7 noise that
        # one large-learning-rate step amplifies in the gradient norm.
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_resume_continues_the_same_curve(tmp_path):
    # The straight run loads in-process from RAM; the split ones with 2 persistent workers from RAM, or from a
    # disk cache: the crops must not change.
    straight, split, disk = tmp_path / "straight", tmp_path / "split", tmp_path / "disk"
    run_pretrain(straight, "--epochs", "2", "--num_workers", "0", one_thread=True)
    run_in_two_launches(split, "--num_workers", "2")
    run_in_two_launches(disk, "--num_workers", "2", "--cache", "disk")
    assert len(list((disk / "cache").glob("*.pt"))) == 9  # 7 training and 2 validation volumes, written once
    a = step_losses(straight)
    assert [s["step"] for s in a] == [1, 2, 3, 4]
    assert a[2]["reconstruction"] != a[0]["reconstruction"]  # epoch 2 draws other crops than epoch 1
    assert_same_curve(a, step_losses(split))
    assert_same_curve(a, step_losses(disk))


@pytest.mark.slow
def test_smart_cache_resumes_exactly(tmp_path):
    # A window of 4 of the 7 volumes, 2 replaced per epoch: one iteration of 3 crops per epoch.
    smart = ["--cache", "smart", "--cache_num", "4", "--replace_rate", "0.5", "--num_workers", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    log = run_pretrain(straight, "--epochs", "3", *smart, one_thread=True)
    assert "a window of 4 of 7 volumes (2 replaced per epoch)" in log
    run_pretrain(split, "--epochs", "3", "--epochs_per_run", "2", *smart, one_thread=True)
    assert "resumed from" in run_pretrain(split, "--epochs", "3", *smart, one_thread=True)
    assert [s["step"] for s in step_losses(straight)] == [1, 2, 3]
    assert_same_curve(step_losses(straight), step_losses(split))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_run_under_the_multi_node_rendezvous(tmp_path):
    # The launch a multi-node job uses (c10d rendezvous at an endpoint; one node here), two ranks sharing a
    # disk cache.
    out = tmp_path / "ddp"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=dae-test",
    ]
    log = run_pretrain(
        out,
        "--epochs",
        "1",
        "--batch_size",
        "2",
        "--cache",
        "disk",
        configs=("train.yaml", "demo.yaml", "multi_gpu_train.yaml"),
        launcher=torchrun,
    )
    # 7 volumes over 2 ranks = 4 per rank (padded), 2 per batch: 2 iterations, logged once (rank 0).
    assert [s["step"] for s in step_losses(out)] == [1, 2]
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["global_step"] == 2
    assert "reconstruction (train)" in log
    assert "(2 processes on this node)" in log
    assert len(list((out / "cache").glob("*.pt"))) == 9  # one file per volume, whichever rank wrote it


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
