"""Pretrained against random initialisation: the baseline backbones and the table that compares them.

Pretraining is worth its compute only if it beats the same architecture left at random initialisation, under the
same protocols and the same test set. :func:`with_random_baselines` adds that baseline next to every backbone that
loads a checkpoint, and :func:`gain_table` sets each one against its baseline, metric by metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RANDOM_SUFFIX", "gain_table", "with_random_baselines"]

RANDOM_SUFFIX = "_random_init"
"""Name of a baseline: its backbone's name with this suffix."""

_KINDS_WITH_BASELINE = ("dino", "dae3d")


def with_random_baselines(backbones: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``backbones`` with, after each one that loads a checkpoint, the same architecture at random initialisation.

    The baseline of ``name`` is ``name + "_random_init"``, the same spec with ``random_init: true`` (see
    :mod:`dae.models.factory`). Kinds without a random-init path (``hf_dinov2``), specs without a checkpoint and
    backbones that are baselines already get none.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, spec in backbones.items():
        out[name] = dict(spec)
        pretrained = spec.get("checkpoint") is not None and not spec.get("random_init", False)
        if pretrained and spec.get("kind") in _KINDS_WITH_BASELINE and f"{name}{RANDOM_SUFFIX}" not in backbones:
            out[f"{name}{RANDOM_SUFFIX}"] = {**spec, "random_init": True}
    return out


def _interval(row: Mapping[str, Any]) -> tuple[float, float] | None:
    low, high = row.get("low"), row.get("high")
    if isinstance(low, int | float) and isinstance(high, int | float) and math.isfinite(low) and math.isfinite(high):
        return float(low), float(high)
    return None


def _verdict(gain: float, ours: tuple[float, float] | None, theirs: tuple[float, float] | None) -> str:
    if ours is not None and theirs is not None:
        if ours[0] > theirs[1]:
            return "pretrained better (95% intervals apart)"
        if theirs[0] > ours[1]:
            return "random init better (95% intervals apart)"
        return "intervals overlap"
    return "pretrained higher" if gain > 0 else "random init higher" if gain < 0 else "equal"


def gain_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of every backbone against its ``_random_init`` baseline, per protocol and metric.

    Rows are matched by ``(protocol, metric)`` when each backbone has exactly one such row (the setting each
    protocol chose on validation may differ between the two). ``gain`` is pretrained minus baseline; the verdict
    compares the 95% bootstrap intervals where both rows have one. Returns "" when there is no pair.
    """
    by_backbone: dict[str, dict[tuple[str, str], list[Mapping[str, Any]]]] = {}
    for row in rows:
        key = (str(row.get("protocol")), str(row.get("metric")))
        by_backbone.setdefault(str(row.get("backbone")), {}).setdefault(key, []).append(row)
    lines = []
    for name, results in by_backbone.items():
        baseline = by_backbone.get(f"{name}{RANDOM_SUFFIX}")
        if baseline is None:
            continue
        for key, found in results.items():
            if len(found) != 1 or len(baseline.get(key, [])) != 1:
                continue
            ours, theirs = found[0], baseline[key][0]
            if not all(isinstance(r.get("value"), int | float) for r in (ours, theirs)):
                continue
            gain = float(ours["value"]) - float(theirs["value"])
            verdict = _verdict(gain, _interval(ours), _interval(theirs))
            lines.append(
                f"| {name} | {key[0]} | {key[1]} | {_cell(ours)} | {_cell(theirs)} | {gain:+.4f} | {verdict} |"
            )
    if not lines:
        return ""
    header = [
        "Pretrained against the same architecture at random initialisation (same protocols, same test set):",
        "",
        "| backbone | protocol | metric | pretrained | random init | gain | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join([*header, *lines])


def _cell(row: Mapping[str, Any]) -> str:
    interval = _interval(row)
    value = f"{float(row['value']):.4f}"
    return f"{value} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else value
