"""Text-grounded boxes: Grounding DINO (Hugging Face ``transformers``) loaded from a folder, captions and detection.

LoGSAM's third stage asks Grounding DINO for the box of the tumour class a dictation named; the box then prompts
MedSAM. :class:`GroundingDinoDetector` runs that step on one image: the caption is the class's phrase only
(``"glioma ."``) by default, or all tumour classes as the reference did (``all_classes=True``, spelled right:
the reference's caption read ``" glioma. pituatory. meningioma. healthy "``).

Thresholds: the reference kept boxes whose best token probability exceeded ``box_threshold = 0.06`` (phrase
tokens over ``text_threshold = 0.06``) and used the top-1 box; Hugging Face's
``post_process_grounded_object_detection`` defaults to 0.25 / 0.25, and so does the detector here
(:data:`REFERENCE_BOX_THRESHOLD` and :data:`REFERENCE_TEXT_THRESHOLD` hold the reference's). The ``min_score``
gate turns a weak best box (score not above it) into the explicit ``"no_box"`` outcome (the pipeline's
"healthy").

Everything loads from local folders (no hub access). :func:`tiny_grounding_dino` builds a randomly initialised
model and processor of a few hundred thousand parameters for tests and documentation. ``transformers`` is
imported inside the functions, so importing this module does not need the ``logsam`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dae.logsam.classes import ClassTable
from dae.logsam.detection import Detection, DetectionResult

if TYPE_CHECKING:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    from dae.logsam.segmenters import ImageEmbedding

__all__ = [
    "REFERENCE_BOX_THRESHOLD",
    "REFERENCE_TEXT_THRESHOLD",
    "TINY_WORDS",
    "CaptionTable",
    "GroundingDinoDetector",
    "build_caption",
    "caption_classes",
    "class_phrases",
    "join_phrases",
    "load_grounding_dino",
    "tiny_grounding_dino",
]

#: The reference's (LoGSAM ``test.py``) box and text thresholds, used with top-1 selection.
REFERENCE_BOX_THRESHOLD = 0.06
REFERENCE_TEXT_THRESHOLD = 0.06

#: Words of the tiny test vocabulary: those of the default class captions.
TINY_WORDS: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "tumour")

# Grounding DINO hard-codes bert-base-uncased ids for [CLS], [SEP], "." and "?" (text masks, label maps).
_SPECIAL_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
_FIRST_FREE_ID = 1030
_INSTALL_HINT = 'pip install -e ".[logsam]"'
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # hub copies / transformers 5
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class CaptionTable(Protocol):
    """What the caption builder needs of :class:`dae.logsam.classes.ClassTable`."""

    @property
    def tumour_names(self) -> Sequence[str]:
        """The detectable classes, in table order."""
        ...

    def caption(self, name: str) -> str:
        """The detector phrase of class ``name``."""
        ...


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"Grounding DINO needs the transformers package: {_INSTALL_HINT}") from err
    return transformers


# ---------------------------------------------------------------------------------------------------- loading
def load_grounding_dino(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """A Grounding DINO model and its processor from a local Hugging Face folder (no hub access).

    The folder holds what ``save_pretrained`` writes for the model and the processor (e.g. a copy of
    ``IDEA-Research/grounding-dino-tiny``, or :func:`dae.logsam.lora.export_merged`'s output): ``config.json``,
    the weights (``model.safetensors``, a sharded index or ``pytorch_model.bin``), the image processor's
    settings (``preprocessor_config.json`` in hub copies, ``processor_config.json`` as ``transformers`` 5 saves
    them) and the BERT tokenizer (``tokenizer.json`` or ``vocab.txt``). The processor uses the PIL image processor
    (no torchvision) and a fast BERT tokenizer.

    Args:
        model_dir: the folder.
        device: where to put the model.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: when the folder or some of its files are missing, naming the folder and the files.
        ImportError: when ``transformers`` is not installed.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Grounding DINO folder {folder} does not exist")
    needed = {
        "config.json": ("config.json",),
        "weights": _WEIGHT_FILES,
        "image processor config": _IMAGE_PROCESSOR_FILES,
        "tokenizer": _TOKENIZER_FILES,
    }
    missing = [
        what if len(names) == 1 else f"{what} (one of {', '.join(names)})"
        for what, names in needed.items()
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"Grounding DINO folder {folder} lacks {'; '.join(missing)} (files present: {present}); save the model "
            "and its processor there with save_pretrained"
        )
    tf = _transformers()
    model = tf.GroundingDinoForObjectDetection.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = tf.GroundingDinoProcessor(
        image_processor=tf.GroundingDinoImageProcessorPil.from_pretrained(folder, local_files_only=True),
        tokenizer=tf.BertTokenizerFast.from_pretrained(folder, local_files_only=True),
    )
    return model, processor


def tiny_grounding_dino(
    words: Sequence[str] = TINY_WORDS, image_size: int = 64, seed: int = 0
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """A randomly initialised, tiny Grounding DINO (about 0.45 M parameters) and its processor, for tests.

    The Swin backbone, BERT text encoder and transformer are a few channels wide (``d_model`` 32, one encoder and
    two decoder layers: one decoder layer cannot tie its box heads; 10 queries). Three feature levels instead of
    the usual four: at 64 pixels a fourth level is 1 x 1, which group normalisation rejects in training.

    The vocabulary puts ``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``"."`` 1012 and ``"?"`` 1029 at
    bert-base-uncased's ids, which the model hard-codes, fills the other ids below 1030 with ``[unusedN]`` and
    gives each of ``words`` (split at spaces, lower-cased) an id from 1030 on.

    Args:
        words: the words the tokenizer knows (others become ``[UNK]``), e.g. the class captions.
        image_size: the processor resizes images to fit ``image_size`` x ``image_size``.
        seed: seed of the random weights.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    tf = _transformers()
    tokens = list(dict.fromkeys(w for phrase in words for w in phrase.lower().split()))
    vocab = {_SPECIAL_IDS.get(i, f"[unused{i}]"): i for i in range(_FIRST_FREE_ID)}
    vocab.update({word: _FIRST_FREE_ID + i for i, word in enumerate(tokens)})
    tokenizer = tf.BertTokenizerFast(vocab=vocab, do_lower_case=True)  # vocab_file= is ignored in transformers 5
    image_processor = tf.GroundingDinoImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": image_size})
    config = tf.GroundingDinoConfig(
        backbone_config=tf.SwinConfig(
            image_size=image_size,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=tf.BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.GroundingDinoForObjectDetection(config).eval()
    return model, tf.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------- captions
def caption_classes(class_name: str, classes: CaptionTable | Mapping[str, str], all_classes: bool = False) -> list[str]:
    """The classes a caption names, in caption order: ``[class_name]``, or every detectable class.

    Args:
        class_name: the class to detect.
        classes: a :class:`~dae.logsam.classes.ClassTable`, or a mapping ``class name -> caption phrase`` of the
            detectable classes.
        all_classes: name all detectable classes (the table's ``tumour_names``, or the mapping's keys).

    Raises:
        ValueError: when ``class_name`` is not a detectable class.
    """
    names = list(class_phrases(classes))
    if class_name not in names:
        raise ValueError(f"class {class_name!r} has no detector caption; detectable classes: {names}")
    return names if all_classes else [class_name]


def _phrase(name: str, classes: CaptionTable | Mapping[str, str]) -> str:
    return (classes[name] if isinstance(classes, Mapping) else classes.caption(name)).strip().lower()


def build_caption(class_name: str, classes: CaptionTable | Mapping[str, str], all_classes: bool = False) -> str:
    """The detector caption for ``class_name``: its phrase (``"glioma ."``), or every detectable class's phrase.

    Phrases are lower-cased and each ends with ``" ."``, as the reference's training captions were built:
    ``build_caption("glioma", table, all_classes=True)`` gives ``"glioma . meningioma . pituitary tumour ."``.

    Args:
        class_name: the class to detect.
        classes: a :class:`~dae.logsam.classes.ClassTable` (``caption(name)``, ``tumour_names``) or a mapping
            ``class name -> caption phrase`` of the detectable classes.
        all_classes: name all detectable classes in table order (the reference's inference caption), not only
            ``class_name``.

    Raises:
        ValueError: when ``class_name`` is not a detectable class.
    """
    return join_phrases([_phrase(name, classes) for name in caption_classes(class_name, classes, all_classes)])


def join_phrases(phrases: Sequence[str]) -> str:
    """A caption of ``phrases``, each lower-cased and ended by ``" ."``: ``"glioma . pituitary tumour ."``."""
    return " ".join(f"{phrase.strip().lower()} ." for phrase in phrases)


def class_phrases(classes: CaptionTable | Mapping[str, str]) -> dict[str, str]:
    """``class name -> caption phrase`` of every detectable class, in table order."""
    names = list(classes.keys()) if isinstance(classes, Mapping) else list(classes.tumour_names)
    return {name: _phrase(name, classes) for name in names}


# ---------------------------------------------------------------------------------------------------- detection
class GroundingDinoDetector:
    """Boxes of one named class in a 2D image, from Grounding DINO.

    Args:
        model: a ``GroundingDinoForObjectDetection`` (e.g. from :func:`load_grounding_dino`, or a merged LoRA
            model); it is put in eval mode at each call.
        processor: its ``GroundingDinoProcessor``.
        box_threshold: keep boxes whose best token probability exceeds this (reference 0.06, Hugging Face 0.25).
        text_threshold: caption tokens over this probability make a box's label (reference 0.06, HF 0.25).
        top_k: keep at most this many boxes, best first (the reference used the top-1 box).
        min_score: a best score that does not exceed this is the ``"no_box"`` outcome (the pipeline's "healthy");
            0 accepts any box over the thresholds, 1 never gives a box.
        classes: a :class:`~dae.logsam.classes.ClassTable` or a mapping ``class -> caption phrase``; default
            ``ClassTable.default()``.
        all_classes: caption every detectable class, as the reference did, instead of the asked class only.

    Raises:
        ValueError: for thresholds outside [0, 1] or ``top_k < 1``.
    """

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        processor: GroundingDinoProcessor,
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        top_k: int = 1,
        min_score: float = 0.0,
        classes: CaptionTable | Mapping[str, str] | None = None,
        all_classes: bool = False,
    ) -> None:
        for name, value in (
            ("box_threshold", box_threshold),
            ("text_threshold", text_threshold),
            ("min_score", min_score),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        self.model = model
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.top_k = top_k
        self.min_score = min_score
        self.classes = classes if classes is not None else ClassTable.default()
        self.all_classes = all_classes

    @torch.no_grad()
    def detect(self, image: np.ndarray, class_name: str, embedding: ImageEmbedding | None = None) -> DetectionResult:
        """The boxes of ``class_name`` in ``image``.

        Args:
            image: ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)``.
            class_name: a detectable class of ``classes``.
            embedding: unused (Grounding DINO runs its own Swin backbone); part of the
                :class:`~dae.logsam.detection.BoxDetector` protocol.

        Returns:
            The :class:`DetectionResult`; its ``outcome`` is ``"no_box"`` when no box passes the thresholds or
            the best score does not exceed ``min_score``.

        Raises:
            ValueError: for another image shape or dtype, or a class without a caption.
        """
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
        rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        names = caption_classes(class_name, self.classes, self.all_classes)
        caption = build_caption(class_name, self.classes, self.all_classes)
        device = next(self.model.parameters()).device
        inputs = self.processor(images=rgb, text=caption, return_tensors="pt").to(device)
        self.model.eval()
        outputs = self.model(**inputs)
        height, width = image.shape[:2]
        found = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)],
        )[0]
        phrase_of_box = _best_phrases(outputs.logits[0], inputs["input_ids"], self.box_threshold)
        detections = [
            Detection(
                box=np.clip(box.double().cpu().numpy(), 0, [width, height, width, height]),
                score=float(score),
                label=label,
                class_name=names[int(phrase)],
            )
            for box, score, label, phrase in zip(found["boxes"], found["scores"], found["text_labels"], phrase_of_box)
        ]
        detections = sorted(detections, key=lambda d: -d.score)[: self.top_k]
        # Strictly greater, as the thresholds: a saturated score of 1.0 does not pass min_score = 1.
        outcome = "box" if detections and detections[0].score > self.min_score else "no_box"
        return DetectionResult(tuple(detections), caption, class_name, outcome)


def _best_phrases(logits: torch.Tensor, input_ids: torch.Tensor, box_threshold: float) -> torch.Tensor:
    """For each box the post-processing keeps, the index of the caption phrase with its highest token probability.

    Args:
        logits: ``(num_queries, max_text_len)`` of one image.
        input_ids: ``(1, sequence_length)`` of its caption.
        box_threshold: the post-processing's threshold on each box's best token probability.

    Returns:
        ``(kept boxes,)`` phrase indices in caption order, in the post-processing's box order.
    """
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    probs = logits.float().sigmoid()
    kept = probs[probs.amax(dim=-1) > box_threshold]
    phrase_tokens = build_label_maps(logits[None], input_ids)[0].to(probs.device).bool()  # (phrases, max_text_len)
    return torch.where(phrase_tokens[None], kept[:, None, :], 0.0).amax(dim=-1).argmax(dim=-1)
