"""An epoch order that spreads every stratum (e.g. a modality) evenly, so that every batch mixes them.

A contrastive term across modalities learns only from batches that hold more than one modality. With 2 volumes
per batch, a random order puts a CT and an MR volume together in about half of the batches of a balanced
datalist; :class:`StratifiedEpochSampler` does so in every batch, and with unbalanced strata puts each one into
the batches in proportion to its size. Each sample still appears once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from dae.utils.seed import epoch_generator

__all__ = ["StratifiedEpochSampler", "stratified_order"]


def stratified_order(strata: Sequence[Hashable], generator: torch.Generator) -> list[int]:
    """A random order of ``range(len(strata))`` in which every stratum is spread evenly.

    Stratum ``g`` with ``n`` members gets the positions ``(j + u_g) / n``, ``j = 0 .. n-1``, for a random
    offset ``u_g`` in [0, 1), its members in random order; the samples are sorted by position (ties in random
    order). Any ``w`` consecutive samples therefore hold ``w * n / N`` members of the stratum, rounded up or down.

    Args:
        strata: the stratum of every sample (any hashable values).
        generator: the source of randomness.

    Returns:
        The sample indices in their order.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(index)
    keyed: list[tuple[float, float, int]] = []
    for members in groups.values():
        n = len(members)
        offset = torch.rand((), generator=generator).item()
        tie_breaks = torch.rand(n, generator=generator).tolist()
        for j, position in enumerate(torch.randperm(n, generator=generator).tolist()):
            keyed.append(((j + offset) / n, tie_breaks[j], members[position]))
    keyed.sort()
    return [index for _, _, index in keyed]


class StratifiedEpochSampler(Sampler[int]):
    """This rank's share of a stratified random order of the samples that is a function of ``(seed, epoch)``.

    The order of an epoch comes from :func:`stratified_order` with a generator seeded by
    ``SeedSequence(seed, spawn_key=(epoch,))`` (:func:`dae.utils.seed.epoch_generator`), as
    :class:`~dae.data.seeded_loading.EpochShuffleSampler`'s.
    Under ``num_replicas`` ranks, consecutive blocks of ``batch_size`` samples go to the ranks in turn, so that
    the ranks' batches of one iteration together are a consecutive stretch of the order: the global batch is
    mixed, as a loss gathered over the ranks needs. Every rank gets ``ceil(N / num_replicas)`` samples, the
    order wrapping around where that is more than ``N`` in all (as a padded ``DistributedSampler``).

    Args:
        strata: the stratum of every sample of the dataset, in the dataset's order.
        seed: base seed of the run.
        batch_size: samples per batch and rank.
        num_replicas: number of ranks.
        rank: this rank, in ``[0, num_replicas)``.
    """

    def __init__(
        self, strata: Sequence[Hashable], seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not strata:
            raise ValueError("strata must name the stratum of at least one sample")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.strata = list(strata)
        self.seed = seed
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = math.ceil(len(self.strata) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Order for ``epoch`` from now on."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = stratified_order(self.strata, epoch_generator(self.seed, self.epoch))
        blocks = math.ceil(self.num_samples / self.batch_size)
        needed = blocks * self.batch_size * self.num_replicas
        stream = order * math.ceil(needed / len(order))
        share = [
            index
            for block in range(self.rank, blocks * self.num_replicas, self.num_replicas)
            for index in stream[block * self.batch_size : (block + 1) * self.batch_size]
        ]
        return iter(share[: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples
