"""Loaders for evaluation: one cached, unshuffled loader per split of a datalist."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, DataLoader

from dae.data.datalist import load_datalist

__all__ = ["split_loaders"]


def split_loaders(
    datalist: str | Path,
    dataset_dir: str | Path | None,
    transform: Callable[[Any], Any],
    splits: Sequence[str] = ("training", "validation", "test"),
    batch_size: int = 64,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    default_modality: str | None = None,
) -> dict[str, DataLoader]:
    """A ``CacheDataset`` loader per split of ``datalist``, in datalist order (no shuffling).

    Every split is read and validated (:func:`~dae.data.load_datalist`) before any image is cached, so a bad
    entry in the last split fails at once.

    Args:
        datalist: the JSON datalist.
        dataset_dir: folder that relative paths are joined to.
        transform: the (deterministic) transform of every split.
        splits: the lists to load.
        batch_size: images per batch.
        cache_rate: share of each split kept in memory after the transform.
        num_workers: loader worker processes.
        default_modality: modality of entries without one (e.g. ``"XR"``).

    Returns:
        ``{split: DataLoader}``.
    """
    lists = {
        split: load_datalist(datalist, key=split, data_root=dataset_dir, default_modality=default_modality)
        for split in splits
    }
    return {
        split: DataLoader(
            CacheDataset(data, transform=transform, cache_rate=cache_rate, progress=False),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        for split, data in lists.items()
    }
