"""The logsam bundle through ``python -m monai.bundle run``: train, evaluate and infer with tiny encoders.

The segmenter is a randomly initialised tiny SAM saved as a Hugging Face folder and the caption encoder a tiny
BERT folder, so the run needs no real weights; the dictations are typed reports (no speech recogniser).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bundle_cli import read_jsonl, run_bundle

transformers = pytest.importorskip("transformers")
pytest.importorskip("spacy")
pytest.importorskip("negspacy")

pytestmark = pytest.mark.slow

CLASSES = ("glioma", "meningioma", "pituitary")
WORDS = ["glioma", "meningioma", "pituitary", "tumour", "healthy", "brain", "no", "evidence", "of", "a", "."]


def _tiny_sam(folder) -> None:
    vision = transformers.SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        mlp_dim=32,
        global_attn_indexes=[0],
        window_size=4,
        num_pos_feats=8,
    )
    prompt = transformers.SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = transformers.SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    config = transformers.SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    torch.manual_seed(0)
    transformers.SamModel(config).save_pretrained(folder)


def _tiny_bert(folder) -> None:
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(folder)


def _slices(root) -> dict[str, list[dict]]:
    """Twelve 48x48 slices, a bright ellipse each, at a place that depends on the class."""
    rng = np.random.default_rng(0)
    lists: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    yy, xx = np.mgrid[:48, :48]
    for index in range(12):
        name = CLASSES[index % 3]
        cy, cx = (14 + 10 * (index % 3), 16 + (index % 5) * 3)
        mask = ((yy - cy) / 6) ** 2 + ((xx - cx) / 8) ** 2 <= 1
        image = np.clip(rng.normal(60, 15, (48, 48)) + 150 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"s{index}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"s{index}_mask.png")
        entry = {"image": f"s{index}.png", "mask": f"s{index}_mask.png", "class": name}
        split = "training" if index < 6 else "validation" if index < 9 else "test"
        if split == "test":
            entry["report"] = f"No evidence of {CLASSES[(index + 1) % 3]}. Findings consistent with a {name}."
        lists[split].append(entry)
    lists["test"][0] |= {"report": "No intracranial mass.", "dictated_class": "healthy"}
    return lists


@pytest.fixture(scope="module")
def setup(module_tmp_path):
    root = module_tmp_path
    _tiny_sam(root / "sam")
    _tiny_bert(root / "bert")
    data = root / "data"
    data.mkdir()
    (root / "list.json").write_text(json.dumps(_slices(data)))
    common = [
        "--dataset_dir", str(data), "--datalist", str(root / "list.json"),
        "--segmenter_kind", "sam", "--segmenter_path", str(root / "sam"),
        "--text_encoder_dir", str(root / "bert"), "--embedding_cache", str(root / "embeddings"),
        "--image_channels", "16", "--hidden", "8", "--transcriber_kind", "none",
        "--output_dir", str(root / "run"), "--num_workers", "0",
    ]  # fmt: skip
    run_bundle("logsam", ("train.yaml",), *common, "--epochs", "2", "--batch_size", "2", "--val_interval", "1")
    return root, common


def test_training_writes_checkpoints_metrics_and_caches_each_embedding_once(setup):
    root, _ = setup
    run = root / "run"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "config.yaml").is_file()
    epochs = read_jsonl(run / "metrics" / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"val_class_accuracy", "val_box_iou", "val_recall_at_50"} <= set(epochs[-1])
    assert len(list((root / "embeddings").rglob("*.pt"))) == 9  # training + validation images, one file each


def test_evaluation_table_and_case_files(setup):
    root, common = setup
    run_bundle("logsam", ("train.yaml", "evaluate.yaml"), *common, "--n_boot", "20")
    folder = root / "run" / "evaluation" / "list_test"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cases"] == 3
    assert summary["measures"]["dictation_class_accuracy"]["value"] == 1.0  # the prompts are typed, not spoken
    assert summary["measures"]["no_mask_when_no_tumour_dictated"]["value"] == 1.0
    assert {"box_iou", "dice_predicted_box", "dice_true_box", "dice_filled_box"} <= set(summary["measures"])
    assert len(list((folder / "cases").glob("*_overlay.png"))) == 3
    assert len(list((root / "embeddings").rglob("*.pt"))) == 12  # the test images added to the cache


def test_inference_of_one_command_line_case(setup):
    root, common = setup
    image = root / "data" / "s10.png"
    out = root / "predictions"
    run_bundle(
        "logsam",
        ("train.yaml", "inference.yaml"),
        *common,
        "--infer_image", str(image), "--infer_report", "Der Befund ist vereinbar mit einem Meningeom.",
        "--language", "de", "--prediction_dir", str(out),
    )  # fmt: skip
    record = json.loads((out / "s10.json").read_text())
    assert record["class"] == "meningioma" and record["language"] == "de"
    assert record["outcome"] in ("mask", "no_box") and (out / "s10_mask.nii.gz").is_file()


def test_bad_entry_fails_before_the_encoder(setup, tmp_path):
    root, common = setup
    lists = json.loads((root / "list.json").read_text())
    lists["training"][1]["class"] = "astrocytoma"
    (tmp_path / "bad.json").write_text(json.dumps(lists))
    options = [*common, "--embedding_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
    proc = run_bundle("logsam", ("train.yaml",), *options, "--datalist", str(tmp_path / "bad.json"), check=False)
    assert proc.returncode != 0 and "astrocytoma" in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()


def test_grounding_dino_lora_trains_and_serves_the_pipeline(setup, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("scipy")
    from dae.logsam.grounding_dino import tiny_grounding_dino

    _, common = setup
    model, processor = tiny_grounding_dino()
    model.save_pretrained(tmp_path / "gdino")
    processor.save_pretrained(tmp_path / "gdino")
    options = [
        *common, "--output_dir", str(tmp_path / "run"), "--grounding_dino_dir", str(tmp_path / "gdino"),
        "--lora_rank", "4", "--lora_alpha", "4", "--batch_size", "2", "--warmup_epochs", "0",
    ]  # fmt: skip
    configs = ("train.yaml", "train_grounding_dino.yaml")
    run_bundle("logsam", configs, *options, "--epochs", "1")
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["model"] and all("lora_" in k or "modules_to_save" in k for k in state["model"])
    run_bundle("logsam", (*configs, "evaluate.yaml"), *options, "--n_boot", "10", "--min_score", "1.0")
    summary = json.loads((tmp_path / "run" / "evaluation" / "list_test" / "summary.json").read_text())
    # min_score 1 turns every detection into "no box": no mask from any dictation, recall 0.
    assert summary["measures"]["recall_iou50"]["value"] == 0.0
    assert summary["measures"]["dice_end_to_end"]["value"] == 0.0
