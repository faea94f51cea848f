"""What a text-grounded detector returns, the protocol every detector of the pipeline follows, and the heatmap one.

The pipeline asks a detector for the box of one class in one image. Two detectors follow
:class:`BoxDetector`: :class:`~dae.logsam.grounding_dino.GroundingDinoDetector` (the reference's Grounding DINO, own
backbone) and :class:`HeatmapBoxDetector` (the small text-conditioned heatmap head of
:mod:`dae.logsam.heatmap_detector` on the segmenter's image embedding, which the pipeline computes once per image
and shares with the segmenter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dae.logsam.heatmap_detector import TextConditionedHeatmapDetector, decode_boxes

if TYPE_CHECKING:
    from dae.logsam.segmenters import ImageEmbedding

__all__ = ["BoxDetector", "Detection", "DetectionResult", "HeatmapBoxDetector"]


@dataclass(frozen=True)
class Detection:
    """One box of the detector.

    Attributes:
        box: ``[x0, y0, x1, y1]`` in original-image pixels (float64, clipped to the image).
        score: the box's best token probability (in [0, 1]).
        label: the caption words whose probability exceeded the text threshold, as the processor decodes them.
        class_name: the class whose caption phrase has the highest token probability in this box.
    """

    box: np.ndarray
    score: float
    label: str
    class_name: str


@dataclass(frozen=True)
class DetectionResult:
    """What the detector found in one image for one caption.

    Attributes:
        detections: the boxes over the thresholds, best score first (at most ``top_k``).
        caption: the caption the model saw.
        class_name: the class asked for.
        outcome: ``"box"`` when the best score exceeds the detector's ``min_score``, else ``"no_box"`` (also
            without any box).
        class_scores: the detector's score of every class it knows for this image, where it computes them (the
            heatmap detector does: its classification is the class with the highest score); empty otherwise.
    """

    detections: tuple[Detection, ...]
    caption: str
    class_name: str
    outcome: str
    class_scores: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> Detection | None:
        """The best detection, or None for the ``"no_box"`` outcome."""
        return self.detections[0] if self.outcome == "box" else None

    @property
    def boxes(self) -> np.ndarray:
        """All detections' boxes as an (N, 4) float64 array ``[x0, y0, x1, y1]``."""
        return np.array([d.box for d in self.detections], dtype=np.float64).reshape(-1, 4)


class BoxDetector(Protocol):
    """Finds the box of a named class in an image; ``embedding`` is the segmenter's, for detectors that reuse it."""

    def detect(self, image: np.ndarray, class_name: str, embedding: ImageEmbedding | None = None) -> DetectionResult:
        """The boxes of ``class_name`` in ``image`` (uint8 (H, W) or (H, W, 3))."""
        ...


class HeatmapBoxDetector:
    """:class:`BoxDetector` over a trained :class:`~dae.logsam.heatmap_detector.TextConditionedHeatmapDetector`.

    One forward pass scores the caption of every detectable class on the image embedding; the asked class's map
    gives the box (largest region over ``threshold``) and its peak the score, and all peaks go to
    ``class_scores``.

    Args:
        model: the trained heatmap head.
        prompt_embeddings: (K, D) sentence embeddings of the captions of ``class_names``, in that order (as in
            training: :meth:`dae.logsam.text_encoder.SentenceEncoder.encode`).
        class_names: the K detectable classes.
        captions: their caption phrases (recorded in the result).
        threshold: probability over which heatmap pixels form regions.
        min_score: a peak that does not exceed this is the ``"no_box"`` outcome.

    Raises:
        ValueError: when the prompt embeddings and class names disagree in number, or a threshold is outside [0, 1].
    """

    def __init__(
        self,
        model: TextConditionedHeatmapDetector,
        prompt_embeddings: torch.Tensor,
        class_names: Sequence[str],
        captions: Sequence[str],
        threshold: float = 0.3,
        min_score: float = 0.0,
    ) -> None:
        if (
            prompt_embeddings.ndim != 2
            or prompt_embeddings.shape[0] != len(class_names)
            or len(captions) != len(class_names)
        ):
            raise ValueError(
                f"need one (D,) prompt embedding and one caption per class: {len(class_names)} classes, "
                f"{len(captions)} captions, embeddings {tuple(prompt_embeddings.shape)}"
            )
        for name, value in (("threshold", threshold), ("min_score", min_score)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.model = model.eval()
        self.prompt_embeddings = prompt_embeddings.float()
        self.class_names = tuple(class_names)
        self.captions = dict(zip(class_names, captions))
        self.threshold = threshold
        self.min_score = min_score

    @torch.no_grad()
    def detect(self, image: np.ndarray, class_name: str, embedding: ImageEmbedding | None = None) -> DetectionResult:
        """The box of ``class_name``; see the class docstring.

        Raises:
            ValueError: without an embedding, or for a class the detector was not trained on.
        """
        if embedding is None:
            raise ValueError("the heatmap detector works on the segmenter's image embedding: pass embedding=")
        if class_name not in self.captions:
            raise ValueError(f"class {class_name!r} is not one the detector knows: {list(self.class_names)}")
        device = next(self.model.parameters()).device
        features = embedding.features.to(device, torch.float32)
        logits = self.model(features, self.prompt_embeddings.to(device)[None])  # (1, K, h, w)
        probs = logits.float().sigmoid()[0]
        # A map covers the model's square input frame: padded (aspect kept) unless the image was stretched to it.
        keep_aspect = tuple(embedding.resized_size) != tuple(embedding.input_size)
        boxes, scores = decode_boxes(probs, tuple(embedding.image_size), self.threshold, keep_aspect)
        index = self.class_names.index(class_name)
        box, score = boxes[index].double().numpy(), float(scores[index])
        detections: tuple[Detection, ...] = ()
        if not np.isnan(box).any():
            detections = (Detection(box=box, score=score, label=self.captions[class_name], class_name=class_name),)
        outcome = "box" if detections and score > self.min_score else "no_box"
        class_scores = {name: float(s) for name, s in zip(self.class_names, scores)}
        return DetectionResult(detections, self.captions[class_name], class_name, outcome, class_scores)
