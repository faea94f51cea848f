"""Image retrieval by cosine similarity of features: nearest neighbours, precision@k and a picture of the results."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from dae.evaluation.report import save_figure

__all__ = ["precision_at_k", "retrieval_figure", "retrieve", "save_retrieval_figure"]


@torch.no_grad()
def retrieve(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar gallery items of each query, by cosine similarity of L2-normalised features.

    Args:
        query: ``[M, D]`` query features.
        gallery: ``[N, D]`` gallery features.
        k: neighbours per query; capped, with a warning, at N (N - 1 with ``exclude_self``).
        exclude_self: query and gallery are the same set (M = N, same order) and a query may not retrieve itself.
        chunk_size: queries per similarity block, which bounds memory at ``chunk_size x N``.

    Returns:
        ``(indices [M, k] long, similarities [M, k])``, most similar first.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need [M, D] queries and [N, D] gallery, got {tuple(query.shape)}, {tuple(gallery.shape)}")
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise ValueError("exclude_self needs the query and gallery to be the same set")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"need k >= 1 and chunk_size >= 1, got {k} and {chunk_size}")
    available = gallery.shape[0] - int(exclude_self)
    if available < 1:
        raise ValueError("the gallery has no item to retrieve")
    if k > available:
        warnings.warn(f"k={k} exceeds the {available} retrievable gallery items; using k={available}", stacklevel=2)
        k = available
    q = F.normalize(query.float(), dim=1)
    g = F.normalize(gallery.float().to(q.device), dim=1)
    indices, sims = [], []
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start : start + chunk_size] @ g.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -math.inf
        top_sims, top_index = sim.topk(k, dim=1)
        indices.append(top_index.cpu())
        sims.append(top_sims.cpu())
    if not indices:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(indices), torch.cat(sims)


def _relevant(query_labels: torch.Tensor, gallery_labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[M, k]`` bool: whether each retrieved item is relevant to its query."""
    neighbours = gallery_labels[indices]
    if query_labels.ndim == 1:
        return neighbours == query_labels[:, None]
    q = query_labels[:, None, :] > 0.5
    n = neighbours > 0.5
    shared = (q & n).any(dim=2)
    # A query without positive labels ("no finding") is matched by neighbours without positive labels.
    both_empty = ~q.any(dim=2) & ~n.any(dim=2)
    return shared | both_empty


def precision_at_k(
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    indices: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Mean precision of the first k retrieved items, for each k.

    Single-label (``[M]``/``[N]`` labels): a retrieved item is relevant when it has the query's label.
    Multi-label (``[M, C]``/``[N, C]`` 0/1 labels): it is relevant when it shares at least one positive label
    with the query; for a query without any positive label, the items without positive labels are the
    relevant ones (so "no finding" images count as a class of their own rather than as never relevant).

    Args:
        query_labels: labels of the queries.
        gallery_labels: labels of the gallery.
        indices: ``[M, K]`` retrieved gallery indices, from :func:`retrieve`.
        ks: cut-offs, each at most K.

    Returns:
        ``{"precision@k": value}`` for each k.
    """
    if indices.ndim != 2 or indices.shape[0] != query_labels.shape[0]:
        raise ValueError(f"indices must be [M={query_labels.shape[0]}, K], got {tuple(indices.shape)}")
    if query_labels.ndim != gallery_labels.ndim:
        raise ValueError("query and gallery labels must both be single-label or both multi-label")
    too_large = [k for k in ks if not 1 <= k <= indices.shape[1]]
    if too_large:
        raise ValueError(f"cut-offs {too_large} outside [1, {indices.shape[1]}] retrieved items")
    relevant = _relevant(query_labels, gallery_labels, indices.long()).float()
    return {f"precision@{k}": float(relevant[:, :k].mean()) if len(relevant) else math.nan for k in ks}


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
        The figure (not shown; save it with :func:`dae.evaluation.report.save_figure`).
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
