"""What a run was: its merged bundle config, its command line and the versions of the software it ran on."""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dae.bundle.launch import current_launch

__all__ = ["package_versions", "save_run_record"]

logger = logging.getLogger(__name__)

_PACKAGES = ("dae", "monai", "torch", "numpy", "nibabel", "SimpleITK", "einops", "tensorboard", "pyyaml", "tqdm")


def package_versions() -> dict[str, str]:
    """Versions of Python, the main packages, CUDA and cuDNN (``"not installed"`` where absent)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = str(torch.version.cuda)
    versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    versions["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return versions


def save_run_record(output_dir: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``config.yaml`` (the merged bundle config), ``command.txt`` and ``versions.json`` to ``output_dir``.

    Args:
        output_dir: the run folder.
        config: the config to save; by default the config files and overrides of the bundle run that calls
            this (see :func:`current_launch`).

    Returns:
        The run folder.
    """
    from monai.bundle import ConfigParser

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        launch = current_launch()
        config = launch.merged_config() if launch is not None and launch.config_files is not None else None
    if config is None:
        logger.warning("not launched through `monai.bundle run --config_file ...`: no config.yaml written")
    else:
        ConfigParser.export_config_file(config, str(out / "config.yaml"), fmt="yaml", sort_keys=False)
    (out / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")
    (out / "versions.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
    return out
