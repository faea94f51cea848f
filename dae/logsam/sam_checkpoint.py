"""Original-layout SAM / MedSAM checkpoints (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``) for HF ``SamModel``.

The segment-anything package names its modules ``image_encoder.*`` (ViT with ``blocks``, ``neck.0-3``),
``prompt_encoder.*`` (``pe_layer``, ``point_embeddings``, ``mask_downscaling.0-6``) and ``mask_decoder.*``
(``output_upscaling.0-3``, MLPs with ``layers.0..n-1``); transformers' ``SamModel`` holds the same tensors under
other names. The conversion script of transformers is not part of its wheel, so the map below is our own, written
from the two module trees. The random Fourier matrix of the prompt encoder is shared in HF by
``shared_image_embedding`` and ``prompt_encoder.shared_embedding`` and is written to both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dae.errors import CheckpointContentError, CheckpointNotFoundError
from dae.utils.state_dict import head_keys

if TYPE_CHECKING:
    from transformers import SamConfig

__all__ = ["convert_sam_checkpoint", "read_state_dict", "sam_config_from_state_dict"]

_INSTALL_HINT = 'pip install -e ".[logsam]"'
_ATTENTION = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.(q_proj|k_proj|v_proj|out_proj)"
# (original module, HF module): (key pattern inside it, HF replacement), matched against the whole rest of the key.
_RULES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("image_encoder", "vision_encoder"): (
        (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.projection.\1"),
        (r"pos_embed", r"pos_embed"),
        (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"layers.\1.layer_norm\2.\3"),
        (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"layers.\1.attn.\2.\3"),
        (r"blocks\.(\d+)\.attn\.(rel_pos_[hw])", r"layers.\1.attn.\2"),
        (r"blocks\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
        (r"neck\.0\.weight", r"neck.conv1.weight"),
        (r"neck\.1\.(weight|bias)", r"neck.layer_norm1.\1"),
        (r"neck\.2\.weight", r"neck.conv2.weight"),
        (r"neck\.3\.(weight|bias)", r"neck.layer_norm2.\1"),
    ),
    ("prompt_encoder", "prompt_encoder"): (
        (r"point_embeddings\.(\d+)\.weight", r"point_embed.\1.weight"),
        (r"(not_a_point_embed|no_mask_embed)\.weight", r"\1.weight"),
        (r"mask_downscaling\.0\.(weight|bias)", r"mask_embed.conv1.\1"),
        (r"mask_downscaling\.1\.(weight|bias)", r"mask_embed.layer_norm1.\1"),
        (r"mask_downscaling\.3\.(weight|bias)", r"mask_embed.conv2.\1"),
        (r"mask_downscaling\.4\.(weight|bias)", r"mask_embed.layer_norm2.\1"),
        (r"mask_downscaling\.6\.(weight|bias)", r"mask_embed.conv3.\1"),
    ),
    ("mask_decoder", "mask_decoder"): (
        (r"(iou_token|mask_tokens)\.weight", r"\1.weight"),
        (rf"transformer\.layers\.(\d+)\.{_ATTENTION}\.(weight|bias)", r"transformer.layers.\1.\2.\3.\4"),
        (r"transformer\.layers\.(\d+)\.norm([1-4])\.(weight|bias)", r"transformer.layers.\1.layer_norm\2.\3"),
        (r"transformer\.layers\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", r"transformer.layers.\1.mlp.\2.\3"),
        (
            r"transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
            r"transformer.final_attn_token_to_image.\1.\2",
        ),
        (r"transformer\.norm_final_attn\.(weight|bias)", r"transformer.layer_norm_final_attn.\1"),
        (r"output_upscaling\.0\.(weight|bias)", r"upscale_conv1.\1"),
        (r"output_upscaling\.1\.(weight|bias)", r"upscale_layer_norm.\1"),
        (r"output_upscaling\.3\.(weight|bias)", r"upscale_conv2.\1"),
    ),
}
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"{original}\.{pattern}"), f"{hf}.{replacement}")
    for (original, hf), rules in _RULES.items()
    for pattern, replacement in rules
)
_POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_POSITIONAL_HF = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
# segment-anything's MLP keeps its linears in ``layers.0..n-1``; HF's SamFeedForward has proj_in, layers, proj_out.
_MLP = re.compile(r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(weight|bias)")


def convert_sam_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout SAM/MedSAM state dict to the keys of ``transformers.SamModel``.

    Args:
        state_dict: ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` tensors as saved by
            segment-anything (or MedSAM, which saves the same module).

    Returns:
        A new dict keyed like ``SamModel.state_dict()``, tensors shared with the input.

    Raises:
        ValueError: naming the keys no rule maps (another architecture or a wrapped checkpoint).
    """
    mlp_depth: dict[str, int] = {}
    for key in state_dict:
        if match := _MLP.fullmatch(key):
            mlp_depth[match[1]] = max(mlp_depth.get(match[1], 0), int(match[2]) + 1)

    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        targets = _hf_names(key, mlp_depth)
        if not targets:
            unmapped.append(key)
        for target in targets:
            converted[target] = tensor
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} of {len(state_dict)} keys are not original SAM keys: {head_keys(unmapped)} "
            "(expected image_encoder.*, prompt_encoder.*, mask_decoder.* as saved by segment-anything or MedSAM)"
        )
    return converted


def _hf_names(key: str, mlp_depth: Mapping[str, int]) -> tuple[str, ...]:
    if key == _POSITIONAL:
        return _POSITIONAL_HF
    if match := _MLP.fullmatch(key):
        mlp, index, kind = match[1], int(match[2]), match[3]
        if index == 0:
            return (f"mask_decoder.{mlp}.proj_in.{kind}",)
        if index == mlp_depth[mlp] - 1:
            return (f"mask_decoder.{mlp}.proj_out.{kind}",)
        return (f"mask_decoder.{mlp}.layers.{index - 1}.{kind}",)
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(key):
            return (pattern.sub(replacement, key),)
    return ()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or a dict holding one under ``"model"`` or ``"state_dict"`` (training checkpoints).

    Raises:
        CheckpointNotFoundError: when the file does not exist.
        CheckpointContentError: when it holds no mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    content = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(content, Mapping) and isinstance(content.get(wrapper), Mapping):
            content = content[wrapper]
    if not isinstance(content, Mapping) or not content:
        raise CheckpointContentError(f"{path} holds no state dict (got {type(content).__name__})")
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointContentError(f"{path}: entries that are not tensors: {head_keys(not_tensors)}")
    return dict(content)


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    compiled = re.compile(pattern)
    return len({match[1] for key in state_dict if (match := compiled.fullmatch(key))})


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"original SAM state dict lacks {key!r}; cannot infer the architecture")
    return state_dict[key]


def sam_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], mask_decoder_heads: int = 8) -> SamConfig:
    """Infer the ``transformers.SamConfig`` of an original-layout SAM state dict from its tensor shapes.

    Everything but the number of attention heads of the mask decoder is in the shapes: windowed and global vision
    blocks differ by the length of their relative position tables (``2 * window - 1`` against
    ``2 * grid - 1``).

    Args:
        state_dict: original-layout tensors (see :func:`convert_sam_checkpoint`).
        mask_decoder_heads: heads of the two-way transformer (8 in every released SAM and MedSAM).

    Returns:
        The config (ViT-B for ``sam_vit_b_01ec64.pth`` and ``medsam_vit_b.pth``).

    Raises:
        ImportError: when transformers is not installed.
        ValueError: when a tensor the inference needs is missing.
    """
    try:
        from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig
    except ImportError as error:
        raise ImportError(f"SAM needs the transformers package: {_INSTALL_HINT}") from error

    patch = _tensor(state_dict, "image_encoder.patch_embed.proj.weight")
    hidden, patch_size = patch.shape[0], patch.shape[2]
    grid = _tensor(state_dict, "image_encoder.pos_embed").shape[1]
    depth = _count(state_dict, r"image_encoder\.blocks\.(\d+)\..*")
    rel_lengths = [_tensor(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h").shape[0] for i in range(depth)]
    head_dim = _tensor(state_dict, "image_encoder.blocks.0.attn.rel_pos_h").shape[1]
    global_layers = [i for i, length in enumerate(rel_lengths) if length == 2 * grid - 1]
    window_lengths = {length for length in rel_lengths if length != 2 * grid - 1}
    if len(window_lengths) > 1:
        raise ValueError(f"vision blocks have different window sizes (relative table lengths {sorted(window_lengths)})")
    window = (window_lengths.pop() + 1) // 2 if window_lengths else 0
    out_channels = _tensor(state_dict, "image_encoder.neck.0.weight").shape[0]
    vision = SamVisionConfig(
        hidden_size=hidden,
        output_channels=out_channels,
        num_hidden_layers=depth,
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch_size,
        patch_size=patch_size,
        mlp_dim=_tensor(state_dict, "image_encoder.blocks.0.mlp.lin1.weight").shape[0],
        window_size=window,
        global_attn_indexes=global_layers,
        num_pos_feats=_tensor(state_dict, _POSITIONAL).shape[1],
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=out_channels,
        image_size=grid * patch_size,
        patch_size=patch_size,
        mask_input_channels=_tensor(state_dict, "prompt_encoder.mask_downscaling.3.weight").shape[0],
        num_point_embeddings=_count(state_dict, r"prompt_encoder\.point_embeddings\.(\d+)\.weight"),
    )
    decoder_dim = _tensor(state_dict, "mask_decoder.iou_token.weight").shape[1]
    cross_dim = _tensor(state_dict, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight").shape[0]
    decoder = SamMaskDecoderConfig(
        hidden_size=decoder_dim,
        mlp_dim=_tensor(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        num_hidden_layers=_count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\..*"),
        num_attention_heads=mask_decoder_heads,
        attention_downsample_rate=decoder_dim // cross_dim,
        num_multimask_outputs=_tensor(state_dict, "mask_decoder.mask_tokens.weight").shape[0] - 1,
        iou_head_depth=_count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
        iou_head_hidden_dim=_tensor(state_dict, "mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
    )
    return SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
