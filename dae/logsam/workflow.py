"""The steps the ``bundles/logsam`` configs call: checked lists, cached embeddings, prompts, the trained detector.

Every list of a run is read and checked (:func:`check_lists`) before the image encoder runs, and every image
embedding the run needs is computed once into the cache (:func:`fill_embedding_cache`) before training or
evaluation starts, so a bad entry fails in seconds and the encoder never runs twice on one image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dae.errors import DataError
from dae.logsam.classes import ClassTable
from dae.logsam.data import EmbeddingCache, load_logsam_datalist, read_grey
from dae.logsam.detection import HeatmapBoxDetector
from dae.logsam.detector_training import EmbeddedSliceDataset
from dae.logsam.heatmap_detector import TextConditionedHeatmapDetector
from dae.logsam.packaged_weights import whisper_base_dir
from dae.logsam.pipeline import DictationToMask, write_case
from dae.logsam.segmenters import ImageEmbedding
from dae.logsam.speech import Transcriber, build_transcriber
from dae.logsam.text_encoder import SentenceEncoder
from dae.models.pretrained import load_model_weights

__all__ = [
    "ClassPrompts",
    "cache_keeps_aspect",
    "check_lists",
    "class_prompts",
    "dictation_transcriber",
    "embedded_dataset",
    "fill_embedding_cache",
    "inference_cases",
    "keeps_aspect",
    "load_heatmap_detector",
    "run_inference",
]

logger = logging.getLogger(__name__)


def check_lists(
    datalist: str | Path, dataset_dir: str | Path, splits: Sequence[str], table: ClassTable | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every named list of ``datalist``, each entry checked (:func:`~dae.logsam.data.load_logsam_datalist`)."""
    return {split: load_logsam_datalist(datalist, dataset_dir, split, table) for split in splits}


def fill_embedding_cache(cache: EmbeddingCache, lists: Mapping[str, Sequence[Mapping[str, Any]]]) -> EmbeddingCache:
    """Compute the embedding of every image of ``lists`` that the cache lacks, with a progress bar."""
    images = sorted({str(entry["image"]) for entries in lists.values() for entry in entries})
    for image in tqdm(images, desc=f"image embeddings ({cache.segmenter.name})"):
        cache.get(image)
    logger.info("image embeddings: %d from the cache, %d computed, in %s", cache.hits, cache.misses, cache.folder)
    return cache


def keeps_aspect(embedding: ImageEmbedding) -> bool:
    """Whether the segmenter padded the image into its square frame (True) rather than stretching it (False).

    The two agree for square images; the heatmap maps use the same convention
    (:mod:`dae.logsam.heatmap_detector`).
    """
    return tuple(embedding.resized_size) != tuple(embedding.input_size)


class ClassPrompts:
    """The detectable classes, their captions and the captions' sentence embeddings, in one fixed order.

    Args:
        table: the class table (its ``tumour_names`` are the detectable classes).
        encoder: the sentence encoder of the captions.
    """

    def __init__(self, table: ClassTable, encoder: SentenceEncoder) -> None:
        self.names = list(table.tumour_names)
        self.captions = [table.caption(name) for name in self.names]
        self.embeddings = encoder.encode(self.captions)

    @property
    def dimension(self) -> int:
        """Size D of a caption embedding."""
        return int(self.embeddings.shape[1])


def class_prompts(table: ClassTable, text_encoder_dir: str | Path | None = None) -> ClassPrompts:
    """:class:`ClassPrompts` with a :class:`~dae.logsam.text_encoder.SentenceEncoder` (None: the packaged MiniLM)."""
    return ClassPrompts(table, SentenceEncoder(text_encoder_dir))


def embedded_dataset(
    entries: Sequence[Mapping[str, Any]], cache: EmbeddingCache, prompts: ClassPrompts
) -> EmbeddedSliceDataset:
    """The training or validation slices with their cached embeddings, in the segmenter's frame convention."""
    return EmbeddedSliceDataset.from_cache(
        entries, cache, prompts.names, keep_aspect=cache_keeps_aspect(cache, entries)
    )


def cache_keeps_aspect(cache: EmbeddingCache, entries: Sequence[Mapping[str, Any]]) -> bool:
    """:func:`keeps_aspect` of the cache's segmenter, read from the embedding of the first entry's image."""
    return keeps_aspect(cache.get(entries[0]["image"]))


def load_heatmap_detector(
    checkpoint: str | Path,
    prompts: ClassPrompts,
    image_channels: int = 256,
    hidden: int = 64,
    threshold: float = 0.3,
    min_score: float = 0.0,
    device: str | torch.device = "cpu",
) -> HeatmapBoxDetector:
    """The trained heatmap head of ``checkpoint`` (``{"model": ...}`` of the trainer), wrapped as a detector.

    Raises:
        CheckpointError: when the file is missing or unreadable.
        ValueError: when its weights do not fit a head of these sizes (naming the keys).
    """
    model = TextConditionedHeatmapDetector(image_channels=image_channels, text_dim=prompts.dimension, hidden=hidden)
    load_model_weights(model, checkpoint)
    return HeatmapBoxDetector(
        model.to(device), prompts.embeddings, prompts.names, prompts.captions, threshold, min_score
    )


def dictation_transcriber(
    kind: str | None,
    path: str | Path | None,
    model_cache: str | Path,
    table: ClassTable,
    beam_size: int = 5,
    device: str = "cpu",
) -> Transcriber | None:
    """The speech recogniser of a bundle run, prompted with the class table's terms in each of its languages.

    Args:
        kind: ``"faster-whisper"``, ``"openai-whisper"``, ``"hf-whisper"``, or ``"none"`` / None (typed reports
            only).
        path: the model folder or file; None with ``faster-whisper``: the packaged Whisper base, assembled (sha256
            checked) under ``model_cache``.
        model_cache: folder for the assembled packaged model.
        table: its :meth:`~dae.logsam.classes.ClassTable.initial_prompt` per language biases the recogniser
            towards the class terms.
        beam_size: beam width.
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for a kind other than faster-whisper without a path.
    """
    if kind is None or kind == "none":
        return None
    if path is None:
        if kind != "faster-whisper":
            raise ValueError(
                f"transcriber_kind {kind!r} needs transcriber_path (only faster-whisper has packaged weights)"
            )
        path = whisper_base_dir(model_cache)
    prompts = {language: table.initial_prompt(language) for language in table.languages}
    return build_transcriber(kind, path, initial_prompt=prompts, beam_size=beam_size, device=str(device))


def inference_cases(
    datalist: str | Path | None = None,
    dataset_dir: str | Path = ".",
    key: str = "test",
    image: str | Path | None = None,
    report: str | None = None,
    dictation: str | Path | None = None,
    language: str | None = None,
) -> list[dict[str, Any]]:
    """The cases to run: the ``key`` list of ``datalist``, or the one case ``image`` + ``report`` or ``dictation``.

    Each case needs an ``image`` and a ``dictation`` (audio file) or a ``report`` (text); ``language`` and ``id``
    are optional. Relative paths of a list start at ``dataset_dir``, those of the one case at the working folder. All
    cases are checked before any model runs.

    Raises:
        DataError: listing every case whose files are missing or that has no dictation, naming the source.
    """
    if datalist is not None:
        source = f"{datalist} list {key!r}"
        content = json.loads(Path(datalist).read_text())
        cases = content.get(key) if isinstance(content, dict) else None
        if not isinstance(cases, list) or not cases:
            raise DataError(f"{source}: no such non-empty list")
    elif image is not None:
        source = "the command line"
        cases = [{"image": str(image), "report": report, "dictation": dictation, "language": language}]
    else:
        raise DataError("nothing to run: give infer_datalist, or infer_image with infer_report or infer_dictation")
    root = Path(dataset_dir) if datalist is not None else Path(".")  # a command-line case starts at the working folder
    checked, problems = [], []
    for index, case in enumerate(cases):
        out = {k: v for k, v in case.items() if v is not None}
        for name in ("image", "dictation"):
            if out.get(name):
                out[name] = str(root / out[name])
                if not Path(out[name]).is_file():
                    problems.append(f"  [{index}] {name} {out[name]} does not exist")
        if "image" not in out:
            problems.append(f"  [{index}] has no 'image'")
        if not out.get("dictation") and not out.get("report"):
            problems.append(f"  [{index}] {out.get('image')}: needs a 'dictation' (audio file) or a 'report' (text)")
        checked.append(out)
    if problems:
        raise DataError("\n".join([f"{source}: {len(problems)} problems", *problems]))
    return checked


def run_inference(
    pipeline: DictationToMask,
    cases: Sequence[Mapping[str, Any]],
    cache: EmbeddingCache,
    output_dir: str | Path,
) -> list[dict[str, Any]]:
    """Run the pipeline on each case and write its mask (PNG, NIfTI), overlay and JSON record.

    Args:
        pipeline: the pipeline.
        cases: checked cases of :func:`inference_cases`.
        cache: the embedding cache of the pipeline's segmenter.
        output_dir: where the files go, one set per case id.

    Returns:
        The JSON records.
    """
    records = []
    for case in tqdm(cases, desc="dictation to mask"):
        case_id = str(case.get("id") or Path(case["image"]).stem)
        if case.get("dictation"):
            dictation: dict[str, Any] = {"audio": str(case["dictation"])}
        else:
            dictation = {"text": str(case["report"])}
        image = read_grey(case["image"])
        result = pipeline(image, language=case.get("language"), embedding=cache.get(case["image"]), **dictation)
        records.append(write_case(result, image, output_dir, case_id, {"image": str(case["image"])}))
        logger.info("%s: %s %s", case_id, result.outcome, result.prompt.tumour_class)
    return records
