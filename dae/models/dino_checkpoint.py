"""Reading DINO, DAX and our own DINO checkpoints into our backbones and multi-crop wrappers.

Understood layouts (the state dicts of the student and the teacher are ``MultiCropWrapper.state_dict()``s):

Ours (written by the DINO trainer)
    ``{"student", "teacher", "optimizer", "epoch", "dino_loss": {"center"}, "backbone_config": {"arch",
    "patch_size", "in_chans", "img_size"}, "args": dict, ...}`` with keys ``backbone.*``, ``head.mlp.*`` and
    ``head.last_layer.parametrizations.weight.original0`` (g) / ``original1`` (v).
facebookresearch/dino ``checkpoint.pth``
    The same top-level keys without ``backbone_config``, with ``args`` an ``argparse.Namespace``. The student was
    DDP-wrapped (``module.backbone.*``, ``module.head.*``); so was the teacher when it had BatchNorm (ResNets,
    ``use_bn_in_head``), otherwise its keys are ``backbone.*`` / ``head.*``. The last layer is stored by the old
    ``torch.nn.utils.weight_norm`` as ``head.last_layer.weight_g`` / ``weight_v``.
DAX
    Like DINO but with ``head.last_layer.parametrizations.weight.original0`` / ``original1``.
Bare backbone state dicts
    The released ``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``, etc.: backbone keys only.
DINOv2-style chunked blocks
    ``blocks.{chunk}.{i}.*`` (``BlockChunk``), renamed ``blocks.{i}.*`` (the inner index is the global one).

On reading, a leading ``module.`` (repeated) is stripped, ``weight_g`` / ``weight_v`` become
``parametrizations.weight.original0`` / ``original1`` and chunked block keys are un-chunked. On loading, a
3-channel stem (``patch_embed.proj.weight`` or ``conv1.weight``) going into a 1-channel model is summed over
its input channels (exact for a grey image repeated to 3 channels), a ``pos_embed`` for another patch grid is
resampled (bicubic, antialiased), and a plain ``last_layer.weight`` (DAX's ``pretrained=True`` head) is split
into weight-norm g (the row norms) and v (the weight), which reproduces it exactly.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dae.models.backbone2d import ARCHS, build_backbone
from dae.models.multicrop import MultiCropWrapper
from dae.utils.checkpoint import load_checkpoint
from dae.utils.state_dict import LoadReport, head_keys, load_state_dict_with_report, strip_prefix

__all__ = [
    "DinoLoadReport",
    "backbone_like",
    "load_backbone",
    "load_dino_wrapper_state",
    "normalize_dino_keys",
    "read_dino_checkpoint",
]

logger = logging.getLogger(__name__)

_WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_CHUNKED_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.(\d+)\.")
_STEMS = ("patch_embed.proj.weight", "conv1.weight")


@dataclass
class DinoLoadReport(LoadReport):
    """What a DINO checkpoint loader did.

    Inherits the :class:`~dae.utils.state_dict.LoadReport` fields (``loaded``, ``missing``, ``unexpected``,
    ``mismatched``, ``name``; keys after conversion).

    Attributes:
        skipped: checkpoint keys deliberately not loaded (the ``head.*`` keys when loading a backbone).
        converted: one ``"key: what was done"`` line per converted tensor.
    """

    skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The base summary followed by the converted and skipped keys."""
        lines = [super().summary()]
        if self.converted:
            lines.append("  converted: " + "; ".join(self.converted))
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}): {head_keys(self.skipped)}")
        return "\n".join(lines)


def _read_file(path: str | os.PathLike) -> Mapping[str, Any]:
    # DINO and DAX pickle their argparse.Namespace of arguments next to the weights.
    return load_checkpoint(path, allowed_globals=[argparse.Namespace])


def _select_state_dict(checkpoint: Mapping[str, Any], checkpoint_key: str, path: str | os.PathLike) -> Mapping:
    entry = checkpoint.get(checkpoint_key)
    if isinstance(entry, Mapping):
        return entry
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint
    raise ValueError(
        f"checkpoint {path} has no state dict under {checkpoint_key!r} and is not a bare state dict; "
        f"its top-level keys are {sorted(checkpoint)}"
    )


def normalize_dino_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DINO / DAX / DINOv2 state-dict keys to ours.

    Strips leading ``module.`` prefixes, renames ``*.weight_g`` / ``*.weight_v`` to
    ``*.parametrizations.weight.original0`` / ``original1`` and ``blocks.{chunk}.{i}.`` to ``blocks.{i}.``.

    Args:
        state_dict: checkpoint tensors.

    Returns:
        A new dict with the renamed keys (same tensors).

    Raises:
        ValueError: when two keys get the same name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_prefix(state_dict, ("module.",)).items():
        new_key = _CHUNKED_BLOCK.sub(r"\1blocks.\2.", key, count=1)
        module_name, _, leaf = new_key.rpartition(".")
        if leaf in _WEIGHT_NORM_NAMES:
            new_key = f"{module_name}.{_WEIGHT_NORM_NAMES[leaf]}" if module_name else _WEIGHT_NORM_NAMES[leaf]
        if new_key in out:
            raise ValueError(f"renaming checkpoint keys maps more than one key to {new_key!r}")
        out[new_key] = value
    return out


def read_dino_checkpoint(path: str | os.PathLike, checkpoint_key: str = "teacher") -> dict[str, torch.Tensor]:
    """Read one state dict from a DINO, DAX or our checkpoint, or a bare state dict, with our key names.

    The file is loaded with ``weights_only=True`` (only ``argparse.Namespace`` is allowed besides plain data).

    Args:
        path: the checkpoint file.
        checkpoint_key: which state dict of a full checkpoint to read (``"teacher"``, the one DINO releases and
            recommends, or ``"student"``); ignored for a bare state dict.

    Returns:
        The state dict, renamed by :func:`normalize_dino_keys`.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the file cannot be read (truncated, not a checkpoint, unsafe objects), naming it.
        ValueError: when a full checkpoint has no ``checkpoint_key`` entry (the message lists its keys).
    """
    return normalize_dino_keys(_select_state_dict(_read_file(path), checkpoint_key, path))


def _resample_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor | None:
    """``pos_embed`` [1, 1+N, D] resampled to [1, 1+num_patches, D], or None when a grid is not square."""
    old_side, new_side = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_patches)
    if old_side**2 != pos_embed.shape[1] - 1 or new_side**2 != num_patches:
        return None
    return resample_abs_pos_embed(
        pos_embed,
        new_size=[new_side, new_side],
        old_size=[old_side, old_side],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=True,
    )


def _convert_backbone(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Adapt stem channels and positional embeddings of the backbone keys under ``prefix`` in place."""
    notes = []
    for key in (prefix + stem for stem in _STEMS):
        if key not in state or key not in target:
            continue
        source, wanted = state[key], target[key]
        if (
            source.ndim == 4
            and source.shape[1] == 3
            and wanted.shape[1] == 1
            and (source.shape[0], *source.shape[2:]) == (wanted.shape[0], *wanted.shape[2:])
        ):
            state[key] = source.sum(dim=1, keepdim=True)
            notes.append(f"{key}: summed 3 input channels into 1")
    key = prefix + "pos_embed"
    if key in state and key in target and state[key].shape != target[key].shape:
        source, wanted = state[key], target[key]
        if source.ndim == 3 and source.shape[-1] == wanted.shape[-1]:
            resampled = _resample_pos_embed(source, wanted.shape[1] - 1)
            if resampled is not None:
                state[key] = resampled
                notes.append(f"{key}: resampled {tuple(source.shape)} -> {tuple(wanted.shape)}")
    return notes


def _convert_last_layer(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Turn a plain ``last_layer.weight`` into weight-norm g and v when the target is weight-normalised."""
    key = prefix + "last_layer.weight"
    g_key = prefix + "last_layer." + _WEIGHT_NORM_NAMES["weight_g"]
    v_key = prefix + "last_layer." + _WEIGHT_NORM_NAMES["weight_v"]
    if key not in state or key in target or g_key not in target or g_key in state:
        return []
    weight = state.pop(key)
    state[g_key] = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    state[v_key] = weight
    return [f"{key}: split into weight-norm g (row norms) and v"]


def _extend(base: LoadReport, **extras: list[str]) -> DinoLoadReport:
    return DinoLoadReport(**{f.name: getattr(base, f.name) for f in fields(base)}, **extras)


def _first_given(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _weight_shape(state: Mapping[str, torch.Tensor], key: str, dim: int) -> int | None:
    tensor = state.get(key)
    return int(tensor.shape[dim]) if isinstance(tensor, torch.Tensor) and tensor.ndim == 4 else None


def _backbone_for(
    path: str | os.PathLike,
    arch: str | None,
    patch_size: int | None,
    in_chans: int | None,
    img_size: int | None,
    checkpoint_key: str,
) -> tuple[nn.Module, dict[str, torch.Tensor], list[str]]:
    """The backbone a checkpoint holds, as :func:`load_backbone` resolves it (not loaded), its backbone state
    dict and the skipped keys."""
    checkpoint = _read_file(path)
    state = normalize_dino_keys(_select_state_dict(checkpoint, checkpoint_key, path))
    if any(key.startswith("backbone.") for key in state):
        skipped = [key for key in state if not key.startswith("backbone.")]
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    else:
        skipped = [key for key in state if key.startswith("head.")]
        state = {key: value for key, value in state.items() if not key.startswith("head.")}

    config = checkpoint.get("backbone_config")
    config = config if isinstance(config, Mapping) else {}
    arch = _first_given(arch, config.get("arch"))
    if arch is None:
        raise ValueError(
            f"checkpoint {path} does not record its backbone (no 'backbone_config'); pass arch=, one of {ARCHS}"
        )
    patch_size = _first_given(patch_size, config.get("patch_size"), _weight_shape(state, "patch_embed.proj.weight", -1))
    grid = state.get("pos_embed")
    stored_side = math.isqrt(grid.shape[1] - 1) if isinstance(grid, torch.Tensor) and grid.ndim == 3 else None
    model = build_backbone(
        arch,
        patch_size=patch_size,
        in_chans=_first_given(in_chans, config.get("in_chans"), *(_weight_shape(state, stem, 1) for stem in _STEMS), 3),
        img_size=_first_given(
            img_size, config.get("img_size"), stored_side * patch_size if stored_side and patch_size else None
        ),
    )

    return model, state, skipped


def load_backbone(
    path: str | os.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint_key: str = "teacher",
) -> tuple[nn.Module, DinoLoadReport]:
    """Build a backbone and load it from a DINO, DAX or our checkpoint, or a bare backbone state dict.

    Each of ``arch``, ``patch_size``, ``in_chans`` and ``img_size`` comes from the argument when given, else from
    our checkpoint's ``backbone_config``; ``patch_size``, ``in_chans`` and ``img_size`` then fall back to what
    the checkpoint's stem and ``pos_embed`` imply (so ``arch`` alone suffices for released files), then to 16,
    3 and 224. From a wrapper state dict only the ``backbone.*`` keys are loaded; ``head.*`` keys are skipped.

    Args:
        path: the checkpoint file.
        arch: one of :data:`~dae.models.backbone2d.ARCHS` (or ``deit_tiny`` / ``deit_small``).
        patch_size: ViT patch size.
        in_chans: input channels of the model to build; 1 with a 3-channel checkpoint sums the stem's channels.
        img_size: ViT size the model's ``pos_embed`` is made for; a checkpoint ``pos_embed`` for another size is
            resampled.
        checkpoint_key: the state dict of a full checkpoint to use (``"teacher"`` by default, as DINO does).

    Returns:
        The backbone (in training mode, as built) and the report, which is also logged.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the file cannot be read (truncated, not a checkpoint, unsafe objects), naming it.
        ValueError: when the arch is unknown or not given and not stored, when ``checkpoint_key`` is absent from a
            full checkpoint, when no key matched, or when shapes disagree after the conversions.
    """
    model, state, skipped = _backbone_for(path, arch, patch_size, in_chans, img_size, checkpoint_key)
    target = model.state_dict()
    converted = _convert_backbone(state, target, "")
    name = f"{path} [{checkpoint_key}] backbone"
    base = load_state_dict_with_report(model, state, name=name)
    report = _extend(base, skipped=skipped, converted=converted)
    if converted or skipped:
        logger.info(report.summary())
    return model, report


def backbone_like(
    path: str | os.PathLike,
    arch: str | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint_key: str = "teacher",
) -> nn.Module:
    """The backbone a checkpoint holds, at random initialisation: the baseline of the same architecture.

    The architecture is resolved exactly as :func:`load_backbone` resolves it (arguments, then the checkpoint's
    ``backbone_config``, then its weights' shapes); no weight is loaded. Seed torch's generator first for a
    reproducible baseline.

    Raises:
        FileNotFoundError, CheckpointError, ValueError: as :func:`load_backbone`.
    """
    model, _, _ = _backbone_for(path, arch, patch_size, in_chans, img_size, checkpoint_key)
    logger.info("backbone: the architecture of %s [%s], randomly initialised", path, checkpoint_key)
    return model


def load_dino_wrapper_state(
    wrapper: MultiCropWrapper, path: str | os.PathLike | None, checkpoint_key: str = "student"
) -> DinoLoadReport | None:
    """Initialise a whole :class:`~dae.models.multicrop.MultiCropWrapper` (backbone and head) from a checkpoint.

    Like DAX's ``--pretrained_weights``. A bare backbone state dict initialises the backbone only (the head keys
    are then reported missing). The conversions of :func:`load_backbone` apply to the backbone; a plain
    ``head.last_layer.weight`` is converted to weight-norm g and v.

    Args:
        wrapper: the wrapper to load into, in place.
        path: the checkpoint file; None loads nothing (a config's "no pretrained weights").
        checkpoint_key: the state dict of a full checkpoint to use (``"student"`` by default, to resume training
            from it; ``"teacher"`` for the EMA weights).

    Returns:
        The report, which is also logged; None when ``path`` is None.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the file cannot be read (truncated, not a checkpoint, unsafe objects), naming it.
        ValueError: when ``checkpoint_key`` is absent from a full checkpoint, when no key matched, or when shapes
            disagree after the conversions (e.g. another ``out_dim``).
    """
    if path is None:
        return None
    state = read_dino_checkpoint(path, checkpoint_key)
    if not any(key.startswith(("backbone.", "head.")) for key in state):
        state = {f"backbone.{key}": value for key, value in state.items()}
    target = wrapper.state_dict()
    converted = _convert_backbone(state, target, "backbone.") + _convert_last_layer(state, target, "head.")
    name = f"{path} [{checkpoint_key}]"
    base = load_state_dict_with_report(wrapper, state, name=name)
    report = _extend(base, converted=converted)
    if converted:
        logger.info(report.summary())
    return report
