"""Result tables (CSV, JSON, Markdown) and figures (ROC curves, retrieval neighbours) of the evaluation protocols.

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

from dae.evaluation.metrics import MetricEstimate, roc_curves

__all__ = [
    "estimate_rows",
    "flatten_row",
    "format_table",
    "retrieval_figure",
    "roc_figure",
    "save_figure",
    "save_retrieval_figure",
    "write_results",
    "write_summary",
]

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


def estimate_rows(
    protocol: str,
    setting: str,
    metric: str,
    estimates: Mapping[str, MetricEstimate],
    per_class: Mapping[str, float],
) -> list[dict[str, Any]]:
    """Result rows of a protocol's test estimates (:func:`~dae.evaluation.metrics.classification_estimates`).

    One row per metric, the headline ``metric`` first, with ``value``, ``low``, ``high``, ``n_boot`` and
    ``selected_by`` (the headline metric); the AUROC row also holds ``per_class``.
    """
    rows = []
    for name, estimate in sorted(estimates.items(), key=lambda item: item[0] != metric):
        row: dict[str, Any] = {
            "protocol": protocol,
            "setting": setting,
            "metric": name,
            "value": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
            "n_boot": estimate.n_boot,
            "selected_by": metric,
        }
        if name == "auroc":
            row["per_class"] = dict(per_class)
        rows.append(row)
    return rows


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


def write_results(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str, preamble: str = "", appendix: str = ""
) -> dict[str, Path]:
    """Write the same result rows as ``<name>.csv``, ``<name>.json`` and ``<name>.md`` in ``out_dir``.

    Rows are flattened (:func:`flatten_row`); the CSV has the union of their columns (the main ones first,
    the others in first-seen order), with empty cells where a row lacks a column. The JSON holds the list of
    flat rows, keys in the same order, with non-finite floats as ``null``. The Markdown table has every
    column, the interval shown in the ``value`` cell, below ``preamble`` (Markdown, e.g. what was scored) and above
    ``appendix`` (Markdown, e.g. a comparison).

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
    table = format_table(flat, columns=md_columns, digits=4)
    parts = [part.strip() for part in (preamble, table, appendix) if part.strip()]
    paths["md"].write_text("\n\n".join(parts) + "\n")
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


def write_summary(
    summary: Mapping[str, Any], markdown: str, out_dir: str | Path, name: str = "summary"
) -> dict[str, Path]:
    """Write one summary as ``<name>.json`` (flattened, non-finite floats as ``null``) and ``<name>.md``.

    Args:
        summary: the values, e.g. ``{"num_cases": 3, "mean_dice": 0.8, ...}``.
        markdown: the text of ``<name>.md``, e.g. a :func:`format_table` with a title.
        out_dir: the folder (created if needed).
        name: the file stem.

    Returns:
        ``{"json": path, "md": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    values = {key: _json_value(value) for key, value in flatten_row(summary).items()}
    paths["json"].write_text(json.dumps(values, indent=2, allow_nan=False, default=str) + "\n")
    paths["md"].write_text(markdown.rstrip("\n") + "\n")
    return paths


def _label_text(label: torch.Tensor, class_names: Sequence[str] | None) -> str:
    if label.ndim == 0:
        index = int(label)
        return class_names[index] if class_names else str(index)
    positives = torch.nonzero(label > 0.5).flatten().tolist()
    if not positives:
        return "none"
    return "+".join(class_names[i] if class_names else str(i) for i in positives)


def retrieval_figure(
    query_images: torch.Tensor,
    gallery_images: torch.Tensor,
    indices: torch.Tensor,
    sims: torch.Tensor,
    query_labels: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    max_queries: int = 8,
    panel_size: float = 1.8,
) -> Figure:
    """A grid of retrieval results: one row per query, the query first, then its neighbours, best first.

    Args:
        query_images: ``[M, 1 or 3, H, W]`` images in [0, 1].
        gallery_images: ``[N, 1 or 3, H, W]`` images in [0, 1].
        indices: ``[M, K]`` retrieved gallery indices.
        sims: ``[M, K]`` their similarities.
        query_labels: optional labels shown in the titles (class indices or 0/1 vectors).
        gallery_labels: optional gallery labels, likewise.
        class_names: names for the labels.
        max_queries: rows shown at most (the first queries).
        panel_size: size of one panel, in inches.

    Returns:
        The figure (not shown; save it with :func:`save_figure`).
    """
    rows = min(query_images.shape[0], indices.shape[0], max_queries)
    if rows < 1:
        raise ValueError("no query to show")
    cols = 1 + indices.shape[1]
    fig = Figure(figsize=(panel_size * cols, panel_size * rows * 1.15))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        panels = [(query_images[r], "query", query_labels[r] if query_labels is not None else None)]
        for j in range(indices.shape[1]):
            g = int(indices[r, j])
            label = gallery_labels[g] if gallery_labels is not None else None
            panels.append((gallery_images[g], f"sim {float(sims[r, j]):.5f}", label))
        for ax, (image, caption, label) in zip(axes[r], panels):
            image = image.detach().float().clamp(0, 1).cpu()
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(image.permute(1, 2, 0).numpy())
            title = caption if label is None else f"{_label_text(label, class_names)}\n{caption}"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_retrieval_figure(path: str | Path, *args: Any, dpi: int = 120, **kwargs: Any) -> Path:
    """Build :func:`retrieval_figure` with the given arguments and save it as a PNG at ``path``."""
    return save_figure(retrieval_figure(*args, **kwargs), path, dpi=dpi)
