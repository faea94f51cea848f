"""The settings of the run being evaluated, read from its run folder instead of being given again.

A training run saves its merged config (config files and overrides, unevaluated) as ``<output_dir>/config.yaml``
(:func:`dae.bundle.save_run_record`). An evaluation overlay calls :func:`adopt_run_settings` first in its
``initialize`` list with the keys that define the network and the preprocessing, so that a run is evaluated
as it was trained: a demo run without its demo overlay, a run trained with ``--feature_size 24`` without
repeating it.

How saved values are used:

* Values are compared and adopted as written in ``config.yaml``: expressions (``$...``) and references
  (``@key``) stay unevaluated. A key whose saved value is written as this launch writes it (config files and
  command line) is left alone.
* An adopted expression is evaluated in this run's config, so every key it refers to must mean here what it
  meant in the run: it is listed for adoption too, given on the command line, or saved as this launch writes it
  (and so are the keys that one refers to). Anything else is a :class:`~dae.errors.ConfigError` naming both
  values, never a silently different evaluation. The bundles list the keys their expressions refer to
  (``class_names`` reads ``@datalist``, ``intensity`` reads ``@hu_window``, the demo's ``label_maps`` read
  ``@dataset_dir``).
* A listed key given on the command line must have its saved value (compared as written, command-line text
  read as YAML: ``false``, ``[64, 64, 64]``); a different value is a ConfigError naming the key, both values
  and the ``config.yaml``. Keys passed as ``overridable`` (the data locations) are adopted unless given on the
  command line, which then wins: data may have moved since training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser, ReferenceResolver
from monai.utils import ensure_tuple

from dae.bundle.launch import Launch, current_launch, evaluated_items, replace_value
from dae.bundle.report import install_error_report
from dae.errors import ConfigError
from dae.utils.config import resolve_flag

__all__ = ["adopt_run_settings"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """``value`` as a comparable YAML value: command-line text read as YAML, tuples as lists."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:  # "@datalist" and other text YAML cannot read stay text
            return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _references(key: str, value: Any) -> set[str]:
    """The top-level keys other than ``key`` that ``value`` (saved under ``key``) refers to."""
    refs = ReferenceResolver.find_refs_in_config(value, key)
    return {top for top in (ReferenceResolver.split_id(ref)[0] for ref in refs) if top != key}


def _first_file(config_files: Any) -> dict[str, Any]:
    """The first of the launch's config files (the bundle's ``train.yaml``), as written."""
    if isinstance(config_files, str) and not Path(config_files).is_file() and "," in config_files:
        config_files = config_files.split(",")
    return ConfigParser.load_config_file(ensure_tuple(config_files)[0])


def _given_settings(launch: Launch, keys: Sequence[str]) -> list[str]:
    """The keys the launch sets itself: on the command line, or by an overlay that changes the first file's."""
    if launch.config_files is None:
        return [key for key in keys if key in launch.overrides]
    files, first = ConfigParser.load_config_files(launch.config_files), _first_file(launch.config_files)
    return [key for key in keys if key in launch.overrides or files.get(key) != first.get(key)]


def _read_saved(path: Path) -> dict[str, Any]:
    try:
        saved = ConfigParser.load_config_file(path)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"the run's config {path} cannot be read: {error}") from error
    if not isinstance(saved, dict):
        raise ConfigError(f"the run's config {path} is not a mapping of settings")
    return saved


def _expanded(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``%`` macros and relative ``@`` ids resolved, as MONAI does when it parses a config."""
    parser = ConfigParser(values)
    parser.resolve_macro_and_relative_ids()
    return parser.get()


def _check_references(
    key: str, value: Any, trusted: set[str], saved: Mapping[str, Any], current: Mapping[str, Any], path: Path
) -> None:
    """Raise unless every key ``value`` refers to (transitively) is trusted or saved as it is written now."""
    pending = [(key, ref) for ref in _references(key, value)]
    seen: set[str] = set()
    while pending:
        holder, ref = pending.pop()
        if ref in trusted or ref in seen:
            continue
        seen.add(ref)
        if ref not in saved or ref not in current or _plain(saved[ref]) != _plain(current[ref]):
            through = f" (through '{holder}')" if holder != key else ""
            raise ConfigError(
                f"{key}: the run's value {value!r} (in {path}) refers to '{ref}'{through}, which the run set to "
                f"{saved.get(ref, '<absent>')!r} and this evaluation to {current.get(ref, '<absent>')!r}",
                advice=f"evaluate with the configs the run was trained with, or give '{ref}' on the command line",
            )
        pending += [(ref, nested) for nested in _references(ref, saved[ref])]


def _replace(parser: ConfigParser, key: str, value: Any) -> None:
    """Adopt ``value`` for ``key``; a key the workflow has already evaluated cannot be adopted any more."""
    if evaluated_items(parser, key):
        raise RuntimeError(f"'{key}' was evaluated before adopt_run_settings: call it first in initialize")
    replace_value(parser, key, value)


def adopt_run_settings(keys: Sequence[str], overridable: Sequence[str] = ()) -> dict[str, Any]:
    """Take the listed settings of the run being evaluated from ``<output_dir>/config.yaml``.

    Call it first in an evaluation's ``initialize`` list, before ``start_run()`` checks the settings and before
    anything builds the network or the transforms; it installs the short error report itself. See the module
    docstring for how saved expressions are handled.

    Args:
        keys: top-level keys that define the network and the preprocessing; a command-line value that differs
            from the saved one is an error.
        overridable: top-level keys taken from the run unless given on the command line (e.g. the data folder
            and datalist: the run's data by default, a moved copy on the command line).

    Returns:
        The adopted keys (those whose saved value differs from this launch's) and their saved values.

    Raises:
        ConfigError: ``config.yaml`` is missing (and the launch gives none of ``keys`` itself: on the command
            line, or by an overlay that changes the bundle's first config file), unreadable, or holds a value
            that a command-line value contradicts or whose references mean something else here.
    """
    launch = current_launch()
    if launch is None:
        logger.warning("not run by a MONAI ConfigWorkflow: the settings of the run are not adopted")
        return {}
    parser = launch.parser
    output_dir = parser.get_parsed_content("output_dir")
    install_error_report(output_dir, resolve_flag(launch.overrides.get("debug", False), "debug"))
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        given = _given_settings(launch, keys)
        if not given:
            raise ConfigError(
                f"{path} does not exist: the settings of the run to evaluate ({', '.join(keys)}) are read from it",
                advice="give the folder of a training run as --output_dir, or give the run's settings on the "
                "command line or with its overlay (e.g. add configs/demo.yaml for a demo run)",
            )
        logger.warning("%s does not exist: the settings are this launch's (it sets %s)", path, ", ".join(given))
        return {}
    saved = _read_saved(path)
    current = launch.merged_config() if launch.config_files is not None else parser.get()
    present = [key for key in (*keys, *overridable) if key in saved]
    missing = [key for key in (*keys, *overridable) if key not in saved]
    if missing:
        logger.warning("%s has no %s: this launch's values are used", path, ", ".join(missing))
    conflicts = [
        f"  {key}: --{key} {launch.overrides[key]!r} on the command line, {saved[key]!r} in the run"
        for key in keys
        if key in saved and key in launch.overrides and _plain(launch.overrides[key]) != _plain(saved[key])
    ]
    if conflicts:
        raise ConfigError(
            f"{len(conflicts)} command-line setting(s) contradict the run being evaluated ({path}):\n"
            + "\n".join(conflicts),
            advice="leave these keys out (the run's values are used), or evaluate the run that was trained so",
        )
    trusted = {*present, *launch.overrides}
    adopted = {
        key: saved[key]
        for key in present
        if key not in launch.overrides and _plain(saved[key]) != _plain(current.get(key))
    }
    for key, value in adopted.items():
        _check_references(key, value, trusted, saved, current, path)
    for key, value in _expanded(adopted).items():
        _replace(parser, key, value)
    if adopted:
        logger.info("settings of the run from %s: %s", path, ", ".join(f"{k}={v!r}" for k, v in adopted.items()))
    return adopted
