"""Command-line overrides must name keys of the config: ``--epoch 2`` is a typo, not a new setting."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from monai.bundle import ReferenceResolver

from dae.errors import ConfigError

__all__ = ["RESERVED_OVERRIDES", "check_overrides", "unknown_key"]

RESERVED_OVERRIDES = frozenset({"debug"})
"""Overrides every bundle accepts without a config key: ``--debug`` prints the full traceback of a failure."""


def unknown_key(config: Any, key: str) -> str | None:
    """Why the ``#``-separated ``key`` names nothing in ``config``, or None when it exists.

    Args:
        config: a nested dict/list config (the files merged, before overrides).
        key: an override id such as ``epochs`` or ``train#dataloader#num_workers``.
    """
    node = config
    parts = ReferenceResolver.split_id(key)
    for depth, part in enumerate(parts):
        parent = "#".join(parts[:depth])
        where = f" under '{parent}'" if parent else ""
        if isinstance(node, Mapping):
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node], n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                return f"unknown key '{part}'{where}{hint}"
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"'{parent}' is a list of {len(node)} items; '{part}' is not an index of it"
            node = node[int(part)]
        else:
            return f"'{parent}' is a single value ({node!r}), it has no key '{part}'"
    return None


def _is_free(key: str, free_keys: Iterable[str]) -> bool:
    parts = ReferenceResolver.split_id(key)
    return any(parts[: len(free)] == free for free in map(ReferenceResolver.split_id, free_keys))


def check_overrides(
    config: Mapping[str, Any], overrides: Mapping[str, Any], free_keys: Iterable[str] = (), source: str = ""
) -> None:
    """Raise one error naming every override that is not a key of ``config``.

    Args:
        config: the config files merged, before overrides (see :meth:`dae.bundle.Launch.file_config`).
        overrides: the ``id -> value`` pairs of the launch.
        free_keys: ids under which new keys may be added (e.g. ``backbones``: one entry per model to evaluate).
        source: the config files, for the message.

    Raises:
        ConfigError: listing each unknown key with the closest known keys.
    """
    free = list(free_keys)
    problems = []
    for key in overrides:
        if key in RESERVED_OVERRIDES or key.startswith("_meta_") or _is_free(key, free):
            continue
        reason = unknown_key(config, key)
        if reason is not None:
            problems.append(f"  --{key}: {reason}")
    if problems:
        files = f" of {source}" if source else ""
        raise ConfigError(
            f"{len(problems)} command-line override(s) name no key{files}:\n" + "\n".join(problems),
            advice="correct the spelling; every setting and its meaning is listed in the bundle's configs/*.yaml",
        )
