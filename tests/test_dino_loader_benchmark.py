"""The DINO loader benchmark runs at a tiny size and prints its ratios (the speed itself is measured, not tested)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dino_loader_benchmark_tiny() -> None:
    results = REPO / "benchmarks" / "results.md"
    before = results.read_text() if results.is_file() else None
    args = ["--images", "4", "--repeats", "2", "--image_size", "512", "--no_record"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/dino_loader.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "upsampled to 512x512" in proc.stdout and "at 430 px" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ratio ours/baseline"))
    ratios = dict(re.findall(r"(v[12]-(?:cpu|device)) (\d+\.\d+)", line))
    assert set(ratios) == {"v1-cpu", "v1-device", "v2-cpu", "v2-device"}
    assert all(float(r) > 0 for r in ratios.values())
    assert (results.read_text() if results.is_file() else None) == before  # --no_record
