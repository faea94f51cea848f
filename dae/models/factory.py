"""Backbones from config mappings: one spec gives one model, whichever kind and checkpoint format it names.

Kinds and keys (``checkpoint`` / ``path`` must be present; ``null`` checkpoints give random-init baselines, and
``"random_init": true`` the architecture of a checkpoint at random initialisation, its baseline):

``{"kind": "dino", "checkpoint": path | null, "arch", "patch_size", "in_chans", "img_size",
"checkpoint_key": "teacher", "random_init": false}``
    A 2D ViT or ResNet (:func:`~dae.models.backbone2d.build_backbone`): our / DINO / DAX checkpoints via
    :func:`~dae.models.dino_checkpoint.load_backbone` (``arch`` etc. may come from the checkpoint); with a null
    checkpoint ``arch`` is required and the rest default to ``build_backbone``'s (patch 16, 3 channels, 224).
``{"kind": "hf_dinov2", "path": folder}``
    A local transformers DINOv2 folder (RAD-DINO) via :func:`~dae.models.hf_dinov2.load_hf_dinov2`.
``{"kind": "dae3d", "checkpoint": path | null, "fmt": "auto", "in_channels": 1, "feature_size": 48,
"depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "use_v2": false, "normalize": true,
"random_init": false}``
    A 3D MONAI ``SwinUNETR`` whose encoder is loaded with :func:`~dae.models.pretrained.load_pretrained_swinunetr`
    (``parts="encoder"``; any of its formats: our DAE checkpoints, plain SwinUNETR, MONAI SSL, official DAE).

Callers that read more keys from the same spec (e.g. the evaluation's ``n_last_blocks`` or ``input_size``) name
them in ``extra_keys``, so that a typo anywhere in the spec is still reported.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from monai.networks.nets import SwinUNETR
from torch import nn

from dae.models.backbone2d import build_backbone
from dae.models.dino_checkpoint import backbone_like, load_backbone
from dae.models.hf_dinov2 import load_hf_dinov2
from dae.models.pretrained import load_pretrained_swinunetr

__all__ = ["BACKBONE_KINDS", "backbone_from_spec", "check_backbone_spec"]

logger = logging.getLogger(__name__)

#: kind -> the spec keys it requires and the ones it accepts besides ``kind``
BACKBONE_KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "dino": {
        "required": ("checkpoint",),
        "optional": ("arch", "patch_size", "in_chans", "img_size", "checkpoint_key", "random_init"),
    },
    "hf_dinov2": {"required": ("path",), "optional": ()},
    "dae3d": {
        "required": ("checkpoint",),
        "optional": (
            "fmt",
            "in_channels",
            "feature_size",
            "depths",
            "num_heads",
            "window_size",
            "use_v2",
            "normalize",
            "random_init",
        ),
    },
}


def check_backbone_spec(spec: Mapping[str, Any], extra_keys: Collection[str] = ()) -> str:
    """Check a spec's kind and keys and return its kind.

    Args:
        spec: the mapping.
        extra_keys: keys the caller reads itself, accepted besides the kind's own.

    Raises:
        ValueError: for an unknown kind, a missing required key or an unknown key (naming the allowed ones).
    """
    kind = spec.get("kind")
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; expected one of {tuple(BACKBONE_KINDS)}")
    keys = BACKBONE_KINDS[kind]
    missing = [key for key in keys["required"] if key not in spec]
    if missing:
        raise ValueError(f"backbone spec of kind {kind!r} lacks {missing} (use null for a random-init checkpoint)")
    allowed = [*keys["required"], *keys["optional"], *extra_keys]
    unknown = sorted(set(spec) - {"kind", *allowed})
    if unknown:
        raise ValueError(f"backbone spec of kind {kind!r} has unknown keys {unknown}; allowed: {allowed}")
    return kind


def _dino(spec: Mapping[str, Any]) -> nn.Module:
    if spec["checkpoint"] is None:
        if "arch" not in spec:
            raise ValueError("a 'dino' spec with a null checkpoint needs 'arch'")
        logger.info("backbone: randomly initialised %s (no checkpoint)", spec["arch"])
        return build_backbone(
            spec["arch"],
            patch_size=spec.get("patch_size", 16),
            in_chans=spec.get("in_chans", 3),
            img_size=spec.get("img_size", 224),
        )
    options = {key: spec.get(key) for key in ("arch", "patch_size", "in_chans", "img_size")}
    options["checkpoint_key"] = spec.get("checkpoint_key", "teacher")
    if spec.get("random_init", False):
        return backbone_like(spec["checkpoint"], **options)
    backbone, _ = load_backbone(spec["checkpoint"], **options)
    return backbone


def _dae3d(spec: Mapping[str, Any]) -> nn.Module:
    in_channels = spec.get("in_channels", 1)
    swin = SwinUNETR(
        in_channels=in_channels,
        out_channels=in_channels,
        feature_size=spec.get("feature_size", 48),
        depths=tuple(spec.get("depths", (2, 2, 2, 2))),
        num_heads=tuple(spec.get("num_heads", (3, 6, 12, 24))),
        window_size=spec.get("window_size", 7),
        use_v2=spec.get("use_v2", False),
        normalize=spec.get("normalize", True),
        spatial_dims=3,
    )
    if spec["checkpoint"] is None or spec.get("random_init", False):
        logger.info("backbone: randomly initialised SwinUNETR encoder")
    else:
        load_pretrained_swinunetr(swin, spec["checkpoint"], fmt=spec.get("fmt", "auto"), parts="encoder")
    return swin


def backbone_from_spec(spec: Mapping[str, Any], extra_keys: Collection[str] = ()) -> nn.Module:
    """Build (and load) the backbone a spec describes (kinds and keys in the module docstring).

    Args:
        spec: the mapping.
        extra_keys: keys the caller reads itself; accepted and ignored here.

    Returns:
        A ``VisionTransformer2D`` / ``ResNet2D`` (``dino``), a transformers ``Dinov2Model`` (``hf_dinov2``) or a
        3D ``SwinUNETR`` (``dae3d``), on the CPU.

    Raises:
        ValueError: for a spec :func:`check_backbone_spec` refuses, or a null-checkpoint ``dino`` spec without
            ``arch``; loader errors propagate.
    """
    kind = check_backbone_spec(spec, extra_keys)
    if kind == "dino":
        return _dino(spec)
    if kind == "hf_dinov2":
        return load_hf_dinov2(spec["path"])
    return _dae3d(spec)
