"""What a run was: its merged bundle config, its command line and the versions of the software it ran on."""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["bundle_config_from_argv", "package_versions", "save_run_record"]

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


def bundle_config_from_argv(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Rebuild the merged config of a ``python -m monai.bundle run`` command from its arguments.

    MONAI's bundle runner does not hand the parsed config to the objects it builds, so the config files
    and ``--id value`` overrides are read back from the command line, parsed the way MONAI's CLI (fire)
    parses them, and merged in the same order. Returns ``None`` when there is no ``--config_file``.
    """
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser

    args = list(sys.argv[1:] if argv is None else argv)
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
                i += 1
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg[2:], args[i + 1]
                i += 2
            else:
                key, value = arg[2:], "True"
                i += 1
            pairs[key] = DefaultParseValue(value)
        else:
            i += 1
    config_file = pairs.pop("config_file", None)
    if config_file is None:
        return None
    for runner_arg in ("meta_file", "logging_file", "run_id", "init_id", "final_id", "args_file", "tracking"):
        pairs.pop(runner_arg, None)
    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in pairs.items():
        parser[key] = value
    return parser.get()


def save_run_record(output_dir: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``config.yaml`` (the merged bundle config), ``command.txt`` and ``versions.json`` to ``output_dir``.

    Args:
        output_dir: the run folder.
        config: the config to save; by default it is rebuilt from this process's command line.

    Returns:
        The run folder.
    """
    from monai.bundle import ConfigParser

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = bundle_config_from_argv() if config is None else config
    if config is None:
        logger.warning("not launched through `monai.bundle run --config_file ...`: no config.yaml written")
    else:
        ConfigParser.export_config_file(config, str(out / "config.yaml"), fmt="yaml", sort_keys=False)
    (out / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")
    (out / "versions.json").write_text(json.dumps(package_versions(), indent=2) + "\n")
    return out
