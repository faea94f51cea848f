"""What the benchmark scripts share: the machine description and the rows of ``benchmarks/results.md``."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.md"


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
