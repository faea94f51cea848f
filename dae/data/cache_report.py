"""Tell the user how much RAM a ``CacheDataset`` will take before it is filled."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from dae.data.datalist import estimate_cache_bytes, format_bytes

__all__ = ["log_cache_estimate"]

logger = logging.getLogger(__name__)


def log_cache_estimate(
    entries: Sequence[Mapping],
    target_spacing: Sequence[float] | float | None,
    cache_rate: float,
    name: str = "training",
) -> int:
    """Log the estimated cache size of ``entries`` (float32 volumes after resampling) and return it in bytes.

    The estimate is made from image headers only and counts the volumes before foreground cropping, so it
    is an upper bound. Lower ``cache_rate`` when it does not fit in RAM (a killed process, exit code -9, is
    the usual symptom).
    """
    n_cached = int(cache_rate * len(entries))
    size = estimate_cache_bytes(entries, target_spacing=target_spacing, cache_rate=cache_rate)
    logger.info(
        "%s set: %d volumes, %d cached (cache_rate %.2f), estimated cache size %s",
        name,
        len(entries),
        n_cached,
        cache_rate,
        format_bytes(size),
    )
    return size
