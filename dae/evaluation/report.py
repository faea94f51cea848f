"""Result tables (CSV, JSON, Markdown) and figures (ROC curves) of the evaluation protocols.

A result row is a flat dict; the usual keys are ``backbone``, ``protocol``, ``setting``, ``metric``,
``value`` and, for a confidence interval, ``low`` and ``high``. Nested dicts (e.g. ``per_class``) are
flattened to ``per_class.<name>`` columns. Figures are built with :class:`matplotlib.figure.Figure`
directly, not through ``pyplot``, so nothing is displayed and no GUI backend is needed; PNGs are rendered
with Agg.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dae.evaluation.metrics import roc_curves

__all__ = ["flatten_row", "format_table", "roc_figure", "save_figure", "write_results"]

_MAIN_COLUMNS = ("backbone", "protocol", "setting", "metric", "value")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``row`` with nested mappings flattened to ``outer.inner`` keys and scalar tensors/NumPy values as Python."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_row(value, prefix=f"{name}."))
        else:
            flat[name] = _plain(value)
    return flat


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The main columns present (backbone, protocol, setting, metric, value, low, high), then the others."""
    seen = dict.fromkeys(key for row in rows for key in row)
    main = [c for c in (*_MAIN_COLUMNS, "low", "high") if c in seen]
    return main + [c for c in seen if c not in main]


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _value_cell(row: Mapping[str, Any], digits: int) -> str:
    text = _cell(row.get("value"), digits)
    low, high = row.get("low"), row.get("high")
    if isinstance(low, float) and isinstance(high, float) and not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A Markdown (pipe) table of result rows, readable in a terminal too.

    The ``value`` cell shows the interval when the row has finite ``low`` and ``high``, e.g.
    ``0.912 [0.881, 0.940]``.

    Args:
        rows: result rows (nested mappings are flattened).
        columns: columns to show; default: those of backbone, protocol, setting, metric and value present in
            the rows, or every column if none of them is.
        digits: decimals of floats.

    Returns:
        The table, one line per row after the header and separator lines.
    """
    flat = [flatten_row(row) for row in rows]
    if columns is None:
        present = set(_columns(flat))
        columns = [c for c in _MAIN_COLUMNS if c in present] or _columns(flat)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in flat:
        cells = [_value_cell(row, digits) if c == "value" else _cell(row.get(c), digits) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write the same result rows as ``<name>.csv``, ``<name>.json`` and ``<name>.md`` in ``out_dir``.

    Rows are flattened (:func:`flatten_row`); the CSV has the union of their columns (the main ones first,
    the others in first-seen order), with empty cells where a row lacks a column. The JSON holds the list of
    flat rows, keys in the same order, with non-finite floats as ``null``. The Markdown table has every
    column, the interval shown in the ``value`` cell.

    Returns:
        ``{"csv": path, "json": path, "md": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = [flatten_row(row) for row in rows]
    columns = _columns(flat)
    paths = {"csv": out_dir / f"{name}.csv", "json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    paths["json"].write_text(
        json.dumps(
            [{k: _json_value(row[k]) for k in columns if k in row} for row in flat],
            indent=2,
            allow_nan=False,
            default=str,
        )
        + "\n"
    )
    md_columns = [c for c in columns if c not in ("low", "high")] if "value" in columns else columns
    paths["md"].write_text(format_table(flat, columns=md_columns, digits=4) + "\n")
    return paths


def roc_figure(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    max_legend: int = 20,
) -> Figure:
    """ROC curves of every class with a defined AUROC, with the AUROC in the legend.

    Args:
        scores: ``[N, C]`` (or ``[N]``) scores.
        labels: class indices or a 0/1 matrix (task rules of :func:`dae.evaluation.metrics.auroc`).
        class_names: names of the classes.
        title: figure title.
        max_legend: classes beyond this many are drawn but left out of the legend.

    Returns:
        The figure (not shown).
    """
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    for i, (name, curve) in enumerate(roc_curves(scores, labels, class_names).items()):
        ax.plot(curve.fpr, curve.tpr, lw=1.2, label=f"{name} ({curve.auc:.3f})" if i < max_legend else None)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7, title="AUROC")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` (PNG unless the suffix says otherwise, rendered by Agg); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
