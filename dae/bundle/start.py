"""The first step of every bundle run: strict overrides, checked settings, a short error report."""

from __future__ import annotations

import logging
from typing import Any

from dae.bundle.launch import current_launch
from dae.bundle.overrides import check_overrides
from dae.bundle.report import install_error_report
from dae.bundle.settings import check_settings
from dae.utils.config import resolve_flag

__all__ = ["start_run"]

logger = logging.getLogger(__name__)


def start_run() -> dict[str, Any]:
    """Check the launch before any data is read; call it first in a bundle's ``initialize`` list.

    1. Uncaught errors end with a short summary; the full traceback goes to ``<output_dir>/error.log``
       (``--debug`` or ``DAE_DEBUG=1`` prints it too).
    2. Every command-line override must name a key of the config files (a config may list ids under which
       new keys are allowed in a top-level ``free_keys``); the error names the closest known keys.
    3. The shared settings (:data:`dae.bundle.SETTINGS`, :data:`dae.bundle.FLAGS`) are checked for type and
       range, crop sizes against the Swin UNETR depth, paths for existence.

    Returns:
        The checked settings by key.

    Raises:
        ConfigError: naming every unknown key or bad value.
    """
    launch = current_launch()
    if launch is None:
        logger.warning("not run by a MONAI ConfigWorkflow: the launch checks are skipped")
        return {}
    debug = resolve_flag(launch.overrides.get("debug", False), "debug")
    try:
        output_dir = launch.parser.get_parsed_content("output_dir")
    except Exception:  # reported with the other settings below; until then the log goes to the temp folder
        output_dir = None
    install_error_report(output_dir if isinstance(output_dir, str) else None, debug)
    if launch.config_files is not None:
        files = launch.file_config()
        check_overrides(files, launch.overrides, files.get("free_keys") or (), source=str(launch.config_files))
    else:
        logger.warning("the config files of this run are unknown: command-line overrides are not checked")
    return check_settings(launch.parser, launch.overrides)
