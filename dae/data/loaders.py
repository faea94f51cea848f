"""Loaders for evaluation: the splits of a datalist, and one cached, unshuffled loader per list."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import DataLoader

from dae.data.cache_dataset import CacheDataset
from dae.data.datalist import load_datalist

__all__ = ["list_loaders", "load_splits"]


def load_splits(
    datalist: str | Path,
    dataset_dir: str | Path | None,
    splits: Sequence[str] = ("training", "validation", "test"),
    default_modality: str | None = None,
    require_label: bool | str = True,
) -> dict[str, list[dict]]:
    """Every split of ``datalist``, loaded and validated (:func:`~dae.data.load_datalist`); ``{split: entries}``.

    Args:
        datalist: the JSON datalist.
        dataset_dir: folder that relative paths are joined to.
        splits: the lists to load.
        default_modality: modality of entries without one (e.g. ``"XR"``).
        require_label: the label every entry must have: True (a class index or a label image), ``"class"`` (an
            integer class index, for classification), ``"image"`` (a label image, for segmentation) or False.
    """
    return {
        split: load_datalist(
            datalist, key=split, data_root=dataset_dir, default_modality=default_modality, require_label=require_label
        )
        for split in splits
    }


def list_loaders(
    lists: Mapping[str, Sequence[Mapping]],
    transform: Callable[[Any], Any],
    batch_size: int = 64,
    cache_rate: float = 1.0,
    num_workers: int = 0,
) -> dict[str, DataLoader]:
    """A :class:`~dae.data.CacheDataset` loader per loaded list (e.g. of :func:`load_splits`), in list order.

    The lists are loaded and validated before this is called, so a bad entry in the last list fails before any
    image is cached; an entry that fails while it is cached is named.

    Args:
        lists: name -> entries with resolved paths.
        transform: the (deterministic) transform of every list.
        batch_size: images per batch.
        cache_rate: share of each list kept in memory after the transform.
        num_workers: loader worker processes.

    Returns:
        ``{name: DataLoader}``, not shuffled.
    """
    return {
        name: DataLoader(
            CacheDataset(list(entries), transform=transform, cache_rate=cache_rate, progress=False),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
        )
        for name, entries in lists.items()
    }
