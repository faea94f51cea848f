"""The small-data recipes: what they train on, and that their overlays parse on top of the demos."""

from __future__ import annotations

import json
from pathlib import Path

from monai.bundle import ConfigParser

from tests.bundle_cli import REPO


def _images(datalist: Path, key: str) -> set[str]:
    return {entry["image"] for entry in json.loads(datalist.read_text())[key]}


def _parser(bundle: str, *names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / name) for name in names])
    return parser


def test_dae_small_data_pretrains_on_no_volume_that_judges_the_fine_tuning() -> None:
    parser = _parser("dae_pretrain", "train.yaml", "demo.yaml", "small_data.yaml")
    datalist = Path(parser.get_parsed_content("datalist"))
    assert datalist == REPO / "jsons" / "dae_small_data.json"
    pretraining = _images(datalist, "training") | _images(datalist, "validation")
    judges = _images(REPO / "jsons" / "feta_demo.json", "validation")
    judges |= _images(REPO / "jsons" / "btcv_demo.json", "validation")
    assert judges and not pretraining & judges
    # the FeTA demo's training atlases are in (their images, without labels), at the FeTA demo's spacing
    assert _images(REPO / "jsons" / "feta_demo.json", "training") <= pretraining
    feta = _parser("feta_finetune", "train.yaml", "demo.yaml")
    assert parser.get_parsed_content("spacing") == feta.get_parsed_content("spacing")
    for key in ("feature_size", "num_heads", "roi_size"):
        assert parser.get_parsed_content(key) == feta.get_parsed_content(key), key


def test_dino_small_data_is_evaluated_from_its_best_checkpoint() -> None:
    train = _parser("dino_xray", "train.yaml", "demo.yaml", "small_data.yaml")
    evaluation = _parser("xray_eval", "evaluate.yaml", "small_data.yaml")
    (spec,) = evaluation.get_parsed_content("backbones").values()
    assert spec["checkpoint"] == f"{train.get_parsed_content('output_dir')}/checkpoints/best.pt"
    assert evaluation.get_parsed_content("image_size") == train.get_parsed_content("global_crop_size")
    assert train.get_parsed_content("knn_monitor") is True and evaluation.get_parsed_content("compare_random")
