"""Dictation to tumour mask in one call: speech or text -> class prompt -> box -> box-prompted mask.

The four stages of LoGSAM (arXiv 2603.17576) as one object. The reference passed files between four scripts and
had no code from the extracted class to the detector's caption; here the extracted class is the caption. A
dictation that names no tumour, or negates every tumour it names, stops after the prompt (outcome ``"healthy"``,
no mask); a detector that finds no box for the named class stops too (``"no_box"``). The segmenter's image
embedding is computed once per image and shared with detectors that read it (the heatmap detector).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from dae.logsam.classes import ClassTable
from dae.logsam.detection import BoxDetector, DetectionResult
from dae.logsam.prompt import PromptResult, extract_prompt
from dae.logsam.segmenters import BoxPromptedSegmenter, ImageEmbedding
from dae.logsam.speech import Transcriber, Transcript

__all__ = ["DictationToMask", "PipelineResult", "overlay_picture", "write_case"]

OUTCOMES = ("mask", "healthy", "no_box")


@dataclass(frozen=True)
class PipelineResult:
    """Everything one case went through.

    Attributes:
        prompt: the class extracted from the dictation, with its mentions, evidence and deciding rule.
        outcome: ``"mask"``, ``"healthy"`` (the dictation names no tumour: no detection, no mask) or ``"no_box"``
            (the detector found no box for the named class: no mask).
        transcript: the transcription when the input was audio, else None.
        detection: the detector's result (None for ``"healthy"``).
        box: the box that prompted the segmenter, ``[x0, y0, x1, y1]`` in pixels (None without a mask).
        mask: boolean (H, W) tumour mask (None without one).
        mask_score: the segmenter's predicted IoU of the mask (None without one).
    """

    prompt: PromptResult
    outcome: str
    transcript: Transcript | None = None
    detection: DetectionResult | None = None
    box: np.ndarray | None = None
    mask: np.ndarray | None = None
    mask_score: float | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-ready summary (no mask pixels)."""
        detection = self.detection
        return {
            "outcome": self.outcome,
            "class": self.prompt.tumour_class,
            "dictation": self.prompt.text,
            "language": self.prompt.language,
            "rule": self.prompt.rule,
            "evidence": self.prompt.evidence,
            "evidence_span": list(self.prompt.evidence_span) if self.prompt.evidence_span else None,
            "mentions": [
                {"class": m.class_name, "text": m.text, "span": [m.start_char, m.end_char], "negated": m.negated}
                for m in self.prompt.mentions
            ],
            "negated_classes": list(self.prompt.negated_classes),
            "transcript_duration_s": self.transcript.duration_s if self.transcript else None,
            "caption": detection.caption if detection else None,
            "detection_score": detection.detections[0].score if detection and detection.detections else None,
            "class_scores": dict(detection.class_scores) if detection else {},
            "box": [round(float(v), 2) for v in self.box] if self.box is not None else None,
            "mask_score": self.mask_score,
            "mask_pixels": int(self.mask.sum()) if self.mask is not None else 0,
        }


class DictationToMask:
    """The pipeline: ``(dictation audio or text, image) -> (class, box, mask)``.

    Args:
        segmenter: the box-prompted segmenter (LiteMedSAM, MedSAM / SAM through ``SamModel``).
        detector: the text-grounded detector (:class:`~dae.logsam.detection.HeatmapBoxDetector` or
            :class:`~dae.logsam.grounding_dino.GroundingDinoDetector`).
        table: the class table (default: :meth:`ClassTable.default`).
        transcriber: speech to text for audio input (e.g. :class:`~dae.logsam.speech.FasterWhisperTranscriber`);
            without one only text dictations are accepted.
        language: the dictation language when the caller does not give one (a language of ``table``).

    Examples:
        >>> pipeline = DictationToMask(segmenter, detector, transcriber=transcriber)  # doctest: +SKIP
        >>> result = pipeline(image, audio="case_001.flac", language="de")  # doctest: +SKIP
        >>> result.prompt.tumour_class, result.box, result.mask.sum()  # doctest: +SKIP
    """

    def __init__(
        self,
        segmenter: BoxPromptedSegmenter,
        detector: BoxDetector,
        table: ClassTable | None = None,
        transcriber: Transcriber | None = None,
        language: str = "en",
    ) -> None:
        self.segmenter = segmenter
        self.detector = detector
        self.table = table if table is not None else ClassTable.default()
        if language not in self.table.languages:
            raise ValueError(f"language {language!r} is not one of the class table's {list(self.table.languages)}")
        self.transcriber = transcriber
        self.language = language

    def __call__(
        self,
        image: np.ndarray,
        *,
        audio: str | os.PathLike | np.ndarray | None = None,
        text: str | None = None,
        language: str | None = None,
        embedding: ImageEmbedding | None = None,
    ) -> PipelineResult:
        """Run one case.

        Args:
            image: uint8 grey (H, W) or RGB (H, W, 3) slice.
            audio: the dictation as a file (WAV, FLAC, MP3...) or 16 kHz float32 samples; or
            text: the dictation as text (exactly one of the two).
            language: the dictation's language (default: the pipeline's); passed to the transcriber too.
            embedding: the segmenter's embedding of ``image`` when already computed (e.g. from an
                :class:`~dae.logsam.data.EmbeddingCache`); computed here otherwise.

        Raises:
            ValueError: without exactly one of ``audio`` and ``text``, for audio without a transcriber, or for an
                embedding of another segmenter or image size.
        """
        if (audio is None) == (text is None):
            raise ValueError("give the dictation as exactly one of audio= and text=")
        language = language or self.language
        transcript = None
        if audio is not None:
            if self.transcriber is None:
                raise ValueError("audio dictation but the pipeline has no transcriber: build it with transcriber=")
            transcript = self.transcriber.transcribe(audio, language=language)
            text = transcript.text
        assert text is not None
        prompt = extract_prompt(text, language=language, table=self.table)
        if not prompt.is_tumour:
            return PipelineResult(prompt, "healthy", transcript)
        if embedding is None:
            embedding = self.segmenter.embed(image)
        elif embedding.segmenter != self.segmenter.name or tuple(embedding.image_size) != image.shape[:2]:
            raise ValueError(
                f"the embedding is of {embedding.segmenter!r} at {tuple(embedding.image_size)}, the image "
                f"{image.shape[:2]} and the segmenter {self.segmenter.name!r}"
            )
        detection = self.detector.detect(image, prompt.tumour_class, embedding=embedding)
        if detection.best is None:
            return PipelineResult(prompt, "no_box", transcript, detection)
        box = np.asarray(detection.best.box, dtype=np.float64)
        output = self.segmenter.segment(embedding, box[None])
        return PipelineResult(prompt, "mask", transcript, detection, box, output.masks[0], float(output.scores[0]))


def overlay_picture(
    image: np.ndarray, mask: np.ndarray | None, box: np.ndarray | None, true_box: np.ndarray | None = None
) -> np.ndarray:
    """The slice in grey with the mask in red, the predicted box in yellow and the true box in green.

    Returns:
        uint8 (H, W, 3) RGB.
    """
    grey = image if image.ndim == 2 else image.mean(axis=2)
    rgb = np.repeat(grey.astype(np.float32)[:, :, None], 3, axis=2)
    if mask is not None:
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([255.0, 0.0, 0.0])
    for b, colour in ((true_box, (0, 255, 0)), (box, (255, 220, 0))):
        if b is None:
            continue
        height, width = grey.shape
        x0, y0 = (int(np.clip(round(v), 0, n - 1)) for v, n in ((b[0], width), (b[1], height)))
        x1, y1 = (int(np.clip(round(v) - 1, 0, n - 1)) for v, n in ((b[2], width), (b[3], height)))
        rgb[y0, x0 : x1 + 1] = rgb[y1, x0 : x1 + 1] = colour
        rgb[y0 : y1 + 1, x0] = rgb[y0 : y1 + 1, x1] = colour
    return rgb.clip(0, 255).astype(np.uint8)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write beside and rename: an interrupted run never leaves a torn file under the final name."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_case(
    result: PipelineResult,
    image: np.ndarray,
    output_dir: str | os.PathLike,
    case_id: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one case: ``<id>.json`` always; ``<id>_mask.png``, ``<id>_mask.nii.gz`` and ``<id>_overlay.png``.

    The mask PNG is 0/255 like the inputs; the NIfTI holds the same mask as a (W, H, 1) volume with an identity
    affine (x = column, y = row, as MONAI reads a PNG). Without a mask (``"healthy"``, ``"no_box"``) the mask files
    are empty masks, so every case has the same files, and the overlay shows the slice alone.

    Returns:
        The JSON record (the result's :meth:`PipelineResult.record`, ``extra`` and the file names).
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    mask = result.mask if result.mask is not None else np.zeros(image.shape[:2], dtype=bool)
    files = {
        "mask_png": f"{case_id}_mask.png",
        "mask_nifti": f"{case_id}_mask.nii.gz",
        "overlay": f"{case_id}_overlay.png",
    }
    _write_bytes(folder / files["mask_png"], _png_bytes(mask.astype(np.uint8) * 255))
    volume = nib.Nifti1Image(mask.T[:, :, None].astype(np.uint8), np.eye(4))
    _write_bytes(folder / files["mask_nifti"], gzip.compress(volume.to_bytes()))
    true_box = None if extra is None or extra.get("true_box") is None else np.asarray(extra["true_box"])
    overlay = overlay_picture(image, result.mask, result.box, true_box)
    _write_bytes(folder / files["overlay"], _png_bytes(overlay))
    record = {"id": case_id, **result.record(), **(extra or {}), "files": files}
    _write_bytes(folder / f"{case_id}.json", json.dumps(record, indent=2).encode())
    return record
