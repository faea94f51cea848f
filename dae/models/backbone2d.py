"""Building the 2D backbones of the DINO branch by name, and describing them for checkpoints.

Every backbone returns pooled features ``[B, embed_dim]`` from ``forward`` and a feature map
``[B, embed_dim, h, w]`` from ``patch_grid``, and has the attributes ``arch``, ``embed_dim``, ``in_chans`` and
``patch_size`` (``None`` for ResNets).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dae.models.resnet import RESNET_CONFIGS, ResNet2D
from dae.models.vit import VIT_CONFIGS, VisionTransformer2D

__all__ = ["ARCHS", "backbone_config", "build_backbone", "is_vit"]

ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")

# DINO's names for the small ViTs (its released files are called dino_deitsmall16_pretrain.pth etc.).
_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


def build_backbone(
    arch: str,
    patch_size: int | None = 16,
    in_chans: int = 3,
    img_size: int | None = 224,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build a randomly initialised backbone.

    Args:
        arch: one of :data:`ARCHS`, or DINO's aliases ``deit_tiny`` / ``deit_small``.
        patch_size: ViT patch side (``None`` means 16); ignored for ResNets.
        in_chans: input channels (1 for a grey stem, 3 for published weights).
        img_size: ViT input size the stored positional embeddings are made for (``None`` means 224); ignored
            for ResNets.
        drop_path_rate: ViT stochastic-depth rate; ignored for ResNets (as in DINO).

    Returns:
        A :class:`~dae.models.vit.VisionTransformer2D` or :class:`~dae.models.resnet.ResNet2D`.

    Raises:
        ValueError: for an unknown ``arch``.
    """
    name = _ALIASES.get(arch, arch)
    if name in VIT_CONFIGS:
        return VisionTransformer2D(
            name,
            patch_size=16 if patch_size is None else patch_size,
            in_chans=in_chans,
            img_size=224 if img_size is None else img_size,
            drop_path_rate=drop_path_rate,
        )
    if name in RESNET_CONFIGS:
        return ResNet2D(name, in_chans=in_chans)
    raise ValueError(f"unknown backbone arch {arch!r}; expected one of {ARCHS} (or {tuple(_ALIASES)})")


def backbone_config(model: nn.Module) -> dict[str, Any]:
    """The arguments that rebuild ``model`` with :func:`build_backbone` (stored in our DINO checkpoints).

    Args:
        model: a backbone made by :func:`build_backbone`.

    Returns:
        ``{"arch", "patch_size", "in_chans", "img_size"}``; ``patch_size`` and ``img_size`` are ``None`` for ResNets.

    Raises:
        TypeError: when ``model`` is not one of our backbones.
    """
    if isinstance(model, VisionTransformer2D):
        return {
            "arch": model.arch,
            "patch_size": model.patch_size,
            "in_chans": model.in_chans,
            "img_size": model.img_size,
        }
    if isinstance(model, ResNet2D):
        return {"arch": model.arch, "patch_size": None, "in_chans": model.in_chans, "img_size": None}
    raise TypeError(f"not a backbone from build_backbone: {type(model).__name__}")


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`~dae.models.vit.VisionTransformer2D`."""
    return isinstance(model, VisionTransformer2D)
