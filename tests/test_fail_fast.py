"""Bad inputs against every bundle: each fails with the project's named error, in seconds, before any cache fills.

Each row runs a real bundle in-process (``monai.bundle.run``, as the command line does) on tiny files written
here, with MONAI's ``CacheDataset`` made to fail the test if it starts filling.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import monai.data
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import run as bundle_run
from PIL import Image

from dae.bundle import culprit
from dae.errors import CheckpointError, ConfigError, DataError, DiskSpaceError

REPO = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 64)


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / name) for name in names]


def _nifti(path: Path, array: np.ndarray, spacing: float = 3.0) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path.name


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 1000, SHAPE).astype(np.float32)


def _png(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    return path.name


def _write_json(path: Path, content: dict) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@dataclass
class Data:
    """Clean tiny datasets in one folder, and helpers to make bad copies of their datalists."""

    root: Path
    pretrain: dict = field(default_factory=dict)
    seg: dict = field(default_factory=dict)
    xray: dict = field(default_factory=dict)

    def datalist(self, name: str, content: dict) -> str:
        return _write_json(self.root / f"{name}.json", content)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("fail_fast")
    d = Data(root)
    ct = [_nifti(root / f"ct{i}.nii.gz", _ct(i)) for i in range(2)]
    d.pretrain = {
        "training": [{"image": ct[0], "modality": "CT"}],
        "validation": [{"image": ct[1], "modality": "CT"}],
    }
    label = np.resize(np.arange(8, dtype=np.uint8), SHAPE)
    _nifti(root / "seg_label.nii.gz", label)
    entry = {"image": ct[0], "label": "seg_label.nii.gz", "modality": "T2"}
    d.seg = {"labels": {str(i): f"class{i}" for i in range(8)}, "training": [entry], "validation": [dict(entry)]}
    xr = [_png(root / f"xr{i}.png", i) for i in range(6)]
    d.xray = {
        "labels": {"0": "normal", "1": "pneumonia"},
        **{
            split: [{"image": xr[2 * k + i], "label": i, "modality": "XR"} for i in range(2)]
            for k, split in enumerate(("training", "validation", "test"))
        },
    }
    return d


def _bad_copy(content: dict, split: str, index: int, **changes) -> dict:
    copy = json.loads(json.dumps(content))
    copy[split][index].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del copy[split][index][key]
    return copy


def _checkpoint(path: Path, state: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return str(path)


def _truncated(path: Path) -> str:
    _checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 1})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


class Pickled:
    """A custom class: weights-only loading refuses it."""


@dataclass
class Row:
    """One bad input: the bundle, how to make the input, and the error it must give."""

    name: str
    bundle: str
    configs: tuple[str, ...]
    make: Callable[[Data, Path], dict]
    error: type[BaseException]
    expected: tuple[str, ...]
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def _pretrain(data: Data, out: Path, content: dict | None = None, **overrides) -> dict:
    return {
        "dataset_dir": str(data.root),
        "datalist": data.datalist("pretrain", data.pretrain if content is None else content),
        "output_dir": str(out),
        "cache_num_workers": 1,
        **overrides,
    }


def _seg(data: Data, out: Path, content: dict | None = None, **overrides) -> dict:
    return {
        "dataset_dir": str(data.root),
        "datalist": data.datalist("seg", data.seg if content is None else content),
        "output_dir": str(out),
        "spacing": None,
        "cache_num_workers": 1,
        **overrides,
    }


def _xray(data: Data, out: Path, content: dict | None = None, **overrides) -> dict:
    return {
        "dataset_dir": str(data.root),
        "datalist": data.datalist("xray", data.xray if content is None else content),
        "output_dir": str(out),
        **overrides,
    }


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))


def _resume_from(data: Data, out: Path, write: Callable[[Path], str]) -> dict:
    write(out / "checkpoints" / "latest.pt")
    return _pretrain(data, out)


def _stale_and_pretrain(data: Data, out: Path) -> dict:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / ".latest.pt.k1ll3d.tmp").write_bytes(b"\0" * 100)
    return _pretrain(data, out)


PRETRAIN = ("dae_pretrain", ("train.yaml", "demo.yaml"))
FETA = ("feta_finetune", ("train.yaml", "demo.yaml"))
XRAY_EVAL = ("xray_eval", ("evaluate.yaml", "demo.yaml"))
DINO = ("dino_xray", ("train.yaml", "demo.yaml"))

ROWS = [
    # the command line
    Row(
        "override typo",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, epoch=2),
        ConfigError,
        ("'epoch'", "did you mean 'epochs'"),
    ),
    Row("epochs as a word", *PRETRAIN, lambda d, o: _pretrain(d, o, epochs="two"), ConfigError, ("epochs", "'two'")),
    Row("unknown amp", *PRETRAIN, lambda d, o: _pretrain(d, o, amp="bf17"), ConfigError, ("amp", "'bf17'")),
    Row(
        "unknown monitor metric",
        *DINO,
        lambda d, o: _xray(d, o, monitor_metric="knn_top5"),
        ConfigError,
        ("monitor_metric", "'knn_top5'", "knn_auroc"),
    ),
    Row(
        "roi too small",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, roi_size=[32, 32, 32]),
        ConfigError,
        ("roi_size", "[32, 32, 32]", "at least 64"),
    ),
    Row("flag typo", *PRETRAIN, lambda d, o: _pretrain(d, o, resume="flase"), ConfigError, ("resume", "'flase'")),
    Row(
        "unwritable output",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, output_dir="/proc/dae_run"),
        ConfigError,
        ("output_dir", "/proc/dae_run"),
    ),
    Row(
        "mixed modalities on a rolling cache",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, cache="smart", mix_modalities=True),
        ConfigError,
        ("mix_modalities", "cache memory or disk"),
    ),
    Row(
        "missing datalist",
        *PRETRAIN,
        lambda d, o: {**_pretrain(d, o), "datalist": str(o / "none.json")},
        ConfigError,
        ("datalist", "none.json"),
    ),
    # the data
    Row(
        "missing file",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, _bad_copy(d.pretrain, "training", 0, image="gone.nii.gz")),
        DataError,
        ("gone.nii.gz", "does not exist"),
    ),
    Row(
        "empty list",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, {**d.pretrain, "validation": []}),
        DataError,
        ("'validation'", "empty"),
    ),
    Row(
        "unknown modality",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, _bad_copy(d.pretrain, "training", 0, modality="PET")),
        DataError,
        ("ct0.nii.gz", "'PET'"),
    ),
    Row(
        "2D volume",
        *PRETRAIN,
        lambda d, o: _pretrain(
            d,
            o,
            _bad_copy(d.pretrain, "training", 0, image=_nifti(d.root / "flat.nii.gz", np.zeros((64, 64), np.float32))),
        ),
        DataError,
        ("flat.nii.gz", "3D"),
    ),
    Row(
        "truncated volume",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, _bad_copy(d.pretrain, "training", 0, image=_truncated_nifti(d.root))),
        DataError,
        ("cut.nii.gz",),
    ),
    Row(
        "NaN voxels",
        *PRETRAIN,
        lambda d, o: _pretrain(d, o, _bad_copy(d.pretrain, "validation", 0, image=_nan_nifti(d.root))),
        DataError,
        ("nan.nii.gz", "not finite"),
    ),
    Row(
        "label value above the classes",
        *FETA,
        lambda d, o: _seg(
            d, o, _bad_copy(d.seg, "training", 0, label=_nifti(d.root / "label9.nii.gz", np.full(SHAPE, 9, np.uint8)))
        ),
        DataError,
        ("label9.nii.gz", "9"),
    ),
    Row(
        "label map key missing",
        *FETA,
        lambda d, o: _seg(d, o, _bad_copy(d.seg, "validation", 0, id_table="other_atlas")),
        DataError,
        ("other_atlas", "ct0.nii.gz"),
    ),
    Row(
        "X-ray without label",
        *XRAY_EVAL,
        lambda d, o: _xray(d, o, _bad_copy(d.xray, "test", 1, label=None)),
        DataError,
        ("xr5.png", "label"),
    ),
    Row(
        "k-NN monitor image without label",
        *DINO,
        lambda d, o: _xray(d, o, _bad_copy(d.xray, "validation", 0, label=None)),
        DataError,
        ("xr2.png", "label"),
    ),
    # checkpoints and disks
    Row(
        "truncated pretrained",
        *FETA,
        lambda d, o: _seg(d, o, pretrained=_truncated(o / "cut.pt")),
        CheckpointError,
        ("cut.pt",),
    ),
    Row(
        "truncated latest.pt",
        *PRETRAIN,
        lambda d, o: _resume_from(d, o, _truncated),
        CheckpointError,
        ("latest.pt", "--resume_from"),
    ),
    Row(
        "pickled object",
        *PRETRAIN,
        lambda d, o: _resume_from(d, o, lambda p: _checkpoint(p, {"x": Pickled()})),
        CheckpointError,
        ("latest.pt",),
    ),
    Row(
        "checkpoint of another network",
        *FETA,
        lambda d, o: _seg(
            d, o, pretrained=_checkpoint(o / "other.pt", {"state_dict": {"head.weight": torch.zeros(3)}})
        ),
        ValueError,
        ("other.pt",),
    ),
    Row(
        "truncated checkpoint to evaluate",
        "feta_finetune",
        ("train.yaml", "demo.yaml", "evaluate.yaml"),
        lambda d, o: _seg(d, o, checkpoint=_truncated(o / "best.pt")),
        CheckpointError,
        ("best.pt", "truncated"),
    ),
    Row("full disk", *PRETRAIN, _stale_and_pretrain, DiskSpaceError, ("free",), patch=_full_disk),
]


def _truncated_nifti(root: Path) -> str:
    data = (root / "ct0.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return "cut.nii.gz"


def _nan_nifti(root: Path) -> str:
    volume = _ct(5)
    volume[3, 4, 5] = np.nan
    return _nifti(root / "nan.nii.gz", volume)


def _no_caching(self, *args, **kwargs):
    raise AssertionError("a dataset cache started filling before the error")


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_fails_fast_naming_the_culprit(row: Row, data: Data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(monai.data.CacheDataset, "_fill_cache", _no_caching)
    if row.patch is not None:
        row.patch(monkeypatch)
    overrides = row.make(data, tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(Exception) as caught:
        bundle_run(config_file=_configs(row.bundle, *row.configs), **overrides)
    seconds = time.perf_counter() - start
    error = culprit(caught.value)
    assert isinstance(error, row.error), f"{type(error).__name__}: {error}"
    shown = f"{error}\nAdvice: {getattr(error, 'advice', '')}"
    for text in row.expected:
        assert text in shown, f"{text!r} not in: {shown}"
    assert "weights_only=False" not in str(error)
    assert seconds < 30, f"{seconds:.1f} s to the error"
    if row.name == "full disk":
        assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp")), "the stale temporary file was kept"


def test_unsafe_yaml_tag_is_refused(tmp_path) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(yaml.constructor.ConstructorError, match=r"python/object/apply:os\.system"):
        bundle_run(config_file=[*_configs(PRETRAIN[0], *PRETRAIN[1]), str(config)])


def test_a_failing_bundle_ends_with_a_short_summary(data: Data, tmp_path) -> None:
    out = tmp_path / "run"
    overrides = _pretrain(data, out, epoch=2)
    args = [f"--{k}={v}" for k, v in overrides.items()]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(_configs(PRETRAIN[0], *PRETRAIN[1])),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    tail = proc.stderr.rstrip().splitlines()[-4:]
    assert tail == [
        f"ERROR ConfigError: 1 command-line override(s) name no key of {_configs(PRETRAIN[0], *PRETRAIN[1])}:",
        "  --epoch: unknown key 'epoch'; did you mean 'epochs'?",
        "Advice: correct the spelling; every setting and its meaning is listed in the bundle's configs/*.yaml.",
        f"Full traceback: {out / 'error.log'} (or rerun with --debug, or DAE_DEBUG=1)",
    ]
    assert "Traceback" not in proc.stderr
    assert "Failed to evaluate" in (out / "error.log").read_text()
