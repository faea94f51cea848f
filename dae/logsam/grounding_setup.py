"""Grounding DINO for the bundle: LoRA-wrapped for training, and the trained adapter merged for the pipeline.

The base model is read from a local Hugging Face folder (e.g. a converted grounding-dino-tiny); the adapter
checkpoints of :class:`~dae.logsam.grounding_training.GroundingDinoTrainer` hold the LoRA and box-head weights only,
so the pipeline rebuilds the same wrapping, loads them strictly and merges them into the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dae.logsam.classes import ClassTable
from dae.logsam.grounding_dino import GroundingDinoDetector, load_grounding_dino
from dae.logsam.grounding_training import configure_logsam_loss
from dae.logsam.lora import apply_lora, load_adapter_state_dict, merge_lora
from dae.utils.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["grounding_dino_detector", "lora_grounding_dino"]


def lora_grounding_dino(
    model_dir: str | Path,
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[PeftModel, Any]:
    """The base model of ``model_dir`` with the reference's loss weights and LoRA (:func:`~dae.logsam.lora.apply_lora`).

    ``seed`` seeds the adapters' initialisation (peft draws it from torch's global generator).

    Returns:
        ``(peft_model, processor)``.
    """
    model, processor = load_grounding_dino(model_dir, device=device)
    configure_logsam_loss(model.config)
    torch.manual_seed(seed)
    return apply_lora(model, rank=rank, alpha=alpha, dropout=dropout).to(device), processor


def grounding_dino_detector(
    model_dir: str | Path,
    checkpoint: str | Path,
    table: ClassTable,
    rank: int = 64,
    alpha: float = 64,
    box_threshold: float = 0.25,
    text_threshold: float = 0.25,
    min_score: float = 0.0,
    all_classes: bool = False,
    device: str | torch.device = "cpu",
) -> GroundingDinoDetector:
    """The detector of a LoRA run: base model + the adapter of ``checkpoint`` (loaded strictly), merged.

    Args:
        model_dir: the base model's folder (the one the run trained on).
        checkpoint: the run's ``best.pt`` / ``latest.pt`` (adapter under ``model``).
        table: the class table (captions).
        rank: the run's LoRA rank.
        alpha: the run's LoRA alpha.
        box_threshold: see :class:`~dae.logsam.grounding_dino.GroundingDinoDetector`.
        text_threshold: see there.
        min_score: see there.
        all_classes: caption every class, as the reference did.
        device: where to run.

    Raises:
        CheckpointError: when the checkpoint is missing or unreadable.
        ValueError: when its adapter does not fit (other targets, rank or base model), listing the keys.
    """
    peft_model, processor = lora_grounding_dino(model_dir, rank=rank, alpha=alpha, device=device)
    state = load_checkpoint(checkpoint)
    load_adapter_state_dict(peft_model, state.get("model", state), name=str(checkpoint))
    return GroundingDinoDetector(
        merge_lora(peft_model).eval(),
        processor,
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        min_score=min_score,
        classes=table,
        all_classes=all_classes,
    )
