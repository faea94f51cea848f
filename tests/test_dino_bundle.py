"""End-to-end runs of the ``dino_xray`` bundle through the real command line, on the shipped chest X-rays."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dae.models import load_backbone
from dae.utils.checkpoint import load_checkpoint
from tests.bundle_cli import REPO, read_jsonl, run_bundle

DEMO = ("train.yaml", "demo.yaml")


@pytest.fixture(scope="module")
def small_datalist(tmp_path_factory) -> Path:
    """8 training images (2 iterations of 4) and 6 validation images of both classes from the demo datalist."""
    full = json.loads((REPO / "jsons" / "xray_demo.json").read_text())

    def pick(split: str, n: int) -> list[dict]:
        return [e for e in full[split] if e["label"] == 0][:n] + [e for e in full[split] if e["label"] == 1][:n]

    train, val = pick("training", 4), pick("validation", 3)
    path = tmp_path_factory.mktemp("datalist") / "xray_small.json"
    path.write_text(json.dumps({"labels": full["labels"], "training": train, "validation": val}))
    return path


def run_dino(out: Path, datalist: Path, *overrides: str, configs=DEMO, launcher=None, batch_size: int = 4) -> str:
    small = ["--datalist", str(datalist), "--batch_size", str(batch_size), "--num_workers", "0"]
    small += ["--cache_num_workers", "1"]
    small += ["--head_hidden_dim", "256", "--head_bottleneck_dim", "64"]  # checkpoints of 30 MB, not 170 MB
    proc = run_bundle("dino_xray", configs, "--output_dir", str(out), *small, *overrides, launcher=launcher)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_resume_checkpoint_and_pictures(tmp_path, small_datalist):
    """2 epochs of 2 iterations straight, and 1 + resume + 1: the same curve; the checkpoint loads as a backbone."""
    common = ("--epochs", "2", "--warmup_teacher_temp_epochs", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    log = run_dino(straight, small_datalist, *common)
    assert "knn_top1 (validation)" in log
    run_dino(split, small_datalist, *common, "--epochs_per_run", "1", "--knn_monitor", "false")
    log = run_dino(split, small_datalist, *common, "--knn_monitor", "false")
    assert "resumed from" in log
    a, b = read_jsonl(straight / "metrics" / "train_steps.jsonl"), read_jsonl(split / "metrics" / "train_steps.jsonl")
    assert [s["step"] for s in a] == [s["step"] for s in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["teacher_entropy"] == pytest.approx(y["teacher_entropy"], abs=1e-5)
    for key in ("loss", "lr", "wd", "momentum", "teacher_entropy", "teacher_kl_uniform", "grad_norm"):
        assert all(torch.isfinite(torch.tensor(s[key])) for s in a), key
    assert a[0]["uniform_loss"] == pytest.approx(torch.log(torch.tensor(1024.0)).item(), abs=1e-4)

    path = straight / "checkpoints" / "latest.pt"
    state = load_checkpoint(path)  # weights_only=True
    assert {"student", "teacher", "optimizer", "scaler", "epoch", "dino_loss", "backbone_config", "args"} <= set(state)
    assert state["epoch"] == 2 and state["args"]["arch"] == "vit_tiny"
    assert state["dino_loss"]["center"].shape == (1, 1024)
    assert "head.last_layer.parametrizations.weight.original0" in state["teacher"]
    assert (straight / "checkpoints" / "best.pt").is_file()

    backbone, report = load_backbone(path)  # architecture from the checkpoint, teacher weights by default
    assert report.loaded and not report.missing
    assert torch.equal(backbone.state_dict()["cls_token"], state["teacher"]["backbone.cls_token"])
    assert backbone(torch.rand(2, 3, 64, 64)).shape == (2, 192)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/crops_global_then_local", "val/teacher_last_layer_attention"} <= set(events.Tags()["images"])
    assert {"train/loss", "train/wd", "train/momentum", "train/teacher_entropy", "val/knn_top1"} <= set(
        events.Tags()["scalars"]
    )


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tmp_path, small_datalist):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_dino(
        out,
        small_datalist,
        "--epochs",
        "1",
        "--warmup_teacher_temp_epochs",
        "0",
        configs=(*DEMO, "multi_gpu_train.yaml"),
        launcher=torchrun,
        batch_size=2,
    )
    steps = read_jsonl(out / "metrics" / "train_steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2]  # 8 images, 2 ranks x 2 per batch
    state = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert state["args"]["total_batch_size"] == 4
    assert not any(k.startswith("module.") for k in state["student"])


@pytest.mark.parametrize("device_augmentation", [False, True])
def test_photometric_augmentation_switches_off_both_places(device_augmentation: bool) -> None:
    """``photometric_augmentation: false`` (the small-data recipe) leaves no photometric step in the loader or on
    the device; otherwise they run in exactly one of the two places."""
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / "dino_xray" / "configs"
    for overlays, photometric in ((DEMO, True), ((*DEMO, "small_data.yaml"), False)):
        parser = ConfigParser()
        parser.read_config([str(folder / name) for name in overlays])
        parser["device_augmentation"] = device_augmentation
        multicrop = parser.get_parsed_content("train#multicrop")
        crop_augment = parser.get_parsed_content("crop_augment")
        assert (multicrop.photometric, crop_augment.augment) == (
            photometric and not device_augmentation,
            photometric and device_augmentation,
        )
