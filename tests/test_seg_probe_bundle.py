"""End-to-end run of the ``xray_eval`` segmentation-probe bundle through the real command line, on CT slices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from PIL import Image

from dae.models import DINOHead, MultiCropWrapper, backbone_config, build_backbone
from tests.bundle_cli import REPO, run_bundle

CT_DIR = REPO / "data" / "ct" / "chest_ct"
CLASSES = {"0": "background", "1": "liver", "2": "lungs"}
ORGANS = {1: (5,), 2: (10, 11, 12, 13, 14)}  # TotalSegmentator v2 ids (structures.csv)
SIZE = 96  # written size; the bundle resizes to 64, images bicubic and masks nearest
# A few seconds of head training: batches of one, 2 epochs, one learning rate (nothing to select on validation)
QUICK = ("--image_size", "64", "--batch_size", "1", "--optimizer", "adamw", "--learning_rates", "[0.05]")
QUICK += ("--epochs", "2", "--pictures", "2", "--device", "cpu")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    """12 axial CT slices holding lungs, liver or both as 8-bit PNG images and masks, and their datalist."""
    root = tmp_path_factory.mktemp("seg_data")
    slices = list(range(30, 94, 5))[:12]
    ct = np.asarray(nib.load(CT_DIR / "cxr_ct_1.5mm_int16.nii.gz").dataobj)[..., slices]
    mask = np.asarray(nib.load(CT_DIR / "mask_1.5mm.nii.gz").dataobj)[..., slices]
    label = np.zeros(mask.shape, dtype=np.uint8)
    for index, ids in ORGANS.items():
        label[np.isin(mask, ids)] = index
    # LAS (x, y, slice) -> (slice, 1, rows, columns) with anterior up and the patient's left on the right
    image = torch.from_numpy(np.clip((ct.astype(np.float32) + 1000.0) / 1400.0, 0.0, 1.0)).permute(2, 1, 0).flip(1)
    image = F.interpolate(image[:, None], size=(SIZE, SIZE), mode="area")
    label = torch.from_numpy(label).permute(2, 1, 0).flip(1)[:, None].float()
    label = F.interpolate(label, size=(SIZE, SIZE), mode="nearest")
    entries = []
    for index, (img, lab) in enumerate(zip(image[:, 0], label[:, 0])):
        Image.fromarray((img * 255).round().byte().numpy()).save(root / f"slice_{index}.png")
        Image.fromarray(lab.byte().numpy()).save(root / f"slice_{index}_mask.png")
        entries.append({"image": f"slice_{index}.png", "label": f"slice_{index}_mask.png"})
    datalist = {"labels": CLASSES, "training": entries[0::2], "validation": entries[1::4], "test": entries[3::4]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory) -> Path:
    """A DINO-format checkpoint of a randomly initialised ViT-T/16 teacher (not the bundle's seed-0 baseline)."""
    torch.manual_seed(1)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=64)
    wrapper = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim=32, hidden_dim=64, bottleneck_dim=32))
    path = tmp_path_factory.mktemp("dino") / "latest.pt"
    torch.save({"teacher": wrapper.state_dict(), "backbone_config": backbone_config(backbone)}, path)
    return path


def test_transforms_give_integer_masks(seg_data: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "xray_eval" / "configs" / "seg_probe.yaml"))
    parser.update({"datalist": str(seg_data / "datalist.json"), "dataset_dir": str(seg_data), "image_size": 64})
    assert len(parser.get_parsed_content("class_names")) == 3
    sample = parser.get_parsed_content("loaders")["test"].dataset[0]
    image, label = sample["image"], sample["label"]
    assert image.shape == label.shape == (1, 64, 64)
    assert image.dtype == torch.float32 and label.dtype == torch.int64
    assert set(label.unique().tolist()) == {0, 1, 2}
    assert float(image.min()) > -0.1 and float(image.max()) < 1.1  # bicubic may overshoot [0, 1] slightly


@pytest.mark.slow
def test_seg_probe_bundle(seg_data: Path, dino_checkpoint: Path, tmp_path: Path) -> None:
    backbones = {
        "random_vit_tiny16": {"kind": "dino", "checkpoint": None, "arch": "vit_tiny", "img_size": 64},
        "dino_vit_tiny16": {"kind": "dino", "checkpoint": str(dino_checkpoint)},
    }
    out = tmp_path / "out"
    run_bundle(
        "xray_eval",
        ("seg_probe.yaml",),
        "--output_dir",
        str(out),
        "--datalist",
        str(seg_data / "datalist.json"),
        "--dataset_dir",
        str(seg_data),
        "--backbones",
        repr(backbones),
        *QUICK,
        launcher=[sys.executable],  # one thread (OMP_NUM_THREADS=1): faster for these tiny models on shared cores
    )
    out = out / "evaluation" / "datalist_test"  # the scored list: "test" of datalist.json
    assert all((out / f"results.{ext}").is_file() for ext in ("csv", "json", "md"))
    rows = json.loads((out / "results.json").read_text())
    scored = [*backbones, "dino_vit_tiny16_random_init"]  # compare_random adds the checkpoint's random-init twin
    assert {(r["backbone"], r["metric"]) for r in rows} == {(b, m) for b in scored for m in ("dice", "iou")}
    for row in rows:
        assert row["protocol"] == "seg_probe" and row["setting"] == "linear:lr=0.05"
        values = [row["value"], row["per_class.liver"], row["per_class.lungs"]]
        assert all(0.0 <= v <= 1.0 for v in values), row
        if row["metric"] == "dice":  # masks line up with their images: two epochs already find some lung
            assert row["per_class.lungs"] > 0.05, row
    for name in scored:
        assert (out / "pictures" / f"{name}_seg_probe.png").stat().st_size > 0
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
