"""LoRA for Hugging Face Grounding DINO with LoGSAM's target set, adapter checkpoints and the merged export.

LoGSAM adapted the IDEA Grounding DINO with ``peft`` LoRA (r = alpha, no bias, the box head's last layer trained
in full). :data:`LOGSAM_LORA_TARGETS` names the same modules in ``GroundingDinoForObjectDetection`` (all layers
of each kind):

- encoder deformable attention ``self_attn.{sampling_offsets, attention_weights, value_proj, output_proj}`` and
  ``linear1/2``: ``model.encoder.layers.N.deformable_layer.self_attn.{same}`` and ``deformable_layer.fc1/fc2``;
- text-enhancer ``self_attn.out_proj`` and ``linear1/2``:
  ``model.encoder.layers.N.text_enhancer_layer.self_attn.out_proj`` and ``fc1/fc2``;
- decoder ``cross_attn.{the four above}`` and ``ca_text.out_proj``: ``model.decoder.layers.N.encoder_attn.{same}``
  and ``encoder_attn_text.out_proj``;
- decoder ``self_attn.out_proj`` and ``linear1/2``: ``model.decoder.layers.N.self_attn.out_proj`` and ``fc1/fc2``;
- ``bbox_embed.0.layers.{0, 1}``, with ``bbox_embed.0.layers.2`` trained in full: the same names (see the box
  head below);
- BERT layers 8-11 ``attention.output.dense``, ``intermediate.dense``, ``output.dense``:
  ``model.text_backbone.encoder.layer.{last 4}.{same}``;
- ``feat_map``, the BERT-to-transformer projection, which the reference meant to adapt but lost to a missing comma
  (``"feat_map" "encoder.layers.0.linear1"`` became one name): ``model.text_projection``, adapted here.

Not adapted, as in the reference: the Swin backbone, BERT's other layers and every attention's query/key/value,
and the image-text fusion layers. The reference's BERT targets were layers 8-11 of the 12-layer bert-base; here
they are "the last 4 text layers" of whatever depth the model's text encoder has (all of them when it has 4 or
fewer, as the tiny test model's single layer), resolved by :meth:`LoraTargets.regex`.

The box head: the reference shares one box MLP between all decoder layers (and the decoder's box refinement) by
object identity, so one LoRA on ``bbox_embed.0`` adapts every box prediction. Hugging Face ties the parameters of
``bbox_embed.N`` and ``model.decoder.bbox_embed.N`` but keeps separate module objects, so a LoRA on
``bbox_embed.0`` would only change the first decoder layer's boxes, which no loss reads: its weights would get no
gradient. :func:`apply_lora` therefore makes every box-head slot hold the one shared module first (the same
weights, so the model computes the same), as the reference's model does.

``peft`` is imported inside the functions, so importing this module does not need the ``logsam`` extra.
"""

from __future__ import annotations

import copy
import logging
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dae.utils.state_dict import LoadReport

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

__all__ = [
    "LOGSAM_LORA_TARGETS",
    "LoraTargets",
    "adapter_state_dict",
    "apply_lora",
    "export_merged",
    "is_adapter_key",
    "load_adapter_state_dict",
    "lora_module_names",
    "merge_lora",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'pip install -e ".[logsam]"'
_ADAPTER_MARKERS = (".lora_", ".modules_to_save.")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraTargets:
    """LoRA target modules as regular expressions over Hugging Face module names (each must match a whole name).

    Attributes:
        patterns: expressions for the modules adapted in every layer of their kind.
        text_layer_modules: expressions, relative to one text-encoder (BERT) layer, of the modules adapted in
            the last ``last_text_layers`` layers.
        last_text_layers: how many of the text encoder's last layers get ``text_layer_modules``.
    """

    patterns: tuple[str, ...]
    text_layer_modules: tuple[str, ...] = ()
    last_text_layers: int = 0

    def expressions(self, num_text_layers: int) -> list[str]:
        """``patterns`` plus one expression for the last text layers' modules.

        Args:
            num_text_layers: the depth of the model's text encoder (``config.text_config.num_hidden_layers``).
        """
        expressions = list(self.patterns)
        first = max(num_text_layers - self.last_text_layers, 0)
        if self.text_layer_modules and first < num_text_layers:
            layers = "|".join(str(i) for i in range(first, num_text_layers))
            modules = "|".join(self.text_layer_modules)
            expressions.append(rf"model\.text_backbone\.encoder\.layer\.({layers})\.({modules})")
        return expressions

    def regex(self, num_text_layers: int) -> str:
        """One expression for ``peft``'s ``target_modules``: any of :meth:`expressions`."""
        return "|".join(f"(?:{e})" for e in self.expressions(num_text_layers))


_DEFORMABLE = r"(sampling_offsets|attention_weights|value_proj|output_proj)"

#: LoGSAM's LoRA targets in Hugging Face names (see the module docstring), plus ``model.text_projection``.
LOGSAM_LORA_TARGETS = LoraTargets(
    patterns=(
        rf"model\.encoder\.layers\.\d+\.deformable_layer\.(self_attn\.{_DEFORMABLE}|fc1|fc2)",
        r"model\.encoder\.layers\.\d+\.text_enhancer_layer\.(self_attn\.out_proj|fc1|fc2)",
        rf"model\.decoder\.layers\.\d+\.(encoder_attn\.{_DEFORMABLE}|encoder_attn_text\.out_proj)",
        r"model\.decoder\.layers\.\d+\.(self_attn\.out_proj|fc1|fc2)",
        # The shared box head's first occurrence in module order is the decoder's copy (see _share_box_head).
        r"(model\.decoder\.)?bbox_embed\.0\.layers\.[01]",
        r"model\.text_projection",
    ),
    text_layer_modules=(r"attention\.output\.dense", r"intermediate\.dense", r"output\.dense"),
    last_text_layers=4,
)


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"LoRA needs the peft package: {_INSTALL_HINT}") from err
    return peft


def _expose_text_embeddings(model: GroundingDinoForObjectDetection) -> None:
    """Let ``peft`` find the input embeddings (BERT's word embeddings), which ``GroundingDinoModel`` does not report.

    ``peft`` asks for them to check for weights tied to the embeddings; without this it raises
    ``NotImplementedError: get_input_embeddings not auto-handled for GroundingDinoModel``.
    """
    inner = model.model
    inner.get_input_embeddings = types.MethodType(lambda self: self.text_backbone.embeddings.word_embeddings, inner)


def _share_box_head(model: GroundingDinoForObjectDetection) -> None:
    """Make every decoder box-head slot hold ``bbox_embed[0]`` itself (same weights; see the module docstring)."""
    if not model.config.decoder_bbox_embed_share:
        raise ValueError(
            "LoGSAM's LoRA adapts one box head shared by all decoder layers, but this model's config has "
            "decoder_bbox_embed_share=False"
        )
    head = model.bbox_embed[0]
    for heads in (model.bbox_embed, model.model.decoder.bbox_embed):
        for index in range(len(heads)):
            heads[index] = head


def _check_expressions(model: nn.Module, expressions: Sequence[str]) -> None:
    """Every expression must name some module, so that a module renamed upstream cannot drop out silently."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [e for e in expressions if not any(re.fullmatch(e, n) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA target expressions {unmatched} match no module of {type(model).__name__}")


def apply_lora(
    model: GroundingDinoForObjectDetection,
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    targets: LoraTargets | str | Sequence[str] = LOGSAM_LORA_TARGETS,
    modules_to_save: Sequence[str] = ("bbox_embed.0.layers.2",),
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (in place); only the adapters and ``modules_to_save`` stay trainable.

    The defaults are LoGSAM's published setting: r = alpha = 64 on :data:`LOGSAM_LORA_TARGETS`, the box head's
    last layer trained in full, which leaves about 95 % of the full-size model frozen. The box head is shared
    between the decoder layers first (see the module docstring).

    Args:
        model: a ``GroundingDinoForObjectDetection``.
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``).
        dropout: dropout on the LoRA branch's input.
        targets: :class:`LoraTargets` (resolved for the model's text depth and checked: every pattern must name
            a module), or what ``peft``'s ``target_modules`` takes (one regular expression, or name suffixes).
        modules_to_save: modules trained in full and saved with the adapter (name suffixes).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ValueError: when a pattern of ``targets`` names no module.
        ImportError: when ``peft`` is not installed.
    """
    peft = _peft()
    _expose_text_embeddings(model)
    _share_box_head(model)
    if isinstance(targets, LoraTargets):
        num_text_layers = model.config.text_config.num_hidden_layers
        _check_expressions(model, targets.expressions(num_text_layers))
        target_modules: str | list[str] = targets.regex(num_text_layers)
    else:
        target_modules = targets if isinstance(targets, str) else list(targets)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=target_modules,
        modules_to_save=list(modules_to_save),
    )
    wrapped = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info(
        "LoRA r=%d alpha=%g on %d modules: %d of %d parameters trainable (%.2f %%)",
        rank,
        alpha,
        len(lora_module_names(wrapped)),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return wrapped


def lora_module_names(peft_model: PeftModel) -> list[str]:
    """Names of the modules that carry a LoRA adapter, as in the base model (``model.text_projection``, ...)."""
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix(_PEFT_PREFIX) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to the adapter (LoRA weights or a ``modules_to_save`` copy)."""
    return any(marker in key for marker in _ADAPTER_MARKERS)


def adapter_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: the LoRA matrices and the ``modules_to_save`` copies, keyed like the model.

    A tensor shared by several modules (the box head) appears once, under its first name. The tensors are the
    model's own (detached, not copied).
    """
    return {name: p.detach() for name, p in peft_model.named_parameters() if is_adapter_key(name)}


def load_adapter_state_dict(
    peft_model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "adapter"
) -> LoadReport:
    """Load an :func:`adapter_state_dict` into a model wrapped the same way; every key must match.

    Args:
        peft_model: the model from :func:`apply_lora` with the same targets, rank and base architecture.
        state_dict: the adapter tensors.
        name: what is loaded, for messages (e.g. the checkpoint path).

    Returns:
        The :class:`~dae.utils.state_dict.LoadReport` (everything loaded).

    Raises:
        ValueError: when keys are missing, unexpected or of another shape, listing them; nothing is loaded then.
    """
    own = adapter_state_dict(peft_model)
    report = LoadReport(name=name)
    report.missing = [k for k in own if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in own]
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    if report.missing or report.unexpected or report.mismatched:
        raise ValueError(
            f"{name} does not fit this model's adapter (same targets, rank and base model?)\n{report.summary()}"
        )
    with torch.no_grad():
        for key, value in state_dict.items():
            own[key].copy_(value)
    report.loaded = list(state_dict)
    logger.info(report.summary())
    return report


def merge_lora(peft_model: PeftModel) -> GroundingDinoForObjectDetection:
    """Fold the adapters into the base weights and return the plain ``GroundingDinoForObjectDetection``.

    ``peft_model`` is consumed: its base model is modified in place (copy it first to keep training it).
    """
    return peft_model.merge_and_unload()


def export_merged(peft_model: PeftModel, out_dir: str | Path, processor: GroundingDinoProcessor) -> Path:
    """Write the merged model and its processor as a plain Hugging Face folder that :func:`load_grounding_dino` reads.

    A copy is merged, so ``peft_model`` stays as it is (e.g. to go on training).

    Args:
        peft_model: the model from :func:`apply_lora`.
        out_dir: the folder (created; files of the same names are replaced).
        processor: the model's processor.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(copy.deepcopy(peft_model))
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("merged Grounding DINO written to %s", out)
    return out
