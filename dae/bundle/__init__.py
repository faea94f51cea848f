"""The glue between MONAI bundle runs and the library: launch checks, the error report and the run record.

Every bundle's ``initialize`` list starts with ``$dae.bundle.start_run()``; an evaluation overlay first takes the
settings of the run it evaluates from the run folder (``$dae.bundle.adopt_run_settings([...])``).
"""

from dae.bundle.launch import Launch, current_launch
from dae.bundle.overrides import RESERVED_OVERRIDES, check_overrides, unknown_key
from dae.bundle.record import package_versions, save_run_record
from dae.bundle.report import culprit, format_summary, install_error_report
from dae.bundle.run_settings import adopt_run_settings
from dae.bundle.settings import FLAGS, SETTINGS, Setting, check_settings
from dae.bundle.start import start_run

__all__ = [
    "FLAGS",
    "RESERVED_OVERRIDES",
    "SETTINGS",
    "Launch",
    "Setting",
    "adopt_run_settings",
    "check_overrides",
    "check_settings",
    "culprit",
    "current_launch",
    "format_summary",
    "install_error_report",
    "package_versions",
    "save_run_record",
    "start_run",
    "unknown_key",
]
