"""Pretrained against random initialisation: baseline specs, the random-init twin of a checkpoint, the gain table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dae.evaluation import gain_table, with_random_baselines
from dae.models import DINOHead, MultiCropWrapper, backbone_config, backbone_from_spec, build_backbone


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A ViT-T/8 at 32 px whose weights are far from any initialisation, in our DINO checkpoint format."""
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32)
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(0.5)
    wrapper = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 16))
    path = tmp_path / "dino.pt"
    torch.save({"teacher": wrapper.state_dict(), "backbone_config": backbone_config(backbone)}, path)
    return path


def test_baselines_only_for_loaded_checkpoints() -> None:
    specs = {
        "ours": {"kind": "dino", "checkpoint": "a.pt"},
        "random": {"kind": "dino", "checkpoint": None, "arch": "vit_tiny"},
        "rad_dino": {"kind": "hf_dinov2", "path": "/models/rad-dino"},
        "dae": {"kind": "dae3d", "checkpoint": "b.pt", "feature_size": 12},
    }
    out = with_random_baselines(specs)
    assert list(out) == ["ours", "ours_random_init", "random", "rad_dino", "dae", "dae_random_init"]
    assert out["ours_random_init"] == {"kind": "dino", "checkpoint": "a.pt", "random_init": True}
    assert with_random_baselines(out) == out  # baselines are not doubled


def test_random_init_twin_has_the_checkpoint_architecture_not_its_weights(checkpoint: Path) -> None:
    loaded = backbone_from_spec({"kind": "dino", "checkpoint": str(checkpoint)})
    torch.manual_seed(0)
    twin = backbone_from_spec({"kind": "dino", "checkpoint": str(checkpoint), "random_init": True})
    assert backbone_config(twin) == backbone_config(loaded) == {**backbone_config(loaded), "patch_size": 8}
    assert all(torch.all(p == 0.5) for p in loaded.parameters())
    assert not any(torch.all(p == 0.5) for p in twin.parameters() if p.numel() > 1)
    torch.manual_seed(0)
    again = backbone_from_spec({"kind": "dino", "checkpoint": str(checkpoint), "random_init": True})
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), again.state_dict().values()))


def row(backbone: str, protocol: str, metric: str, value: float, low=None, high=None) -> dict:
    return {"backbone": backbone, "protocol": protocol, "metric": metric, "value": value, "low": low, "high": high}


def test_gain_table_pairs_each_metric_with_its_baseline() -> None:
    rows = [
        row("ours", "knn", "auroc", 0.90, 0.86, 0.93),
        row("ours_random_init", "knn", "auroc", 0.75, 0.70, 0.80),
        row("ours", "linear", "auroc", 0.80, 0.75, 0.85),
        row("ours_random_init", "linear", "auroc", 0.78, 0.72, 0.83),
        row("ours", "retrieval", "precision@1", 0.60),
        row("ours_random_init", "retrieval", "precision@1", 0.65),
        row("other", "knn", "auroc", 0.5, 0.4, 0.6),  # no baseline: not in the table
    ]
    table = gain_table(rows)
    assert "| ours | knn | auroc | 0.9000 [0.8600, 0.9300] | 0.7500 [0.7000, 0.8000] | +0.1500 | pretrained better" in (
        table
    )
    assert "| ours | linear | auroc |" in table and "| +0.0200 | intervals overlap |" in table
    assert "| ours | retrieval | precision@1 | 0.6000 | 0.6500 | -0.0500 | random init higher |" in table
    assert "other" not in table
    assert gain_table([row("ours", "knn", "auroc", 0.9)]) == ""
