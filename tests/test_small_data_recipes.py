"""The small-data recipes: what they train on, and that their overlays parse on top of the demos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    assert train.get_parsed_content("monitor_metric") == "knn_auroc"  # the metric the evaluation reports


# Each overlay with the files it goes on top of.
OVERLAYS = {
    ("dae_pretrain", "small_data.yaml"): ("train.yaml", "demo.yaml"),
    ("dae_pretrain", "gpu_small_data.yaml"): ("train.yaml",),
    ("dino_xray", "small_data.yaml"): ("train.yaml", "demo.yaml"),
    ("dino_xray", "gpu_small_data.yaml"): ("train.yaml", "vit_small16.yaml"),
    ("xray_eval", "small_data.yaml"): ("evaluate.yaml",),
    ("xray_eval", "gpu_small_data.yaml"): ("evaluate.yaml",),
    ("feta_finetune", "gpu_small_data.yaml"): ("train.yaml", "demo.yaml"),
    ("btcv_finetune", "gpu_small_data.yaml"): ("train.yaml", "demo.yaml"),
}


@pytest.mark.parametrize(("bundle", "overlay"), sorted(OVERLAYS))
def test_recipe_overlays_set_only_keys_of_the_files_below(bundle: str, overlay: str) -> None:
    # An overlay can add keys, so a misspelt one would be a silent no-op: every key must already exist below it.
    base = _parser(bundle, *OVERLAYS[bundle, overlay]).get()
    added = _parser(bundle, overlay).get()
    assert set(added) - set(base) == set(), f"{bundle}/configs/{overlay}"


def test_dae_gpu_recipe_pretrains_the_fine_tuning_network_on_no_judging_volume() -> None:
    parser = _parser("dae_pretrain", "train.yaml", "gpu_small_data.yaml")
    datalist = Path(parser.get_parsed_content("datalist"))
    pretraining = _images(datalist, "training") | _images(datalist, "validation")
    judges = _images(REPO / "jsons" / "feta_demo.json", "validation")
    judges |= _images(REPO / "jsons" / "btcv_demo.json", "validation")
    assert not pretraining & judges
    # Every volume of the small-data list is in, plus the fetal atlases that only the shared data folder has; the
    # shipped ones exist in data/ (the shared folder is a superset with the same layout).
    assert _images(REPO / "jsons" / "dae_small_data.json", "training") <= pretraining
    shared_only = {image for image in pretraining if not (REPO / "data" / image).exists()}
    assert shared_only and all(image.startswith("mr/fetal_atlas/") for image in shared_only)
    assert parser.get_parsed_content("amp") == "bf16"
    for bundle in ("feta_finetune", "btcv_finetune"):
        finetune = _parser(bundle, "train.yaml", "demo.yaml", "gpu_small_data.yaml")
        for key in ("feature_size", "num_heads", "roi_size"):  # so that --pretrained loads every encoder weight
            assert parser.get_parsed_content(key) == finetune.get_parsed_content(key), (bundle, key)
    feta = _parser("feta_finetune", "train.yaml", "demo.yaml", "gpu_small_data.yaml")
    assert parser.get_parsed_content("spacing") == feta.get_parsed_content("spacing")


def test_dino_gpu_recipe_is_evaluated_from_its_best_checkpoint_at_its_crop_size() -> None:
    train = _parser("dino_xray", "train.yaml", "vit_small16.yaml", "gpu_small_data.yaml")
    evaluation = _parser("xray_eval", "evaluate.yaml", "gpu_small_data.yaml")
    (spec,) = evaluation.get_parsed_content("backbones").values()
    assert spec["checkpoint"] == f"{train.get_parsed_content('output_dir')}/checkpoints/best.pt"
    assert evaluation.get_parsed_content("image_size") == train.get_parsed_content("global_crop_size") == 224
    assert train.get_parsed_content("arch") == "vit_small" and train.get_parsed_content("knn_monitor") is True
    assert train.get_parsed_content("photometric_augmentation") is False
    assert train.get_parsed_content("early_stop_patience") == 10
    assert train.get_parsed_content("monitor_metric") == "knn_auroc"
    assert evaluation.get_parsed_content("compare_random")
