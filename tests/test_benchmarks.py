"""The benchmark scripts: FLOP counting and its cache, peaks and MFU, the command line, and tiny CPU runs."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import parse_compare, parse_value  # noqa: E402
from flops import cache_key, count_flops, format_mfu, gpu_peak, precision, read_cache, sample_flops  # noqa: E402

REPO = BENCHMARKS.parent
DAE_CONFIGS = ["bundles/dae_pretrain/configs/train.yaml", "bundles/dae_pretrain/configs/demo.yaml"]
DINO_CONFIGS = ["bundles/dino_xray/configs/train.yaml", "bundles/dino_xray/configs/demo.yaml"]
# Smaller than the demos: one 64^3 crop per iteration, 4 images of 32 + 16 px crops, no loader workers.
DAE_TINY = ["--batch_size", "1", "--num_samples", "1", "--cache_num_workers", "1"]
DINO_TINY = ["--batch_size", "4", "--global_crop_size", "32", "--local_crop_size", "16", "--num_workers", "0"]
DINO_TINY += ["--cache_rate", "0.05", "--cache_num_workers", "1"]


class LinearTrainer:
    """The part of a trainer that FLOP counting uses, around one linear layer."""

    def __init__(self, fail: bool = False) -> None:
        self.model = nn.Linear(8, 4)
        self.device = torch.device("cpu")
        self.fail = fail

    def compute_losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fail:
            raise AssertionError("counted although the cache has the entry")
        return {"loss": self.model(batch).sum()}


def test_count_flops_linear():
    """nn.Linear(i, o) on b samples: 2*b*i*o forward; backward twice that (input and weight gradients)."""
    layer, x = nn.Linear(8, 4), torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == 2 * 3 * 8 * 4
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 3 * 8 * 4


def test_count_flops_cpu_attention():
    """Fused attention on a CPU counts as its two matrix products (torch counts only the GPU kernels)."""
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 1 * 2 * 16 * 16 * 8)


def test_sample_flops_cache_round_trip(tmp_path, capsys):
    cache = tmp_path / "flops.json"
    description = {"benchmark": "linear", "shape": [3, 8]}
    trainer = LinearTrainer()
    # A batch without grad: forward 2*3*8*4, backward the weight gradient only, as much again; per sample / 3.
    flop = sample_flops(trainer, torch.randn(3, 8), 3, description, cache)
    assert flop == 2 * (2 * 3 * 8 * 4) / 3
    assert trainer.model.weight.grad is None
    assert "counted" in capsys.readouterr().out
    entry = read_cache(cache)[cache_key(description)]
    assert entry["description"] == description and entry["flop_per_sample"] == flop
    same = dict(reversed(description.items()))  # the key does not depend on the order
    assert sample_flops(LinearTrainer(fail=True), torch.randn(3, 8), 3, same, cache) == flop
    assert "from flops.json" in capsys.readouterr().out
    sample_flops(trainer, torch.randn(3, 8), 3, {**description, "shape": [6, 8]}, cache)
    assert len(read_cache(cache)) == 2


def test_precision_and_peaks():
    cpu = torch.device("cpu")
    assert precision("bf16", True, cpu) == "bf16"
    assert precision("none", True, cpu) == "fp32"  # no TF32 on a CPU
    assert gpu_peak("NVIDIA H200", "bf16") == 989.4
    assert gpu_peak("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert gpu_peak("NVIDIA H100 PCIe", "fp32") == 51.2
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert gpu_peak("NVIDIA H100 NVL", "bf16") is None
    assert gpu_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert format_mfu(98.94, 989.4) == "10.0%"
    assert format_mfu(1.0, None) == "n/a"


def test_command_line_values():
    assert parse_value("false") is False and parse_value("True") is True
    assert parse_value("none") == "none" and parse_value("10") == 10
    assert parse_compare("compile=false,true") == ("compile", False, True)
    assert parse_compare("roi_size=[64,64,64],[96,96,96]") == ("roi_size", [64, 64, 64], [96, 96, 96])
    for bad in ("amp=bf16", "amp", "=a,b", "amp=a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_compare(bad)


def run_script(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def test_compare_unknown_key_fails_before_building():
    done = run_script("pretrain_throughput.py", "--config_file", *DAE_CONFIGS, "--compare", "no_such_key=1,2", ok=False)
    assert "--compare no_such_key: not a key of the config" in done.stderr
    assert "Loading dataset" not in done.stderr


def check_summary(out: str, unit: str) -> float:
    """The summary lines are there, with MFU "n/a" on a CPU; returns the printed FLOP/sample in TFLOP."""
    assert re.search(rf"[\d.]+ {unit}/s, [\d.]+ s/iter", out), out
    match = re.search(r"FLOP/sample ([\d.e-]+) TFLOP \(forward \+ backward\), TFLOP/s ([\d.e-]+), MFU n/a", out)
    assert match, out
    assert float(match[1]) > 0 and float(match[2]) > 0
    return float(match[1])


@pytest.mark.slow
def test_pretrain_throughput_plain(tmp_path):
    cache = tmp_path / "flops.json"
    out = run_script(
        "pretrain_throughput.py", "--config_file", *DAE_CONFIGS, *DAE_TINY, "--steps", "2", "--warmup", "1",
        "--no_record", "--flops_cache", str(cache),
    ).stdout  # fmt: skip
    flop = check_summary(out, "samples")
    (entry,) = read_cache(cache).values()
    assert entry["description"]["batch_shape"] == [1, 1, 64, 64, 64]
    assert entry["flop_per_sample"] == pytest.approx(flop * 1e12, rel=1e-3)


@pytest.mark.slow
def test_pretrain_throughput_compare(tmp_path):
    results = tmp_path / "results.md"
    out = run_script(
        "pretrain_throughput.py", "--config_file", *DAE_CONFIGS, *DAE_TINY, "--compare", "log_interval=1,10",
        "--steps", "2", "--warmup", "1", "--block", "1", "--flops_cache", str(tmp_path / "flops.json"),
        "--results", str(results),
    ).stdout  # fmt: skip
    assert "FLOP/sample from flops.json" in out  # the second trainer has the same network and batch
    assert re.search(r"^log_interval=1: ", out, re.MULTILINE) and re.search(r"^log_interval=10: ", out, re.MULTILINE)
    ratio = re.search(
        r"ratio B/A \(log_interval=10 over log_interval=1\): step time ([\d.]+), throughput ([\d.]+)", out
    )
    assert ratio and float(ratio[1]) > 0 and float(ratio[2]) > 0, out
    lines = results.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| date"))
    rows = [line for line in lines if "compare log_interval=1\\|10" in line]
    assert len(rows) == 2 and rows[0].split(" | ")[-1].startswith("log_interval=1: ")
    # Same number of cells as the header ("\|" is a pipe inside a cell).
    assert all(len(re.split(r"(?<!\\)\|", row)) == len(header.split("|")) for row in rows)


@pytest.mark.slow
def test_dino_throughput_plain(tmp_path):
    out = run_script(
        "dino_throughput.py", "--config_file", *DINO_CONFIGS, *DINO_TINY, "--steps", "2", "--warmup", "1",
        "--no_record", "--flops_cache", str(tmp_path / "flops.json"),
    ).stdout  # fmt: skip
    check_summary(out, "images")
    (entry,) = json.loads((tmp_path / "flops.json").read_text()).values()
    assert entry["description"]["arch"] == "vit_tiny" and entry["description"]["global_crop_size"] == 32
