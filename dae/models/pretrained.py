"""Initialise a stock MONAI ``SwinUNETR`` from a Swin UNETR pretraining checkpoint, with a report.

Four checkpoint formats are understood (``fmt``):

``"dae"``
    Ours: ``{"model": DisruptiveAutoencoder.state_dict(), ...}`` with keys ``backbone.<stock key>`` and
    ``projection.*`` (the contrastive projection head, dropped).
``"swinunetr"``
    A plain ``SwinUNETR`` state dict (stock key names), bare or under ``"model"`` / ``"state_dict"``.
``"monai_ssl"``
    SwinUNETR/Pretrain ``model_swinvit.pt``: ``{"state_dict": ...}`` holding the Swin encoder under
    ``swinViT.``, ``swin_vit.`` or no prefix, plus the SSL heads ``rotation_head.*``,
    ``contrastive_head.*`` and ``conv.*`` (the reconstruction decoder), which are dropped.
``"official_dae"``
    Project-MONAI/research-contributions DAE ``ckpt_best.pth["model"]`` and the MONAI-team
    ``ssl_pretrained_weights.pth`` (same layout with a MONAI linear patch embedding):
    ``encoder.layers{N}.0.0.*`` becomes ``swinViT.layers{N}.0.*`` with ``mlp.fc1/fc2`` renamed
    ``mlp.linear1/linear2``, ``encoder.patch_embed.*`` becomes ``swinViT.patch_embed.*`` when the target
    has that key, and the decoder keys (``encoder1..4``, ``encoder10``, ``decoder1..5``) keep their names.
    Not transferable: the official conv-block patch embedding (a ``UnetBasicBlock`` with 3x3x3 convs and
    instance norms; MONAI's is a single 2x2x2 stride-2 conv with bias), ``encoder.mask_token``,
    ``encoder.norm.*``, and the ``conv3``/``norm3`` of ``encoder2/3/4/10`` (MONAI 0.8 created a 1x1
    residual conv even for same-width blocks). Loading such a checkpoint therefore leaves
    ``swinViT.patch_embed.*`` at its initial values, which the report lists.

The output layer ``out.*`` is never transferred (the fine-tuning network has another class count).
Every checkpoint key that is not loaded is listed in the report with the reason.

Semantic caveats for official DAE weights, which a key mapping cannot fix:

* The official ``PatchMerging`` concatenates the sub-voxels (0,1,0) and (0,0,1) twice and never uses
  (1,1,0) and (0,1,1) (the same bug MONAI's ``"merging"`` had up to 1.4). MONAI >= 1.5 uses all eight, so
  the transferred ``downsample.reduction`` weights see two of their eight input slices in a different
  order than in pretraining.
* Official pretraining did not layer-normalise the hidden states passed to the decoder, whereas
  ``SwinUNETR(normalize=True)`` does, so transferred decoder weights see differently scaled inputs.

:func:`load_model_weights` loads a fine-tuned checkpoint of the same network completely (for evaluation and
inference), refusing a partial match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from dae.utils.checkpoint import load_checkpoint
from dae.utils.state_dict import LoadReport, head_keys, load_state_dict_with_report, strip_prefix

__all__ = [
    "FORMATS",
    "PARTS",
    "PretrainedLoadReport",
    "init_from_pretrained",
    "load_model_weights",
    "load_pretrained_swinunetr",
]

logger = logging.getLogger(__name__)

FORMATS = ("dae", "swinunetr", "monai_ssl", "official_dae")
PARTS = {
    "encoder": ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10."),
    "decoder": ("decoder1.", "decoder2.", "decoder3.", "decoder4.", "decoder5."),
}
PARTS["both"] = PARTS["encoder"] + PARTS["decoder"]

_SSL_HEADS = ("rotation_head.", "contrastive_head.", "conv.")
_SWIN_MODULES = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")
_OFFICIAL_LAYER = re.compile(r"^encoder\.(layers\d+)\.0\.0\.(.*)$")
_LEGACY_CONV3 = re.compile(r"^encoder(2|3|4|10)\.layer\.(conv3|norm3)\.")

# A converter maps one checkpoint key (``module.`` stripped) to a target key, or to ``None`` and a reason.
_Converted = tuple[str, None] | tuple[None, str]


@dataclass
class PretrainedLoadReport(LoadReport):
    """What :func:`load_pretrained_swinunetr` did.

    Inherits the :class:`~dae.utils.state_dict.LoadReport` fields, with ``missing`` restricted to the
    target keys of the requested ``parts`` that stayed at their initial values (keys outside ``parts``
    are not missing), and ``unexpected`` / ``mismatched`` under target key names.

    Attributes:
        fmt: checkpoint format used (detected when ``fmt="auto"``).
        parts: the requested parts.
        skipped: ``(checkpoint key, reason)`` for every checkpoint key deliberately not loaded.
    """

    fmt: str = ""
    parts: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """The :class:`LoadReport` summary followed by the skipped keys grouped by reason."""
        counts, *details = super().summary().split("\n")
        lines = [f"[fmt={self.fmt}, parts={self.parts}] {counts}, skipped {len(self.skipped)}", *details]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.skipped:
            by_reason.setdefault(reason, []).append(key)
        lines += [f"  skipped ({reason}): {head_keys(keys)}" for reason, keys in by_reason.items()]
        return "\n".join(lines)


def _stock(key: str, target: Mapping[str, torch.Tensor]) -> _Converted:
    if key.startswith("projection."):
        return None, "DAE projection head (pretraining only)"
    return key, None


def _monai_ssl(key: str, target: Mapping[str, torch.Tensor]) -> _Converted:
    if key.startswith(_SSL_HEADS):
        return None, "SwinUNETR/Pretrain SSL head (rotation, contrastive or reconstruction), not in SwinUNETR"
    if key.startswith("swin_vit."):
        return "swinViT." + key.removeprefix("swin_vit."), None
    if key.startswith(_SWIN_MODULES):
        return "swinViT." + key, None
    return key, None


def _official_dae(key: str, target: Mapping[str, torch.Tensor]) -> _Converted:
    if key == "encoder.mask_token":
        return None, "SimMIM mask token, unused by SwinUNETR"
    if key.startswith("encoder.norm."):
        return None, "final LayerNorm of the pretraining encoder, SwinUNETR has none"
    if key.startswith("encoder.patch_embed."):
        new_key = "swinViT." + key.removeprefix("encoder.")
        if new_key in target:
            return new_key, None
        return None, (
            "official conv-block patch embedding (3x3x3 UnetBasicBlock) has no counterpart in MONAI's "
            "2x2x2 stride-2 patch embedding"
        )
    if match := _OFFICIAL_LAYER.match(key):
        rest = match.group(2).replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        return f"swinViT.{match.group(1)}.0.{rest}", None
    if _LEGACY_CONV3.match(key) and key not in target:
        return None, "MONAI 0.8 residual conv3/norm3 of a same-width block, not created by MONAI >= 0.9"
    return key, None


_CONVERTERS: dict[str, Callable[[str, Mapping[str, torch.Tensor]], _Converted]] = {
    "dae": _stock,
    "swinunetr": _stock,
    "monai_ssl": _monai_ssl,
    "official_dae": _official_dae,
}


def _extract_state_dict(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint``: its ``"model"`` or ``"state_dict"`` entry, else the dict itself."""
    state = next((checkpoint[k] for k in ("model", "state_dict") if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint {path} has no 'model' or 'state_dict' entry and is not a state dict "
            f"(non-tensor entries: {head_keys(bad)})"
        )
    return dict(state)


def _detect_format(keys: list[str], path: Path) -> str:
    """Guess the checkpoint format from its keys (``module.`` already stripped)."""
    if any(k.startswith(("backbone.", "projection.")) for k in keys):
        return "dae"
    if any(k.startswith(("encoder.layers", "encoder.patch_embed.")) for k in keys):
        return "official_dae"
    if any(k.startswith(("swin_vit.", *_SSL_HEADS, *_SWIN_MODULES)) for k in keys):
        return "monai_ssl"
    if any(k.startswith("swinViT.") for k in keys):
        return "swinunetr"
    raise ValueError(
        f"cannot tell the format of checkpoint {path}; pass fmt= one of {FORMATS}. Keys: {head_keys(keys)}"
    )


def _part_of(key: str) -> str | None:
    """``"encoder"``, ``"decoder"``, ``"out"`` or ``None`` for a target (stock ``SwinUNETR``) key."""
    if key.startswith("out."):
        return "out"
    return next((part for part in ("encoder", "decoder") if key.startswith(PARTS[part])), None)


def load_pretrained_swinunetr(
    model: SwinUNETR,
    path: str | Path,
    *,
    fmt: str = "auto",
    parts: str = "encoder",
    name: str | None = None,
) -> PretrainedLoadReport:
    """Copy the pretrained weights of ``parts`` from the checkpoint at ``path`` into ``model``.

    See the module docstring for the formats and what maps. Checkpoint keys belonging to other parts,
    the output layer and untransferable keys are listed in ``skipped``; keys the model does not have
    after mapping are ``unexpected``. The summary is logged at INFO.

    Args:
        model: a stock MONAI ``SwinUNETR`` (``use_v2`` or not, matching the checkpoint's configuration).
        path: checkpoint file, loaded with ``weights_only=True``.
        fmt: ``"auto"`` or one of :data:`FORMATS`.
        parts: ``"encoder"`` (``swinViT`` and ``encoder1..4``, ``encoder10``), ``"decoder"``
            (``decoder1..5``) or ``"both"``; ``out.*`` is never loaded.
        name: what is being loaded, for messages; defaults to the path.

    Returns:
        The :class:`PretrainedLoadReport`.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the file cannot be read (truncated, not a checkpoint, unsafe objects), naming it.
        ValueError: for an unknown ``fmt`` or ``parts``, an undetectable format, when nothing of
            ``parts`` is in the checkpoint or no key matches the model, or on shape mismatches.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected 'auto' or one of {FORMATS}")
    if parts not in PARTS:
        raise ValueError(f"unknown parts {parts!r}; expected one of {tuple(PARTS)}")
    path = Path(path)
    name = name or str(path)
    state = strip_prefix(_extract_state_dict(load_checkpoint(path), path), ("module.",))
    if fmt == "auto":
        fmt = _detect_format(list(state), path)
    if fmt == "dae":
        state = strip_prefix(state, ("backbone.",))

    target = model.state_dict()
    convert = _CONVERTERS[fmt]
    mapped: dict[str, torch.Tensor] = {}
    skipped: list[tuple[str, str]] = []
    for key, value in state.items():
        new_key, reason = convert(key, target)
        if new_key is not None:
            part = _part_of(new_key)
            if part == "out":
                reason = "output layer, never transferred (the class count differs)"
            elif part is not None and not new_key.startswith(PARTS[parts]):
                reason = f"{part} weights, not requested (parts={parts!r})"
        if reason is None:
            mapped[new_key] = value
        else:
            skipped.append((key, reason))
    if not mapped:
        raise ValueError(
            f"nothing to load from {name} (fmt={fmt!r}, parts={parts!r}): all {len(skipped)} keys skipped, "
            f"e.g. {head_keys([f'{k} ({r})' for k, r in skipped])}"
        )

    base = load_state_dict_with_report(model, mapped, name=name)
    report = PretrainedLoadReport(
        **{f.name: getattr(base, f.name) for f in fields(LoadReport)}, fmt=fmt, parts=parts, skipped=skipped
    )
    report.missing = [key for key in base.missing if key.startswith(PARTS[parts])]
    logger.info(report.summary())
    return report


def init_from_pretrained(
    model: SwinUNETR, path: str | Path | None, *, fmt: str = "auto", parts: str = "encoder"
) -> SwinUNETR:
    """Return ``model`` initialised from the pretraining checkpoint ``path``, or as it is when ``path`` is None.

    The form used by the fine-tuning bundles (``network: $dae.models.init_from_pretrained(@network_def, ...)``);
    see :func:`load_pretrained_swinunetr` for the formats, the parts and the report.
    """
    if path is None:
        logger.info("no pretrained checkpoint given: training %s from scratch", type(model).__name__)
        return model
    load_pretrained_swinunetr(model, path, fmt=fmt, parts=parts)
    return model


def load_model_weights(network: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a fine-tuned checkpoint (``{"model": state_dict}`` or a bare state dict) completely into ``network``.

    Raises:
        CheckpointError: when the file is missing or cannot be read, naming it.
        ValueError: when keys are missing, unexpected or of another shape (a checkpoint of another network).
    """
    state = load_checkpoint(checkpoint)
    weights = state.get("model", state)
    report = load_state_dict_with_report(network, weights, name=str(checkpoint))
    if report.missing or report.unexpected:
        raise ValueError(f"{checkpoint} does not match the network: {report.summary()}")
    return network
