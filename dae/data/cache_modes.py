"""Where the deterministic part of the preprocessing is kept: in RAM, on disk, or in a rolling window in RAM.

``cache: memory`` (MONAI ``CacheDataset``) keeps every preprocessed volume in RAM; ``disk`` (MONAI
``PersistentDataset``) writes each one once to ``cache_dir`` and reads it back every epoch; ``smart`` (MONAI
``SmartCacheDataset``) keeps a window of ``cache_num`` volumes in RAM and replaces ``replace_rate`` of it every
epoch while the previous epoch trains. Every mode names the datalist entry behind a failure, and every mode
resumes exactly: the smart window of an epoch is a function of ``(seed, epoch)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import PersistentDataset as MonaiPersistentDataset
from monai.data import SmartCacheDataset as MonaiSmartCacheDataset
from monai.transforms import Compose

from dae.data.cache_dataset import CacheDataset, NamedEntryErrors

__all__ = [
    "CACHE_MODES",
    "PersistentDataset",
    "RollingCacheDataset",
    "cache_dataset",
    "smart_window_sizes",
    "transform_fingerprint",
    "validation_cache_mode",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "smart")
"""The values of a bundle's ``cache`` setting."""


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's settings; objects by class and attributes, no addresses."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray | torch.Tensor | np.generic):
        return np.asarray(value).tolist()
    if depth > 6:
        return type(value).__qualname__
    if isinstance(value, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_describe(v, depth + 1) for v in items]
    if isinstance(value, type):
        return value.__qualname__
    if callable(value) and not hasattr(value, "__dict__"):
        return getattr(value, "__qualname__", type(value).__qualname__)
    attributes = {
        k: v
        for k, v in getattr(value, "__dict__", {}).items()
        if not isinstance(v, np.random.RandomState | torch.Generator) and not k.startswith("_lazy")
    }
    return {"class": type(value).__qualname__, **{k: _describe(v, depth + 1) for k, v in sorted(attributes.items())}}


def transform_fingerprint(transforms: Sequence[Callable] | Compose) -> bytes:
    """A hash of the settings of the transforms a disk cache stores the output of.

    MONAI's ``PersistentDataset`` names cache files by a hash of the datalist entry only (its ``json_hashing`` of
    the transforms fails on MONAI objects and falls back to their class names), so a run with another
    ``spacing`` or CT window would read volumes preprocessed with the old one. This hash covers the class and
    every attribute of each transform up to the first random one, so such a change writes new files.

    Args:
        transforms: the deterministic transforms (MONAI passes them as a list).

    Returns:
        A hex digest, as bytes (what ``PersistentDataset``'s ``hash_transform`` returns).
    """
    if isinstance(transforms, Compose):
        transforms = transforms.flatten().transforms
    text = repr(_describe(list(transforms)))
    return hashlib.sha256(text.encode()).hexdigest().encode()


class PersistentDataset(NamedEntryErrors, MonaiPersistentDataset):
    """``monai.data.PersistentDataset`` with :func:`transform_fingerprint` and errors naming the entry.

    The deterministic transforms' output of every entry is written once to ``cache_dir`` (one ``.pt`` file per
    entry, named by the entry and by the transforms' settings) and read back, with ``weights_only=True``, in
    later epochs and runs; the random transforms run after it. Several processes may share ``cache_dir``: a
    file is written under a temporary name and renamed.

    Args:
        data: the datalist entries.
        transform: deterministic and random transforms (a ``Compose``).
        cache_dir: the folder of the cache files (created if needed).
    """

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | Path) -> None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(data, transform=transform, cache_dir=cache_dir, hash_transform=transform_fingerprint)


class RollingCacheDataset(NamedEntryErrors, MonaiSmartCacheDataset):
    """``monai.data.SmartCacheDataset`` whose window is a function of ``(seed, epoch)``, for exact resume.

    The entries are shuffled once with ``seed``; epoch ``e`` trains on the ``cache_num`` entries from position
    ``e * replace_num`` of that order (wrapping around), where ``replace_num = ceil(cache_num * replace_rate)``.
    Call :meth:`set_epoch` before every epoch (the trainer does, through the loader's dataset): the next epoch's
    window is the current one shifted by ``replace_num``, whose new volumes a background thread prepared during
    the epoch (MONAI's ``update_cache``); any other epoch, the first one of a resumed run included, fills its
    window directly. Nothing is cached before the first :meth:`set_epoch`, so a resumed run does not fill the
    first epoch's window in vain. A loader over this dataset must not keep its worker processes between epochs
    (they would keep an old window); ``dae.data.seeded_loader`` re-creates them.

    Args:
        data: the datalist entries.
        transform: deterministic and random transforms (a ``Compose``).
        cache_num: volumes in the window (at most the number of entries).
        replace_rate: share of the window replaced every epoch, in (0, 1].
        seed: seed of the order of the entries.
        num_workers: threads that prepare volumes.
        progress: show a progress bar while a window is filled directly.
    """

    changes_every_epoch = True

    def __init__(
        self,
        data: Sequence,
        transform: Callable,
        cache_num: int,
        replace_rate: float = 0.25,
        seed: int = 0,
        num_workers: int = 1,
        progress: bool = True,
    ) -> None:
        if isinstance(cache_num, bool) or not isinstance(cache_num, int) or cache_num < 1:
            raise ValueError(f"cache_num must be a positive integer, got {cache_num!r}")
        if not 0 < replace_rate <= 1:
            raise ValueError(f"replace_rate must be in (0, 1], got {replace_rate!r}")
        if len(data) < 2:
            raise ValueError(f"a rolling cache needs at least 2 entries, got {len(data)}: use cache 'memory'")
        order = np.random.default_rng(seed).permutation(len(data))
        self._deferred = True  # _fill_cache caches nothing until set_epoch places the window
        super().__init__(
            [data[i] for i in order],
            transform=transform,
            replace_rate=replace_rate,
            cache_num=min(cache_num, len(data) - 1),  # the window must leave volumes to rotate in
            num_init_workers=num_workers,
            num_replace_workers=num_workers,
            progress=progress,
            shuffle=False,
        )
        self._deferred = False
        self.epoch: int | None = None

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        if self._deferred:
            return []
        return super()._fill_cache(indices)

    def window(self, epoch: int) -> list[int]:
        """Positions, in the shuffled order (``self.data``), of the entries that ``epoch`` trains on."""
        start = epoch * self._replace_num % self._total_num
        return [(start + k) % self._total_num for k in range(self.cache_num)]

    def set_epoch(self, epoch: int) -> None:
        """Place the window of ``epoch`` (0-based) in the cache; blocks until its volumes are ready."""
        if epoch == self.epoch:
            return
        if self.epoch is not None and epoch == self.epoch + 1:
            self.update_cache()
        else:
            self.shutdown()
            self._start_pos = epoch * self._replace_num % self._total_num
            self._cache = self._fill_cache(self.window(epoch))
            self._compute_data_idx()
            self.start()
        self.epoch = epoch

    def _data_position(self, index: int) -> int:
        return (self._start_pos + index) % self._total_num

    def __getitem__(self, index: Any) -> Any:
        if self.epoch is None:
            raise RuntimeError("RollingCacheDataset.set_epoch(epoch) must be called before the first item is read")
        return super().__getitem__(index)


def cache_dataset(
    mode: str,
    data: Sequence,
    transform: Callable,
    cache_rate: float = 1.0,
    num_workers: int = 1,
    cache_dir: str | Path | None = None,
    cache_num: int | None = None,
    replace_rate: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> CacheDataset | PersistentDataset | RollingCacheDataset:
    """The dataset of one ``cache`` mode (see the module docstring), for a bundle's ``dataset`` entry.

    Args:
        mode: ``memory``, ``disk`` or ``smart``.
        data: the datalist entries.
        transform: deterministic and random transforms (a ``Compose``).
        cache_rate: memory: share of the entries cached (the rest is prepared every time it is read).
        num_workers: threads that fill the cache (memory, smart).
        cache_dir: disk: the folder of the cache files (required).
        cache_num: smart: volumes in the window (required).
        replace_rate: smart: share of the window replaced every epoch.
        seed: smart: seed of the order in which entries pass through the window.
        progress: show a progress bar while caching.

    Raises:
        ValueError: an unknown mode, or the setting a mode needs is missing.
    """
    if mode == "memory":
        return CacheDataset(
            data, transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress
        )
    if mode == "disk":
        if cache_dir is None:
            raise ValueError("cache 'disk' needs a cache_dir")
        return PersistentDataset(data, transform=transform, cache_dir=cache_dir)
    if mode == "smart":
        if cache_num is None:
            raise ValueError("cache 'smart' needs cache_num, the number of volumes kept in memory")
        return RollingCacheDataset(data, transform, cache_num, replace_rate, seed, num_workers, progress)
    raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")


def validation_cache_mode(cache: str) -> str:
    """The cache mode of validation lists for a run's ``cache``: the same, but ``memory`` for ``smart``.

    A validation set must be the same at every validation, which a rolling window is not.
    """
    return "memory" if cache == "smart" else cache


def smart_window_sizes(total: int, cache_num: int, replace_rate: float) -> tuple[int, int]:
    """``(cache_num, replace_num)`` as :class:`RollingCacheDataset` uses them for ``total`` entries."""
    window = min(cache_num, total - 1)
    return window, min(math.ceil(window * replace_rate), total - window)
