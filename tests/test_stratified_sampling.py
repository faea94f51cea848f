"""The stratified epoch order: every batch mixes the strata (modalities), as a function of (seed, epoch)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import CacheDataset

from dae.data.seeded_loading import seeded_loader
from dae.data.stratified_sampling import StratifiedEpochSampler, stratified_order


def _windows_are_proportional(order: list[int], strata: list[str], width: int) -> bool:
    n = len(strata)
    for stratum in set(strata):
        share = width * strata.count(stratum) / n
        for start in range(n - width + 1):
            count = sum(strata[i] == stratum for i in order[start : start + width])
            if not math.floor(share) <= count <= math.ceil(share):
                return False
    return True


@pytest.mark.parametrize("seed", range(20))
def test_order_is_a_permutation_that_spreads_every_stratum(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    balanced = ["CT", "MR"] * 3
    order = stratified_order(balanced, generator)
    assert sorted(order) == list(range(6))
    assert all({balanced[order[i]], balanced[order[i + 1]]} == {"CT", "MR"} for i in range(0, 6, 2))

    unbalanced = ["CT"] * 3 + ["MR"] * 9  # the GPU small-data list: every 4 consecutive hold exactly 1 CT
    order = stratified_order(unbalanced, generator)
    assert sorted(order) == list(range(12))
    for width in (2, 3, 4, 5):
        assert _windows_are_proportional(order, unbalanced, width)


def test_a_random_order_mixes_fewer_batches() -> None:
    """The reason for the sampler: with 2 volumes per batch a plain shuffle often pairs one modality."""
    strata = ["CT"] * 3 + ["MR"] * 3
    generator = torch.Generator().manual_seed(0)
    plain = [torch.randperm(6, generator=generator).tolist() for _ in range(200)]
    mixed = sum(strata[o[i]] != strata[o[i + 1]] for o in plain for i in range(0, 6, 2)) / (3 * 200)
    assert 0.45 < mixed < 0.75  # 60% in expectation


def test_sampler_is_a_function_of_seed_and_epoch() -> None:
    strata = ["CT"] * 4 + ["MR"] * 6
    a, b = StratifiedEpochSampler(strata, seed=1), StratifiedEpochSampler(strata, seed=1)
    b.set_epoch(2)
    list(b)
    a.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(10)) and len(a) == 10
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(StratifiedEpochSampler(strata, seed=2)) != list(StratifiedEpochSampler(strata, seed=1))


@pytest.mark.parametrize(("n", "world", "batch"), [(6, 2, 1), (12, 2, 2), (7, 2, 2), (9, 4, 1)])
def test_ranks_share_an_epoch_and_their_global_batches_mix(n: int, world: int, batch: int) -> None:
    strata = (["CT", "MR"] * n)[:n]
    shares = []
    for rank in range(world):
        sampler = StratifiedEpochSampler(strata, seed=0, batch_size=batch, num_replicas=world, rank=rank)
        sampler.set_epoch(5)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler) == math.ceil(n / world)
    assert set().union(*shares) == set(range(n))
    if n % world == 0 and n % (batch * world) == 0:
        assert sorted(i for share in shares for i in share) == list(range(n))  # no padding: each sample once
    single = StratifiedEpochSampler(strata, seed=0)
    single.set_epoch(5)
    order = list(single)
    for step in range(n // (batch * world)):  # global batch = a consecutive stretch of the epoch's order
        gathered = [i for share in shares for i in share[step * batch : (step + 1) * batch]]
        assert gathered == order[step * batch * world : (step + 1) * batch * world]


def _labelled(n: int) -> CacheDataset:
    return CacheDataset([{"label": i % 2} for i in range(n)], transform=None, progress=False)


def test_loader_batches_mix_the_strata_at_every_epoch() -> None:
    dataset = _labelled(6)
    loader = seeded_loader(dataset, 2, seed=0, strata=["CT" if i % 2 == 0 else "MR" for i in range(6)])
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)
        batches = [batch["label"].tolist() for batch in loader]
        assert len(batches) == 3 and all(sorted(b) == [0, 1] for b in batches)


def test_loader_refuses_strata_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="strata name 5 samples but the dataset has 6"):
        seeded_loader(_labelled(6), 2, seed=0, strata=["CT"] * 5)
    with pytest.raises(ValueError, match="shuffle"):
        seeded_loader(_labelled(6), 2, seed=0, shuffle=False, strata=["CT"] * 6)
    rolling = _labelled(4)
    rolling.changes_every_epoch = True  # as RollingCacheDataset (cache: smart)
    with pytest.raises(ValueError, match="rolling cache"):
        seeded_loader(rolling, 2, seed=0, strata=["CT"] * 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"strata": []}, "at least one"), ({"rank": 2, "num_replicas": 2}, "rank"), ({"batch_size": 0}, "batch_size")],
)
def test_sampler_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StratifiedEpochSampler(**{"strata": ["CT"], "seed": 0, **kwargs})
