"""End-to-end runs of the BTCV and FeTA fine-tuning bundles on the embedded demo data (tiny networks)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from dae.data import SimpleITKReader
from dae.models import DisruptiveAutoencoder
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from tests.bundle_cli import REPO, read_jsonl, run_bundle

TRAIN = ("train.yaml", "demo.yaml")
DEMO_LISTS = {"btcv_finetune": REPO / "jsons" / "btcv_demo.json", "feta_finetune": REPO / "jsons" / "feta_demo.json"}


def demo_cases(bundle: str, split: str) -> int:
    """The number of volumes in a list of the bundle's demo datalist."""
    return len(json.loads(DEMO_LISTS[bundle].read_text())[split])


QUICK = ["--epochs", "1", "--num_samples", "1", "--cache_num_workers", "1", "--image_interval", "1"]


def tiny_pretraining_checkpoint(path: Path) -> Path:
    """A DAE pretraining checkpoint of the demo architecture, in the trainer's format."""
    model = DisruptiveAutoencoder(feature_size=12, num_heads=(1, 2, 3, 4), proj_hidden_dim=128, proj_dim=32)
    return save_checkpoint({"model": model.state_dict(), "epoch": 1}, path)


@pytest.fixture(scope="module", params=["btcv_finetune", "feta_finetune"])
def trained(request, tmp_path_factory) -> Iterator[tuple[str, Path, str]]:
    """One epoch of a bundle's demo, initialised from a DAE pretraining checkpoint written here (removed after)."""
    bundle = request.param
    tmp = tmp_path_factory.mktemp(bundle)
    pretrained = tiny_pretraining_checkpoint(tmp / "dae.pt")
    proc = run_bundle(bundle, TRAIN, "--output_dir", str(tmp / "run"), *QUICK, "--pretrained", str(pretrained))
    yield bundle, tmp / "run", proc.stdout + proc.stderr
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_train_validates_whole_volumes(trained):
    bundle, out, log = trained
    assert "loaded" in log and "skipped" in log  # the pretrained-weight report
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["best_metric"] == "mean_dice" and 0.0 <= state["best_value"] <= 1.0
    epochs = read_jsonl(out / "metrics" / "epochs.jsonl")
    assert len(epochs) == 1 and "val_mean_dice" in epochs[0]
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert summary["num_cases"] == demo_cases(bundle, "validation") and 0.0 <= summary["mean_dice"] <= 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val/label_vs_prediction" in events.Tags()["images"]
    assert "val/mean_dice" in events.Tags()["scalars"]


@pytest.mark.slow
def test_evaluate_writes_per_class_tables(trained):
    bundle, out, _ = trained
    # Without demo.yaml: the demo's network, preprocessing and data come from the run's config.yaml.
    run_bundle(bundle, ("train.yaml", "evaluate.yaml"), "--output_dir", str(out), "--amp", "none", "--num_workers", "0")
    validation = json.loads((out / "validation" / "summary.json").read_text())
    test_set = out / "evaluation" / f"{bundle.split('_')[0]}_demo_validation"  # the demo datalists have no "test"
    evaluation = json.loads((test_set / "summary.json").read_text())
    assert evaluation["mean_dice"] == pytest.approx(validation["mean_dice"], abs=1e-6)  # same weights and volumes
    assert "mean_hd95" in evaluation and evaluation["split"] == "validation" and "no 'test' list" in evaluation["note"]
    rows = (test_set / "per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + evaluation["num_cases"] * (13 if bundle == "btcv_finetune" else 7)


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["btcv_finetune"], indirect=True)  # both bundles share the inference code
def test_inference_writes_labels_on_the_input_grid(trained):
    bundle, out, _ = trained
    run_bundle(bundle, (*TRAIN, "inference.yaml"), "--output_dir", str(out), "--infer_key", "training")
    data = REPO / "data"
    loader = LoadImage(reader=SimpleITKReader(), image_only=True)
    for source, name in (
        (data / "ct" / "chest_ct" / "cxr_ct_1.5mm_int16.nii.gz", "cxr_ct_1.5mm_int16_seg.nii.gz"),
        (data / "ct" / "totalseg" / "example_ct_dicom", "example_ct_dicom_seg.nii.gz"),  # a DICOM series
    ):
        image = loader(str(source))
        pred = loader(str(out / "predictions" / name))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine.numpy(), image.affine.numpy(), atol=1e-3)
        assert set(np.unique(pred.numpy()).tolist()) <= set(range(14))


@pytest.mark.slow
def test_two_process_gloo_ddp_finetuning(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    configs = (*TRAIN, "multi_gpu_train.yaml")
    run_bundle("feta_finetune", configs, "--output_dir", str(out), *QUICK, "--batch_size", "1", launcher=torchrun)
    # The training volumes split over 2 ranks (the last padded), 1 per batch: one iteration per volume of a rank;
    # the validation volumes split the same way, a padding duplicate counted once.
    per_rank = math.ceil(demo_cases("feta_finetune", "training") / 2)
    assert [s["step"] for s in read_jsonl(out / "metrics" / "train_steps.jsonl")] == list(range(1, per_rank + 1))
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert summary["num_cases"] == demo_cases("feta_finetune", "validation")
    assert torch.isfinite(torch.tensor(summary["mean_dice"]))
