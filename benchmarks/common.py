"""What the benchmark scripts share: the command line, the bundle trainer, the timed loop, the results table."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser

RESULTS = Path(__file__).resolve().parent / "results.md"


def parse_args(description: str, default_configs: list[str]) -> tuple[argparse.Namespace, dict[str, object]]:
    """The benchmark options, and the ``--key value`` pairs that override bundle config keys."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", nargs="+", default=default_configs)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--note", default="", help="free text for the results table")
    parser.add_argument("--no_record", action="store_true", help="do not append to benchmarks/results.md")
    args, rest = parser.parse_known_args()
    overrides: dict[str, object] = {}
    for i in range(0, len(rest), 2):
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            parser.error(f"overrides must be '--key value' pairs, got {rest[i:]}")
        overrides[rest[i][2:]] = DefaultParseValue(rest[i + 1])
    return args, overrides


def parse_bundle(config_files: list[str], overrides: Mapping[str, object], **fixed: object) -> ConfigParser:
    """The bundle config with a throw-away output folder, no resumption, ``fixed`` and then ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser["output_dir"] = tempfile.mkdtemp(prefix="dae_bench_")
    parser["resume"] = False
    for key, value in {**fixed, **overrides}.items():
        parser[key] = value
    parser.parse()
    return parser


@dataclass
class Timing:
    """What :func:`time_training` measured over the timed iterations."""

    samples: int
    steps: int
    seconds: float
    data_wait: float

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps


def time_training(trainer: Any, steps: int, warmup: int, batch_size: Callable[[Any], int]) -> Timing:
    """Run ``warmup`` then ``steps`` real training iterations of ``trainer`` and time the latter.

    The first timed iteration's data wait is not counted (its batch was fetched before the clock started).
    """
    device = trainer.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trainer.model.train()
    done, timed, wait, samples, start = 0, 0, 0.0, 0, None
    while done < warmup + steps:
        tic = time.perf_counter()
        for batch in trainer.train_loader:
            sync()
            got = time.perf_counter()
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start, wait, samples, timed = got, 0.0, 0, 0
            elif done > warmup:
                wait += got - tic
            trainer.train_step(batch)
            sync()
            done += 1
            if done > warmup:
                timed += 1
                samples += batch_size(batch)
            if done >= warmup + steps:
                break
            tic = time.perf_counter()
    assert start is not None
    seconds = time.perf_counter() - start
    return Timing(samples=samples, steps=timed, seconds=seconds, data_wait=wait / seconds)


def cpu_name() -> str:
    """The CPU model and core count."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"


def peak_memory(device: torch.device) -> str:
    """Peak GPU allocation since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"


def append_row(title: str, header: str, row: str, results: Path = RESULTS) -> None:
    """Add ``row`` at the end of the table under the ``title`` heading, creating the section when missing."""
    lines = results.read_text().splitlines() if results.is_file() else ["# Benchmark results"]
    if title not in lines:
        lines += ["", title, "", *header.rstrip("\n").splitlines()]
        lines.append(row.rstrip("\n"))
    else:
        end = lines.index(title) + 1
        while end < len(lines) and not lines[end].startswith("## "):
            end += 1
        while lines[end - 1] == "":
            end -= 1
        lines.insert(end, row.rstrip("\n"))
    results.write_text("\n".join(lines) + "\n")
