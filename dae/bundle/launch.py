"""What this bundle run was launched with: its config files, its overrides and MONAI's parser.

MONAI's bundle runner (``python -m monai.bundle run`` or ``monai.bundle.run(...)``) merges the command-line
overrides into the config before any of our code runs, and hands neither the overrides nor its parser to the
objects it builds. The first step of every bundle's ``initialize`` list therefore looks for them on the call
stack: the ``ConfigWorkflow`` being initialised holds the parser, and MONAI's ``create_workflow`` holds the
config files and the keyword arguments it passed on (the overrides, ``--args_file`` content included).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow, ReferenceResolver
from monai.bundle import scripts as bundle_scripts

__all__ = ["Launch", "current_launch", "evaluated_items", "replace_value"]

_WORKFLOW_ARGS = frozenset(inspect.signature(ConfigWorkflow.__init__).parameters) - {"self", "override"}


@dataclass
class Launch:
    """One bundle run as MONAI launched it.

    Attributes:
        parser: the workflow's parser (overrides already merged in).
        config_files: the ``config_file`` value as given (a path, a list of paths or a comma-separated string);
            None when the run was not started through ``monai.bundle``'s ``run``/``create_workflow``.
        overrides: the ``id -> value`` pairs that were merged over the config files.
    """

    parser: ConfigParser
    config_files: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def file_config(self) -> dict[str, Any]:
        """The config files merged as MONAI merges them, with ``%`` macros expanded, before any override."""
        files = ConfigParser(ConfigParser.load_config_files(self.config_files))
        files.resolve_macro_and_relative_ids()
        return files.get()

    def merged_config(self) -> dict[str, Any]:
        """The config files with the overrides applied, unevaluated: what ``config.yaml`` of a run records."""
        merged = ConfigParser(ConfigParser.load_config_files(self.config_files))
        for key, value in self.overrides.items():
            merged[key] = value
        return merged.get()


def current_launch() -> Launch | None:
    """The launch this call runs under, found on the call stack; None outside a ``ConfigWorkflow``."""
    parser: ConfigParser | None = None
    config_files: Any = None
    overrides: Mapping[str, Any] = {}
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if parser is None and isinstance(owner, ConfigWorkflow):
            parser = owner.parser
        if frame.f_code is bundle_scripts.create_workflow.__code__:
            config_files = frame.f_locals.get("config_file")
            overrides = frame.f_locals.get("_args", {})
            break
        frame = frame.f_back
    if parser is None:
        return None
    pairs = {key: value for key, value in overrides.items() if key not in _WORKFLOW_ARGS}
    return Launch(parser, config_files, pairs)


def evaluated_items(parser: ConfigParser, key: str) -> list[str]:
    """The ids of the top-level ``key`` and of the items inside it that the workflow has already evaluated."""
    resolver = parser.ref_resolver
    return [i for i in resolver.items if ReferenceResolver.split_id(i)[0] == key and i in resolver.resolved_content]


def replace_value(parser: ConfigParser, key: str, value: Any) -> None:
    """Replace a top-level value after the workflow has parsed its config, without resetting its resolver.

    MONAI's ``parser[key] = value`` resets the resolver, which would drop what ``initialize`` has evaluated so far
    (a process group, the seeded network). Here only the items of ``key`` (and inside it) are dropped, with their
    evaluated values, and ``value`` is registered as MONAI's ``parse()`` does; the next lookup evaluates it.
    """
    resolver = parser.ref_resolver
    for item_id in [i for i in resolver.items if ReferenceResolver.split_id(i)[0] == key]:
        del resolver.items[item_id]
        resolver.resolved_content.pop(item_id, None)
    parser.config[key] = value  # type: ignore[index]
    parser._do_parse(config=value, id=key)
