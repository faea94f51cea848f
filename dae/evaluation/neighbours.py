"""Nearest neighbours by cosine similarity: the one search behind k-NN classification and image retrieval."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = ["cosine_topk"]


def cosine_topk(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k gallery items most similar to each query, by cosine similarity of L2-normalised features.

    Queries are compared in chunks of ``chunk_size``, which bounds memory at ``chunk_size x N`` similarities; the
    computation runs on the gallery's device.

    Args:
        query: ``[M, D]`` query features, any M >= 0.
        gallery: ``[N, D]`` gallery features.
        k: neighbours per query; capped, with a warning, at N (N - 1 with ``exclude_self``).
        exclude_self: query and gallery are the same set (M = N, same order) and a query may not find itself.
        chunk_size: queries per similarity block.

    Returns:
        ``(similarities [M, k], indices [M, k] long)``, most similar first, on the gallery's device.

    Raises:
        ValueError: for shapes that do not match, ``k`` or ``chunk_size`` below 1, or an empty gallery.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"need [M, D] queries and an [N, D] gallery of the same width, got {tuple(query.shape)}, "
            f"{tuple(gallery.shape)}"
        )
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise ValueError("exclude_self needs the query and gallery to be the same set")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"need k >= 1 and chunk_size >= 1, got {k} and {chunk_size}")
    available = gallery.shape[0] - int(exclude_self)
    if available < 1:
        raise ValueError("the gallery has no item to find")
    if k > available:
        warnings.warn(f"k={k} exceeds the {available} gallery items to choose from; using k={available}", stacklevel=2)
        k = available
    with torch.no_grad():
        g = F.normalize(gallery.float(), dim=1)
        q = F.normalize(query.float().to(g.device), dim=1)
        sims, indices = [], []
        for start in range(0, q.shape[0], chunk_size):
            sim = q[start : start + chunk_size] @ g.T
            if exclude_self:
                rows = torch.arange(sim.shape[0], device=sim.device)
                sim[rows, rows + start] = -math.inf
            top_sims, top_indices = sim.topk(k, dim=1)
            sims.append(top_sims)
            indices.append(top_indices)
    if not sims:
        return torch.zeros(0, k, device=g.device), torch.zeros(0, k, dtype=torch.long, device=g.device)
    return torch.cat(sims), torch.cat(indices)
