"""Run a bundle through the real ``python -m monai.bundle run`` command line, as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def config_files(bundle: str, *names: str) -> str:
    """The ``--config_file`` value for ``names`` in ``bundles/<bundle>/configs``."""
    folder = REPO / "bundles" / bundle / "configs"
    return "[" + ",".join(f"'{folder / n}'" for n in names) + "]"


def run_bundle(
    bundle: str,
    configs: tuple[str, ...],
    *overrides: str,
    launcher: list[str] | None = None,
    check: bool = True,
    one_thread: bool = False,
) -> subprocess.CompletedProcess:
    """Run the bundle from the repository root; with ``check``, fail the test (showing the log) on an error.

    ``one_thread`` (always with a ``launcher``) runs each process on one thread: bit-identical reruns, since
    multi-threaded CPU reductions may sum in another order.
    """
    cmd = [
        *(launcher or [sys.executable]),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config_files(bundle, *configs),
    ]
    # One thread per process when several run side by side on the CI's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if launcher or one_thread else None
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
