"""MONAI's ``CacheDataset`` with errors that name the datalist entry they come from."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from monai.data import CacheDataset as MonaiCacheDataset

from dae.errors import DataError

__all__ = ["CacheDataset", "NamedEntryErrors", "entry_error"]

# MONAI's apply_transform wraps a failure in RuntimeError("applying transform <pkg.Name object at 0x...>")
_TRANSFORM = re.compile(r"applying transform <(?:function )?([\w.<>]+)")


class NamedEntryErrors:
    """Mix-in for MONAI datasets: a failure while an entry is prepared is re-raised as a :class:`~dae.errors.DataError`.

    The error names the entry's index, its ``image`` and ``label`` paths, the innermost MONAI transform that
    failed and the original error's type and message; the original error is chained (``raise ... from``).
    """

    data: Sequence

    def _data_position(self, index: int) -> int:
        """The position in ``self.data`` of the item read as ``dataset[index]``."""
        return index

    def _load_cache_item(self, idx: int) -> Any:
        try:
            return super()._load_cache_item(idx)  # type: ignore[misc]
        except Exception as e:
            raise entry_error(self.data, idx, e) from e

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)  # type: ignore[misc]
        except Exception as e:
            if getattr(e, "dataset_index", None) is not None:  # raised by _load_cache_item for a runtime cache
                raise
            raise entry_error(self.data, self._data_position(index), e) from e


class CacheDataset(NamedEntryErrors, MonaiCacheDataset):
    """``monai.data.CacheDataset`` whose failures name the entry that caused them (:class:`NamedEntryErrors`).

    Any exception raised while an entry is prepared (when the cache is filled, when an uncached entry is
    transformed with ``cache_rate < 1``, or in the random transforms run after the cache) is re-raised as a
    :class:`~dae.errors.DataError`. It takes the arguments of ``monai.data.CacheDataset``.
    """


def entry_error(data: Sequence, index: int, error: BaseException) -> DataError:
    """The :class:`~dae.errors.DataError` naming ``data[index]`` for ``error`` raised while it was prepared."""
    entry = data[index]
    paths = [f"{key} {entry[key]}" for key in ("image", "label") if isinstance(entry, Mapping) and key in entry]
    transforms = []
    root = error
    while True:
        match = _TRANSFORM.match(str(root))
        if match:
            transforms.append(match.group(1).rsplit(".", 1)[-1])
        if root.__cause__ is None:
            break
        root = root.__cause__
    where = f" in transform {transforms[-1]}" if transforms else ""
    reason = " ".join(str(root).split())
    described = f"entry {index} ({', '.join(paths)})" if paths else f"entry {index}"
    wrapped = DataError(f"Cannot prepare dataset {described}{where}: {type(root).__name__}: {reason}")
    wrapped.dataset_index = index
    return wrapped
