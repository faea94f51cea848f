"""Speech recognition for dictations: audio loading and Whisper transcribers behind one protocol.

Three back-ends, each loading from a local path only (no model hub):

- ``"faster-whisper"``: a CTranslate2 Whisper folder (e.g. :func:`dae.logsam.packaged_weights.whisper_base_dir`);
- ``"openai-whisper"``: an openai-whisper ``.pt`` checkpoint (``{"dims", "model_state_dict"}``, e.g. large-v3);
- ``"hf-whisper"``: a transformers ``WhisperForConditionalGeneration`` folder with its processor.

Each audio is decoded once, in its own language: prompt extraction reads German directly, because small Whisper
models translate German to English badly. An ``initial_prompt`` naming the class terms (see
:meth:`dae.logsam.classes.ClassTable.initial_prompt`) makes Whisper spell them right; it may be one string or one
per language code. Audio files are decoded with ``soundfile`` (WAV, FLAC, OGG, MP3), no ffmpeg binary needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dae.errors import CheckpointContentError, CheckpointNotFoundError, DataError
from dae.utils.state_dict import load_state_dict_with_report

__all__ = [
    "SAMPLE_RATE",
    "TRANSCRIBER_KINDS",
    "FasterWhisperTranscriber",
    "HFWhisperTranscriber",
    "OpenAIWhisperTranscriber",
    "Transcriber",
    "Transcript",
    "build_transcriber",
    "load_audio",
    "load_openai_whisper",
]

SAMPLE_RATE = 16_000
"""Whisper's sample rate (Hz)."""

_FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_HF_MAX_SECONDS = 30.0
_INSTALL = 'pip install -e ".[logsam]"'

InitialPrompt = str | Mapping[str, str] | None
"""One prompt for every language, a prompt per language code, or none."""


@dataclass(frozen=True)
class Transcript:
    """The text of one dictation.

    Attributes:
        text: the transcription, stripped.
        language: the language code it was decoded in (given or detected).
        duration_s: the audio length in seconds.
    """

    text: str
    language: str
    duration_s: float


@runtime_checkable
class Transcriber(Protocol):
    """Anything that turns a dictation into a :class:`Transcript`."""

    def transcribe(self, audio: str | Path | np.ndarray, language: str | None = None) -> Transcript:
        """Transcribe ``audio`` (a file, or float32 mono samples at 16 kHz) in ``language`` (None: detect)."""
        ...


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as mono float32 samples at ``sample_rate``.

    Channels are averaged; other rates are resampled with a polyphase filter (``scipy.signal.resample_poly``).

    Args:
        path: a WAV, FLAC, OGG or MP3 file (anything libsndfile decodes).
        sample_rate: the rate of the result in Hz.

    Returns:
        Samples of shape (T,), float32, roughly in [-1, 1].

    Raises:
        FileNotFoundError: when the file does not exist.
        DataError: (a ValueError) naming the file when it cannot be decoded or holds no samples.
        ImportError: when ``soundfile`` is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        import soundfile
    except ImportError as error:
        raise ImportError(f"reading audio needs soundfile: {_INSTALL}") from error
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as error:
        raise DataError(f"cannot decode audio file {path} (WAV, FLAC, OGG and MP3 are read): {error}") from error
    if data.shape[0] == 0:
        raise DataError(f"audio file {path} holds no samples")
    samples = data.mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly

        common = gcd(int(rate), int(sample_rate))
        samples = resample_poly(samples, sample_rate // common, int(rate) // common)
    return samples.astype(np.float32, copy=False)


def _samples(audio: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(audio, (str, Path)):
        return load_audio(audio)
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"audio samples must be a non-empty 1-D array (mono, 16 kHz), got shape {samples.shape}")
    return samples


def _prompt_for(initial_prompt: InitialPrompt, language: str | None) -> str | None:
    if initial_prompt is None or isinstance(initial_prompt, str):
        return initial_prompt
    return None if language is None else initial_prompt.get(language)


class _WhisperBase(ABC):
    """Shared handling of the default language and per-language prompts."""

    def __init__(self, language: str | None, initial_prompt: InitialPrompt, beam_size: int) -> None:
        self.language = language
        self.initial_prompt = initial_prompt
        self.beam_size = beam_size

    def transcribe(self, audio: str | Path | np.ndarray, language: str | None = None) -> Transcript:
        """Transcribe ``audio`` once, in its own language.

        Args:
            audio: an audio file, or float32 mono samples at 16 kHz of shape (T,).
            language: the language code; None uses the transcriber's default, and when that is None too the
                language is detected (first, when the prompt depends on it).

        Returns:
            The :class:`Transcript`.
        """
        samples = _samples(audio)
        language = language or self.language
        if language is None and isinstance(self.initial_prompt, Mapping):
            language = self._detect_language(samples)
        text, decoded_language = self._decode(samples, language, _prompt_for(self.initial_prompt, language))
        return Transcript(text=text.strip(), language=decoded_language, duration_s=samples.size / SAMPLE_RATE)

    @abstractmethod
    def _detect_language(self, samples: np.ndarray) -> str:
        """The most likely language code of ``samples``."""

    @abstractmethod
    def _decode(self, samples: np.ndarray, language: str | None, prompt: str | None) -> tuple[str, str]:
        """One decode of ``samples``: ``(text, language code)``; ``language`` None lets the model detect it."""


class FasterWhisperTranscriber(_WhisperBase):
    """Whisper through ``faster-whisper`` (CTranslate2) from a local model folder.

    Args:
        model_dir: a folder with ``model.bin``, ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``.
        language: default language code (None: detect per audio).
        initial_prompt: one prompt, a prompt per language code, or None.
        beam_size: beam width.
        device: ``"cpu"`` or ``"cuda"``.
        compute_type: CTranslate2 compute type (``"int8"`` on CPU, e.g. ``"float16"`` on a GPU).
        cpu_threads: CPU threads (0: CTranslate2's default).
        temperature: a temperature or a fall-back sequence (used when a decode looks like a failure).

    Raises:
        FileNotFoundError: when ``model_dir`` has no ``model.bin``.
        ImportError: when ``faster-whisper`` is not installed.
    """

    def __init__(
        self,
        model_dir: str | Path,
        language: str | None = None,
        initial_prompt: InitialPrompt = None,
        beam_size: int = 5,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        temperature: float | tuple[float, ...] = _FALLBACK_TEMPERATURES,
    ) -> None:
        super().__init__(language, initial_prompt, beam_size)
        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{model_dir} has no model.bin: not a CTranslate2 Whisper folder")
        try:
            from faster_whisper import WhisperModel
        except ImportError as error:
            raise ImportError(f"the faster-whisper transcriber needs faster-whisper: {_INSTALL}") from error
        self.temperature = temperature
        self.model = WhisperModel(
            str(model_dir), device=device, compute_type=compute_type, cpu_threads=cpu_threads, local_files_only=True
        )

    def _detect_language(self, samples: np.ndarray) -> str:
        language, _, _ = self.model.detect_language(samples)
        return language

    def _decode(self, samples: np.ndarray, language: str | None, prompt: str | None) -> tuple[str, str]:
        segments, info = self.model.transcribe(
            samples,
            language=language,
            task="transcribe",
            beam_size=self.beam_size,
            initial_prompt=prompt,
            temperature=list(self.temperature) if isinstance(self.temperature, tuple) else self.temperature,
            vad_filter=False,
        )
        return " ".join(segment.text.strip() for segment in segments), info.language


def load_openai_whisper(checkpoint: str | Path, device: str = "cpu") -> Any:
    """Build an openai-whisper model from a ``.pt`` checkpoint holding ``dims`` and ``model_state_dict``.

    The file is read with ``weights_only=True`` and loaded strictly: every model key must be in the checkpoint
    and every checkpoint key in the model.

    Args:
        checkpoint: the ``.pt`` file (the official ones, e.g. ``large-v3.pt``, have this layout).
        device: where to put the model.

    Returns:
        The ``whisper.Whisper`` model in eval mode.

    Raises:
        CheckpointNotFoundError: when the file does not exist.
        CheckpointContentError: when it lacks ``dims``/``model_state_dict`` or its keys do not match the model.
        ImportError: when ``openai-whisper`` is not installed.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointNotFoundError(f"Whisper checkpoint {checkpoint} does not exist")
    try:
        import whisper
    except ImportError as error:
        raise ImportError(f"the openai-whisper transcriber needs openai-whisper: {_INSTALL}") from error
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or not {"dims", "model_state_dict"} <= content.keys():
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise CheckpointContentError(
            f"{checkpoint} is not an openai-whisper checkpoint: expected keys 'dims' and 'model_state_dict', got {keys}"
        )
    try:
        dims = whisper.ModelDimensions(**content["dims"])
    except TypeError as error:
        raise CheckpointContentError(f"{checkpoint}: 'dims' does not describe a Whisper model: {error}") from error
    model = whisper.Whisper(dims)
    report = load_state_dict_with_report(model, content["model_state_dict"], name=str(checkpoint))
    if report.missing or report.unexpected:
        raise CheckpointContentError(f"{checkpoint} does not match the model its dims describe:\n{report.summary()}")
    return model.to(device).eval()


class OpenAIWhisperTranscriber(_WhisperBase):
    """Whisper through the ``openai-whisper`` package, from a ``.pt`` checkpoint (see :func:`load_openai_whisper`).

    Samples are passed as an array, so no ffmpeg binary is needed.

    Args:
        checkpoint: the ``.pt`` file, or an already built ``whisper.Whisper`` model.
        language: default language code (None: detect per audio).
        initial_prompt: one prompt, a prompt per language code, or None.
        beam_size: beam width.
        device: where to run; fp16 is used on CUDA only.
        temperature: a temperature or a fall-back sequence (used when a decode looks like a failure).
    """

    def __init__(
        self,
        checkpoint: str | Path | Any,
        language: str | None = None,
        initial_prompt: InitialPrompt = None,
        beam_size: int = 5,
        device: str = "cpu",
        temperature: float | tuple[float, ...] = _FALLBACK_TEMPERATURES,
    ) -> None:
        super().__init__(language, initial_prompt, beam_size)
        is_path = isinstance(checkpoint, (str, Path))
        self.model = load_openai_whisper(checkpoint, device) if is_path else checkpoint.to(device).eval()
        self.device = device
        self.temperature = temperature

    def _detect_language(self, samples: np.ndarray) -> str:
        import whisper

        audio = whisper.pad_or_trim(torch.from_numpy(samples))
        mel = whisper.log_mel_spectrogram(audio, self.model.dims.n_mels).to(self.model.device)
        _, probabilities = self.model.detect_language(mel)
        return max(probabilities, key=probabilities.get)

    def _decode(self, samples: np.ndarray, language: str | None, prompt: str | None) -> tuple[str, str]:
        import whisper

        result = whisper.transcribe(
            self.model,
            samples,
            language=language,
            task="transcribe",
            initial_prompt=prompt,
            beam_size=self.beam_size,
            temperature=self.temperature,
            fp16=self.device.startswith("cuda"),
            verbose=None,
        )
        return result["text"], result["language"]


class HFWhisperTranscriber(_WhisperBase):
    """Whisper through transformers (``WhisperForConditionalGeneration`` + ``WhisperProcessor``).

    Short-form only: audio up to 30 s, one window (use the faster-whisper or openai-whisper transcriber for
    longer dictations).

    Args:
        model_dir: a local folder with the model and its processor files; or None with ``model`` and ``processor``.
        model: an already built ``WhisperForConditionalGeneration``.
        processor: its ``WhisperProcessor``.
        language: default language code (None: detect per audio).
        initial_prompt: one prompt, a prompt per language code, or None.
        beam_size: beam width.
        max_new_tokens: cap on generated tokens (None: the model's generation config).
        device: where to run.

    Raises:
        ValueError: when neither ``model_dir`` nor both ``model`` and ``processor`` are given.
        ImportError: when transformers is not installed.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        model: Any = None,
        processor: Any = None,
        language: str | None = None,
        initial_prompt: InitialPrompt = None,
        beam_size: int = 5,
        max_new_tokens: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(language, initial_prompt, beam_size)
        given = (model is not None, processor is not None)
        if (model_dir is None and given != (True, True)) or (model_dir is not None and any(given)):
            raise ValueError("HFWhisperTranscriber takes either model_dir or both model and processor")
        if model_dir is not None:
            if not Path(model_dir).is_dir():
                raise FileNotFoundError(f"Whisper model folder {model_dir} does not exist")
            try:
                from transformers import WhisperForConditionalGeneration, WhisperProcessor
            except ImportError as error:
                raise ImportError(f"the hf-whisper transcriber needs transformers: {_INSTALL}") from error
            model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
            processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = model.to(device).eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    def _features(self, samples: np.ndarray) -> torch.Tensor:
        if samples.size > _HF_MAX_SECONDS * SAMPLE_RATE:
            raise ValueError(
                f"the hf-whisper transcriber takes up to {_HF_MAX_SECONDS:.0f} s of audio, got "
                f"{samples.size / SAMPLE_RATE:.1f} s; use the faster-whisper or openai-whisper transcriber"
            )
        features = self.processor.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return features.input_features.to(self.model.device, self.model.dtype)

    def _detect_language(self, samples: np.ndarray) -> str:
        with torch.inference_mode():
            token = self.model.detect_language(self._features(samples))
        return self.processor.tokenizer.convert_ids_to_tokens(int(token[0])).strip("<|>")

    def _decode(self, samples: np.ndarray, language: str | None, prompt: str | None) -> tuple[str, str]:
        features = self._features(samples)
        if language is None:
            language = self._detect_language(samples)
        options: dict[str, Any] = {"language": language, "task": "transcribe", "num_beams": self.beam_size}
        if prompt:
            options["prompt_ids"] = self.processor.get_prompt_ids(prompt, return_tensors="pt").to(self.model.device)
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        with torch.inference_mode():
            tokens = self.model.generate(features, **options)
        return self.processor.batch_decode(tokens, skip_special_tokens=True)[0], language


TRANSCRIBER_KINDS: dict[str, type[_WhisperBase]] = {
    "faster-whisper": FasterWhisperTranscriber,
    "openai-whisper": OpenAIWhisperTranscriber,
    "hf-whisper": HFWhisperTranscriber,
}
"""The transcriber classes by the ``kind`` of :func:`build_transcriber`."""


def build_transcriber(kind: str, path: str | Path, **kwargs: Any) -> Transcriber:
    """Build a transcriber from a local model path.

    Args:
        kind: ``"faster-whisper"`` (a CTranslate2 folder), ``"openai-whisper"`` (a ``.pt`` file) or
            ``"hf-whisper"`` (a transformers folder).
        path: the model folder or file.
        **kwargs: the transcriber's other arguments (``language``, ``initial_prompt``, ``beam_size``, ...).

    Returns:
        The transcriber.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind not in TRANSCRIBER_KINDS:
        raise ValueError(f"unknown transcriber kind {kind!r}; choose one of {sorted(TRANSCRIBER_KINDS)}")
    return TRANSCRIBER_KINDS[kind](path, **kwargs)
