"""Networks: the Disruptive Autoencoder around MONAI's SwinUNETR, its projection head, pretrained-weight loading;
the 2D DINO backbones, head, multi-crop wrapper, DINO/DAX checkpoint loading and Hugging Face DINOv2 loading;
segmentation-probe heads and fine-tuned checkpoint loading."""

from __future__ import annotations

from dae.models.backbone2d import ARCHS, backbone_config, build_backbone, is_vit
from dae.models.dae import DAEOutput, DisruptiveAutoencoder
from dae.models.dino_checkpoint import (
    DinoLoadReport,
    backbone_like,
    load_backbone,
    load_dino_wrapper_state,
    normalize_dino_keys,
    read_dino_checkpoint,
)
from dae.models.dino_head import DINOHead
from dae.models.factory import BACKBONE_KINDS, backbone_from_spec, check_backbone_spec
from dae.models.heads import ProjectionHead
from dae.models.hf_dinov2 import RadDinoPreprocess, load_hf_dinov2
from dae.models.multicrop import MultiCropWrapper
from dae.models.pretrained import (
    PretrainedLoadReport,
    init_from_pretrained,
    load_model_weights,
    load_pretrained_swinunetr,
)
from dae.models.resnet import ResNet2D
from dae.models.seg_heads import DECODERS, LinearSegHead, UNetSegHead, build_seg_head
from dae.models.vit import VisionTransformer2D

__all__ = [
    "ARCHS",
    "BACKBONE_KINDS",
    "DECODERS",
    "DAEOutput",
    "DINOHead",
    "DinoLoadReport",
    "DisruptiveAutoencoder",
    "LinearSegHead",
    "MultiCropWrapper",
    "PretrainedLoadReport",
    "ProjectionHead",
    "RadDinoPreprocess",
    "ResNet2D",
    "UNetSegHead",
    "VisionTransformer2D",
    "backbone_config",
    "backbone_from_spec",
    "backbone_like",
    "build_backbone",
    "build_seg_head",
    "check_backbone_spec",
    "init_from_pretrained",
    "is_vit",
    "load_backbone",
    "load_dino_wrapper_state",
    "load_hf_dinov2",
    "load_model_weights",
    "load_pretrained_swinunetr",
    "normalize_dino_keys",
    "read_dino_checkpoint",
]
