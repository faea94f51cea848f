"""LoRA on Hugging Face Grounding DINO: LoGSAM's targets, trainable parameters, merging, adapter files, export."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("scipy")  # the Hungarian matcher of the loss

from dae.logsam.grounding_dino import load_grounding_dino, tiny_grounding_dino
from dae.logsam.grounding_training import configure_logsam_loss, logsam_loss
from dae.logsam.lora import (
    LOGSAM_LORA_TARGETS,
    adapter_state_dict,
    apply_lora,
    export_merged,
    is_adapter_key,
    load_adapter_state_dict,
    lora_module_names,
    merge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "meningioma . glioma . pituitary tumour ."
LABELS = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.45, 0.45, 0.3]])}]

# LoGSAM's target set on the tiny model (1 encoder layer, 2 decoder layers, 1 text layer), text_projection included.
EXPECTED_MODULES = [
    "model.text_backbone.encoder.layer.0.attention.output.dense",
    "model.text_backbone.encoder.layer.0.intermediate.dense",
    "model.text_backbone.encoder.layer.0.output.dense",
    "model.text_projection",
    "model.encoder.layers.0.text_enhancer_layer.self_attn.out_proj",
    "model.encoder.layers.0.text_enhancer_layer.fc1",
    "model.encoder.layers.0.text_enhancer_layer.fc2",
    "model.encoder.layers.0.deformable_layer.self_attn.sampling_offsets",
    "model.encoder.layers.0.deformable_layer.self_attn.attention_weights",
    "model.encoder.layers.0.deformable_layer.self_attn.value_proj",
    "model.encoder.layers.0.deformable_layer.self_attn.output_proj",
    "model.encoder.layers.0.deformable_layer.fc1",
    "model.encoder.layers.0.deformable_layer.fc2",
    *[
        f"model.decoder.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "self_attn.out_proj",
            "encoder_attn_text.out_proj",
            "encoder_attn.sampling_offsets",
            "encoder_attn.attention_weights",
            "encoder_attn.value_proj",
            "encoder_attn.output_proj",
            "fc1",
            "fc2",
        )
    ],
    # The box head shared by all decoder layers; its first name in module order is the decoder's.
    "model.decoder.bbox_embed.0.layers.0",
    "model.decoder.bbox_embed.0.layers.1",
]


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 80, (64, 64, 3)).astype(np.uint8)
    rows, cols = np.mgrid[:64, :64]
    image[((rows - 29) / 10) ** 2 + ((cols - 26) / 14) ** 2 <= 1] = 255
    return image


def _wrapped(rank: int = 8):
    model, processor = tiny_grounding_dino()
    configure_logsam_loss(model.config)
    torch.manual_seed(0)
    return apply_lora(model, rank=rank, alpha=rank), processor


def _train(peft_model, inputs, steps: int) -> None:
    """A few steps so that the LoRA B matrices (zero at start) and the saved box layer move."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = logsam_loss(peft_model(**inputs, labels=LABELS).loss_dict)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


@pytest.fixture(scope="module")
def trained():
    peft_model, processor = _wrapped()
    inputs = processor(images=_image(), text=CAPTION, return_tensors="pt")
    _train(peft_model, inputs, steps=3)
    return peft_model, processor, inputs


def _outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    # Logits beyond the caption are -inf by construction.
    return out.pred_boxes, out.logits[..., : inputs["input_ids"].shape[1]]


def test_lora_wraps_exactly_logsams_modules_with_text_projection() -> None:
    peft_model, _ = _wrapped()
    assert lora_module_names(peft_model) == EXPECTED_MODULES


def test_text_targets_are_the_last_four_layers_of_any_depth() -> None:
    regex = LOGSAM_LORA_TARGETS.regex(num_text_layers=12)
    for layer in range(12):
        for module in ("attention.output.dense", "intermediate.dense", "output.dense"):
            name = f"model.text_backbone.encoder.layer.{layer}.{module}"
            assert bool(re.fullmatch(regex, name)) == (layer >= 8), name
    assert not re.fullmatch(regex, "model.text_backbone.encoder.layer.11.attention.self.query")
    assert re.fullmatch(LOGSAM_LORA_TARGETS.regex(6), "model.text_backbone.encoder.layer.2.output.dense")
    assert not re.fullmatch(LOGSAM_LORA_TARGETS.regex(6), "model.text_backbone.encoder.layer.1.output.dense")


def test_only_adapter_parameters_train_and_all_of_them_get_gradients() -> None:
    peft_model, processor = _wrapped()
    inputs = processor(images=_image(), text=CAPTION, return_tensors="pt")
    # At the start the box head's last layer and every LoRA B are 0, which blocks the gradients of the box head's
    # first layers and of every A: two steps move them.
    _train(peft_model, inputs, steps=2)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(name) for name in trainable)
    assert any("text_projection.lora_A" in name for name in trainable)
    assert any("bbox_embed.0.layers.2.modules_to_save" in name for name in trainable)
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    logsam_loss(peft_model(**inputs, labels=LABELS).loss_dict)["loss"].backward()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            # The box head's LoRA reaches the last decoder layer's boxes only because the head is shared.
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_merged_model_computes_what_the_adapted_model_computes(trained) -> None:
    peft_model, _, inputs = trained
    boxes, logits = _outputs(peft_model, inputs)
    merged = merge_lora(copy.deepcopy(peft_model))
    assert type(merged).__name__ == "GroundingDinoForObjectDetection"
    assert not any(is_adapter_key(name) for name, _ in merged.named_parameters())
    merged_boxes, merged_logits = _outputs(merged, inputs)
    torch.testing.assert_close(merged_boxes, boxes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-4)


def test_adapter_round_trip_through_a_file(trained, tmp_path: Path) -> None:
    peft_model, _, inputs = trained
    state = adapter_state_dict(peft_model)
    assert state and all(is_adapter_key(key) for key in state)
    torch.save(state, tmp_path / "adapter.pt")
    fresh, _ = _wrapped()
    report = load_adapter_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert sorted(report.loaded) == sorted(state)
    fresh.eval()
    for ours, theirs in zip(_outputs(fresh, inputs), _outputs(peft_model, inputs)):
        assert torch.equal(ours, theirs)


def test_adapter_loading_is_strict() -> None:
    peft_model, _ = _wrapped()
    state = adapter_state_dict(peft_model)
    first = next(iter(state))
    with pytest.raises(ValueError, match=r"missing 1.*\n.*missing: " + re.escape(first)):
        load_adapter_state_dict(peft_model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=r"unexpected: extra\.lora_A\.weight"):
        load_adapter_state_dict(peft_model, {**state, "extra.lora_A.weight": torch.zeros(1)})
    other_rank, _ = _wrapped(rank=4)
    with pytest.raises(ValueError, match="shape-mismatched"):
        load_adapter_state_dict(other_rank, state)


def test_export_writes_a_folder_that_load_grounding_dino_reads(trained, tmp_path: Path) -> None:
    peft_model, processor, inputs = trained
    expected = _outputs(peft_model, inputs)
    folder = export_merged(peft_model, tmp_path / "merged", processor)
    assert lora_module_names(peft_model) == EXPECTED_MODULES  # the export merged a copy
    model, loaded_processor = load_grounding_dino(folder)
    assert type(loaded_processor.image_processor).__name__ == "GroundingDinoImageProcessorPil"
    again = loaded_processor(images=_image(), text=CAPTION, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"])
    for ours, theirs in zip(_outputs(model, again), expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_load_grounding_dino_names_the_folder_and_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grounding_dino(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))} lacks weights .*tokenizer"):
        load_grounding_dino(tmp_path)
