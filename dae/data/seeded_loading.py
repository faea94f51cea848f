"""Training loaders whose random stream depends only on ``(seed, epoch, sample index)``.

MONAI's ``DataLoader`` seeds each worker's transforms once, from torch's global generator, when the epoch's
iterator is created; a resumed run draws the same crops only if the workers are re-created every epoch, with the
same number of workers and the same samples per worker. Here the loader's sampler yields ``(epoch, index)``
pairs and the dataset seeds every generator the transforms use from ``(seed, epoch, index)`` just before it
produces that sample, so the crops are the same whether the workers persist across epochs, how many there are
and which of them loads a sample, and a resumed run needs only ``loader.sampler.set_epoch(epoch)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator, Sequence, Sized
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.data.utils import set_rnd
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

from dae.data.stratified_sampling import StratifiedEpochSampler
from dae.utils.dist import get_rank, get_world_size, is_distributed
from dae.utils.seed import epoch_generator

__all__ = ["EpochSampler", "EpochShuffleSampler", "SeededDataset", "sample_seeds", "seeded_loader"]


def _check_non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int, int, int]:
    """The seeds of sample ``index`` in ``epoch``: for the MONAI transforms, NumPy, Python and torch.

    They come from ``numpy.random.SeedSequence(seed, spawn_key=(epoch, index))``, which hashes all three
    numbers, so neighbouring samples, epochs and runs get unrelated streams (``seed + epoch + index`` would
    give sample 1 of epoch 0 the stream of sample 0 of epoch 1).

    Returns:
        ``(monai, numpy, python, torch)``: three 32-bit seeds and a 64-bit one.
    """
    words = np.random.SeedSequence(seed, spawn_key=(epoch, index)).generate_state(5)
    return int(words[0]), int(words[1]), int(words[2]), int(words[3]) << 32 | int(words[4])


@contextmanager
def _generators_restored(enabled: bool) -> Iterator[None]:
    """Restore torch's CPU, NumPy's and Python's global generators on exit (when ``enabled``)."""
    if not enabled:
        yield
        return
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededDataset(Dataset):
    """A map-style dataset whose items are addressed by ``(epoch, index)`` and seeded from them.

    Before producing ``dataset[index]``, the MONAI randomizable transforms of ``dataset.transform`` are seeded
    with ``monai.data.utils.set_rnd`` (on the transform, not the dataset: ``set_rnd`` walks every attribute, a
    ``CacheDataset``'s whole cache included), and torch's CPU generator (torchvision's v2 transforms draw from
    it), NumPy's and Python's global generators are seeded too, all from :func:`sample_seeds`. In the main
    process (``num_workers=0``) those global generators are restored afterwards, so loading does not move the
    training's random stream; a worker process needs no restoring. CUDA generators are not seeded: the
    transforms run on the CPU.

    Args:
        dataset: a map-style dataset (e.g. MONAI's ``CacheDataset``); its ``transform`` attribute, if any, is
            re-seeded before every item.
        seed: base seed of the run, the same on every rank (an integer >= 0).

    Raises:
        ValueError: if ``seed`` is negative or ``dataset`` is empty.
        TypeError: if ``dataset`` has no length.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        _check_non_negative("seed", seed)
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise TypeError(f"a map-style dataset with a length is needed, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"the {type(dataset).__name__} is empty: check the datalist and its filters")
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Tell the wrapped dataset the epoch, if it changes with it (``dae.data.RollingCacheDataset``'s window)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        """Sample ``index`` of ``epoch``, for ``key = (epoch, index)`` (as :class:`EpochSampler` yields)."""
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"SeededDataset items are addressed by (epoch, index), got {key!r}")
        epoch, index = key
        monai_seed, numpy_seed, python_seed, torch_seed = sample_seeds(self.seed, epoch, index)
        with _generators_restored(enabled=get_worker_info() is None):
            torch.default_generator.manual_seed(torch_seed)  # torch.manual_seed would also seed every GPU (slow)
            np.random.seed(numpy_seed)
            random.seed(python_seed)
            transform = getattr(self.dataset, "transform", None)
            if transform is not None:
                set_rnd(transform, monai_seed)
            return self.dataset[index]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(size)`` that is a function of ``(seed, epoch)`` only.

    Each epoch's order comes from its own ``torch.Generator`` seeded with ``SeedSequence(seed, spawn_key=(epoch,))``
    (a stream apart from the samples' :func:`sample_seeds`); call :meth:`set_epoch` before every epoch.

    Args:
        size: number of samples.
        seed: base seed of the run.
    """

    def __init__(self, size: int, seed: int) -> None:
        _check_non_negative("size", size)
        _check_non_negative("seed", seed)
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from now on."""
        _check_non_negative("epoch", epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every index of ``sampler``, to address a :class:`SeededDataset`.

    Args:
        sampler: the index sampler; its ``set_epoch`` (e.g. ``DistributedSampler``'s or
            :class:`EpochShuffleSampler`'s), if any, is called by :meth:`set_epoch`.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iterations those of ``epoch`` (0-based); call it before every epoch, and on resuming."""
        _check_non_negative("epoch", epoch)
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def seeded_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    persistent_workers: bool = True,
    distributed: bool | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    prefetch_factor: int | None = None,
    strata: Sequence[Hashable] | None = None,
) -> DataLoader:
    """A training loader whose batches are a function of ``(seed, epoch)`` only, with persistent workers.

    The loader's ``sampler`` is an :class:`EpochSampler` and its ``dataset`` a :class:`SeededDataset`; call
    ``loader.sampler.set_epoch(epoch)`` before every epoch (a resumed run: before its first). Under a process
    group the indices are split over the ranks by a ``DistributedSampler`` (padded to equal shares, as before);
    the sample seeds do not depend on the rank. The loader draws nothing from torch's global generator: its
    iterators take their base seed from a generator of their own.

    Args:
        dataset: the map-style training dataset (e.g. a ``CacheDataset`` with random transforms).
        batch_size: samples per batch and process (>= 1).
        seed: base seed of data order and augmentation (the same on every rank).
        shuffle: draw a new order every epoch.
        drop_last: drop the last incomplete batch (of each rank).
        num_workers: worker processes (0: load in the training process).
        persistent_workers: keep the workers between epochs (only with ``num_workers > 0``); the batches are the
            same either way. Ignored for a dataset whose content changes every epoch (``changes_every_epoch``, a
            rolling cache): workers are forked anew each epoch, so that they see the new window.
        distributed: split the samples over the ranks; None: when a process group with several ranks exists.
        num_replicas: ranks to split over (default: the process group's); implies ``distributed``.
        rank: this process's rank (default: the process group's).
        pin_memory: page-locked batches; None: when CUDA is available.
        collate_fn: batches from samples; None: MONAI's ``list_data_collate`` (flattens the lists of crops that
            ``num_samples`` transforms return), as MONAI's ``DataLoader``.
        prefetch_factor: batches loaded ahead per worker (None: PyTorch's default; only with workers).
        strata: the stratum of every sample (e.g. its modality group): each epoch's order spreads every stratum
            evenly (:class:`~dae.data.stratified_sampling.StratifiedEpochSampler`), so that every batch, and under
            a process group every global batch, mixes them in proportion. Needs ``shuffle`` and a dataset whose
            index -> sample mapping is fixed (not a rolling cache). None: a plain random order.

    Returns:
        A ``torch.utils.data.DataLoader`` with ``len(loader)`` batches per epoch, as a plain loader with the same
        ``batch_size``, ``drop_last`` and (under DDP) ``DistributedSampler`` has.

    Raises:
        ValueError: for an empty dataset, a batch size under 1, a negative number of workers or seed, a
            ``prefetch_factor`` without workers, ``num_replicas``/``rank`` with ``distributed=False``, ``strata``
            of another length than the dataset, without ``shuffle`` or over a rolling cache, or a loader that
            would yield no batch.
        TypeError: for a dataset without a length.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_non_negative("num_workers", num_workers)
    if prefetch_factor is not None and (num_workers == 0 or prefetch_factor < 1):
        raise ValueError(f"prefetch_factor must be >= 1 and needs num_workers > 0, got {prefetch_factor!r}")
    explicit_ranks = num_replicas is not None or rank is not None
    if distributed is False and explicit_ranks:
        raise ValueError("num_replicas and rank split the samples over ranks: they need distributed=True (or None)")
    seeded = SeededDataset(dataset, seed)
    split = bool(distributed or (distributed is None and (explicit_ranks or is_distributed())))
    if strata is not None:
        if not shuffle or getattr(dataset, "changes_every_epoch", False):
            raise ValueError(
                "strata need shuffle=True and a dataset whose samples keep their indices, not a rolling cache "
                "(cache: smart) whose slots change content every epoch"
            )
        if len(strata) != len(seeded):
            raise ValueError(f"strata name {len(strata)} samples but the dataset has {len(seeded)}")
        indices: Sampler[int] = StratifiedEpochSampler(
            strata,
            seed,
            batch_size=batch_size,
            num_replicas=(num_replicas or get_world_size()) if split else 1,
            rank=(get_rank() if rank is None else rank) if split else 0,
        )
    elif split:
        indices = DistributedSampler(
            seeded, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
    elif shuffle:
        indices = EpochShuffleSampler(len(seeded), seed)
    else:
        indices = SequentialSampler(seeded)
    loader = DataLoader(
        seeded,
        batch_size=batch_size,
        sampler=EpochSampler(indices),
        num_workers=num_workers,
        collate_fn=collate_fn or list_data_collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers
        and num_workers > 0
        and not getattr(dataset, "changes_every_epoch", False),
        prefetch_factor=prefetch_factor,
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training loader yields no batch: {len(indices)} samples per process "
            f"for batch_size {batch_size} with drop_last"
        )
    return loader
