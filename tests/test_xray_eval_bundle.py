"""End-to-end runs of the ``xray_eval`` classification configs through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dae.models import DINOHead, MultiCropWrapper, backbone_config, build_backbone
from tests.bundle_cli import REPO, run_bundle


@pytest.fixture(scope="module")
def small_run(module_tmp_path: Path) -> tuple[Path, Path]:
    """A 4/3/3-per-class datalist of the shipped X-rays and a DINO checkpoint of a random ViT-T/16 in our format."""
    folder = module_tmp_path
    full = json.loads((REPO / "jsons" / "xray_demo.json").read_text())

    def pick(split: str, n: int) -> list[dict]:
        return [e for e in full[split] if e["label"] == 0][:n] + [e for e in full[split] if e["label"] == 1][:n]

    datalist = folder / "xray_small.json"
    datalist.write_text(
        json.dumps(
            {"labels": full["labels"], "training": pick("training", 4), "validation": pick("validation", 3)}
            | {"test": pick("test", 3)}
        )
    )
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32)
    wrapper = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 32))
    checkpoint = folder / "dino_tiny.pt"
    torch.save({"teacher": wrapper.state_dict(), "backbone_config": backbone_config(backbone)}, checkpoint)
    return datalist, checkpoint


def run_eval(out: Path, small_run: tuple[Path, Path], configs: tuple[str, ...], *overrides: str) -> str:
    datalist, checkpoint = small_run
    common = ["--datalist", str(datalist), "--output_dir", str(out), "--image_size", "32", "--n_boot", "50"]
    common += ["--backbones#dino_demo_vit_tiny16#checkpoint", str(checkpoint)]
    proc = run_bundle("xray_eval", configs, *common, *overrides)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_all_protocols_write_one_table(tmp_path, small_run):
    out = tmp_path / "eval"
    overrides = ["--probe_epochs", "2", "--learning_rates", "[0.01]", "--n_last_blocks", "[1, 4]"]
    overrides += ["--protocols", "['knn', 'linear_probe', 'retrieval', 'finetune']", "--finetune_epochs", "1"]
    overrides += ["--fine_tune", "'False'"]  # a string, as from a YAML or shell: must mean false
    log = run_eval(out, small_run, ("evaluate.yaml", "demo.yaml"), *overrides)
    assert "| backbone | protocol |" in log

    scored = out / "evaluation" / "xray_small_test"  # the datalist's own test list
    rows = json.loads((scored / "results.json").read_text())
    assert {r["test_set"] for r in rows} == {"xray_small_test"}
    for backbone in ("dino_demo_vit_tiny16_random_init", "dino_demo_vit_tiny16"):
        mine = [r for r in rows if r["backbone"] == backbone]
        assert {r["protocol"] for r in mine} == {"knn", "linear", "retrieval", "frozen_head"}
        for row in mine:
            assert 0.0 <= row["value"] <= 1.0
        for row in (r for r in mine if r["protocol"] in ("knn", "linear", "frozen_head")):
            assert row["low"] <= row["value"] <= row["high"]
        for name in ("linear_probe_roc", "retrieval", "patch_pca"):
            assert (scored / "pictures" / f"{backbone}_{name}.png").is_file()
        test_features = torch.load(scored / "features" / backbone / "test.pt", weights_only=True)
        assert len(test_features["ids"]) == 6
        assert (out / "features" / backbone / "training.pt").is_file()
    assert (scored / "results.csv").is_file() and (scored / "config.yaml").is_file()
    summary = (scored / "results.md").read_text()
    assert summary.startswith("Test set `xray_small_test`: list `test` of ")
    # compare_random (on by default): the checkpoint's architecture at random init, and the gain per metric
    gains = summary[summary.index("Pretrained against the same architecture at random initialisation") :]
    assert "| dino_demo_vit_tiny16 | knn | auroc |" in gains and "| dino_demo_vit_tiny16 | linear | auroc |" in gains
    assert "Pretrained against the same architecture" in log
    assert not (out / "results.json").exists() and not (out / "pictures").exists()
