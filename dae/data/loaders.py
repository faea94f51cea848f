"""Loaders for evaluation: one cached, unshuffled loader per split of a datalist."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import DataLoader

from dae.data.cache_dataset import CacheDataset
from dae.data.datalist import load_datalist

__all__ = ["load_splits", "split_loaders"]


def load_splits(
    datalist: str | Path,
    dataset_dir: str | Path | None,
    splits: Sequence[str] = ("training", "validation", "test"),
    default_modality: str | None = None,
    require_label: bool | str = True,
) -> dict[str, list[dict]]:
    """Every split of ``datalist``, loaded and validated (:func:`~dae.data.load_datalist`); ``{split: entries}``.

    Args are those of :func:`split_loaders`.
    """
    return {
        split: load_datalist(
            datalist, key=split, data_root=dataset_dir, default_modality=default_modality, require_label=require_label
        )
        for split in splits
    }


def split_loaders(
    datalist: str | Path,
    dataset_dir: str | Path | None,
    transform: Callable[[Any], Any],
    splits: Sequence[str] = ("training", "validation", "test"),
    batch_size: int = 64,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    default_modality: str | None = None,
    require_label: bool | str = True,
) -> dict[str, DataLoader]:
    """A ``CacheDataset`` loader per split of ``datalist``, in datalist order (no shuffling).

    Every split is read and validated (:func:`~dae.data.load_datalist`) before any image is cached, so a bad
    entry or a missing label in the last split fails at once; an entry that fails while it is cached is named
    (:class:`~dae.data.CacheDataset`).

    Args:
        datalist: the JSON datalist.
        dataset_dir: folder that relative paths are joined to.
        transform: the (deterministic) transform of every split.
        splits: the lists to load.
        batch_size: images per batch.
        cache_rate: share of each split kept in memory after the transform.
        num_workers: loader worker processes.
        default_modality: modality of entries without one (e.g. ``"XR"``).
        require_label: the label every entry must have: True (a class index or a label image), ``"class"`` (an
            integer class index, for classification), ``"image"`` (a label image, for segmentation) or False.

    Returns:
        ``{split: DataLoader}``.
    """
    lists = load_splits(datalist, dataset_dir, splits, default_modality, require_label)
    return {
        split: DataLoader(
            CacheDataset(data, transform=transform, cache_rate=cache_rate, progress=False),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        for split, data in lists.items()
    }
