"""Image retrieval by cosine similarity of features: nearest neighbours, precision@k and the retrieval protocol."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from dae.evaluation.featureset import FeatureSet
from dae.evaluation.neighbours import cosine_topk

__all__ = ["precision_at_k", "retrieve", "run_retrieval"]

logger = logging.getLogger(__name__)


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
        ``(indices [M, k] long, similarities [M, k])`` on the CPU, most similar first.
    """
    sims, indices = cosine_topk(query, gallery, k, exclude_self=exclude_self, chunk_size=chunk_size)
    return indices.cpu(), sims.cpu()


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


def run_retrieval(
    gallery: FeatureSet, query: FeatureSet, ks: Sequence[int] = (1, 5, 10)
) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
    """The retrieval protocol: each ``query`` sample retrieves its nearest ``gallery`` samples by CLS feature.

    Cut-offs larger than the gallery are skipped with a warning.

    Returns:
        ``(rows, indices, similarities)``: one row per cut-off (``protocol`` "retrieval", ``setting``
        "test->training", ``metric`` "precision@k", ``value``; none when no cut-off fits) and the
        ``[M, max(ks)]`` retrieved gallery indices and similarities (empty when no cut-off fits).
    """
    usable = [k for k in ks if k <= len(gallery)]
    if len(usable) < len(ks):
        logger.warning("retrieval: precision@k for k > %d (the gallery size) skipped", len(gallery))
    if not usable:
        return [], torch.zeros(len(query), 0, dtype=torch.long), torch.zeros(len(query), 0)
    indices, sims = retrieve(query.cls, gallery.cls, max(usable))
    scores = precision_at_k(query.labels, gallery.labels, indices, usable)
    rows = [{"protocol": "retrieval", "setting": "test->training", "metric": k, "value": v} for k, v in scores.items()]
    return rows, indices, sims
