"""Seeded training loaders: the batches depend on (seed, epoch) only, not on the workers or their persistence."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureTyped, MapTransform, RandomizableTrait, RandSpatialCropd
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from dae.data.seeded_loading import EpochShuffleSampler, SeededDataset, sample_seeds, seeded_loader

N_IMAGES, BATCH = 7, 3


class TorchvisionCrops(RandomizableTrait, MapTransform):
    """Two torchvision-v2 views of the image under "crops", drawn from torch's global generator (as DINO's)."""

    def __init__(self) -> None:
        super().__init__("image")
        self.view = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.ColorJitter(brightness=0.4)])

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d.pop("image")
        d["crops"] = [self.view(image), self.view(image)]
        return d


def make_dataset(n: int = N_IMAGES) -> CacheDataset:
    """Cached images, then a MONAI random crop (its own generator) and torchvision crops (torch's generator)."""
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, 24, 24, generator=g)} for _ in range(n)]
    transform = Compose(
        [
            EnsureTyped(keys="image", track_meta=False),
            RandSpatialCropd(keys="image", roi_size=(16, 16), random_size=False),
            TorchvisionCrops(),
        ]
    )
    return CacheDataset(data, transform, progress=False)


def run_epochs(loader: DataLoader, epochs) -> list[list[torch.Tensor]]:
    """Per epoch, the batches as [B, all crop pixels] tensors."""
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append([torch.cat([crop.flatten(1) for crop in batch["crops"]], 1) for batch in loader])
    return out


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    lengths_match = [len(x) for x in a] == [len(y) for y in b]
    return lengths_match and all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))


@pytest.fixture(scope="module")
def reference() -> list[list[torch.Tensor]]:
    return run_epochs(seeded_loader(make_dataset(), BATCH, seed=5), range(3))


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, True), (1, True), (2, True), (2, False)])
def test_batches_do_not_depend_on_workers_or_persistence(reference, num_workers, persistent):
    loader = seeded_loader(make_dataset(), BATCH, seed=5, num_workers=num_workers, persistent_workers=persistent)
    assert loader.persistent_workers == (persistent and num_workers > 0)
    assert same(run_epochs(loader, range(3)), reference)


def test_a_new_loader_set_to_epoch_1_repeats_epoch_1(reference):
    """What a resumed run does: a fresh dataset and loader, set_epoch(1) before its first epoch."""
    loader = seeded_loader(make_dataset(), BATCH, seed=5, num_workers=2)
    assert same(run_epochs(loader, [1]), reference[1:2])


def test_epochs_and_seeds_draw_different_orders_and_crops(reference):
    assert len(reference[0]) == 3  # 7 images in batches of 3
    flat = [torch.cat(epoch) for epoch in reference]
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[1], flat[2])
    # Without shuffling, every image still gets new crops each epoch.
    ordered = [torch.cat(e) for e in run_epochs(seeded_loader(make_dataset(), BATCH, seed=5, shuffle=False), [0, 1])]
    assert all(not torch.equal(a, b) for a, b in zip(ordered[0], ordered[1], strict=True))
    other_seed = run_epochs(seeded_loader(make_dataset(), BATCH, seed=6), [0])
    assert not same(other_seed, reference[:1])
    assert len({sample_seeds(*key) for key in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0)]}) == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loading_leaves_the_main_process_generators_alone(reference, num_workers):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    loader = seeded_loader(make_dataset(), BATCH, seed=5, num_workers=num_workers)
    assert same(run_epochs(loader, range(2)), reference[:2])  # also: whatever the main generators hold
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_transforms_are_seeded_without_walking_the_dataset():
    """set_rnd goes to the dataset's transform only: a CacheDataset's attributes include its whole cache."""

    class Untouchable:
        def set_random_state(self, seed=None, state=None):
            raise AssertionError("set_rnd walked the dataset")

    dataset = make_dataset()
    dataset.untouchable = Untouchable()
    assert SeededDataset(dataset, seed=0)[(0, 1)]["crops"][0].shape == (1, 8, 8)


def test_distributed_split_is_distributed_samplers():
    dataset = make_dataset()
    seen = []
    for rank in range(2):
        loader = seeded_loader(dataset, 2, seed=3, num_replicas=2, rank=rank, drop_last=True)
        loader.sampler.set_epoch(4)
        pairs = list(loader.sampler)
        expected = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        expected.set_epoch(4)
        assert pairs == [(4, i) for i in expected]
        assert len(loader) == len(DataLoader(dataset, batch_size=2, sampler=expected, drop_last=True)) == 2
        seen += [i for _, i in pairs]
    assert sorted(set(seen)) == list(range(N_IMAGES))  # 7 images padded to 4 per rank, as DistributedSampler


@pytest.mark.parametrize(("batch_size", "drop_last"), [(1, False), (3, False), (3, True), (7, True), (10, False)])
def test_length_is_a_plain_loaders(batch_size, drop_last):
    dataset = make_dataset()
    plain = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    assert len(seeded_loader(dataset, batch_size, seed=0, drop_last=drop_last)) == len(plain)


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    b.set_epoch(2)
    list(b)
    a.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"dataset": CacheDataset([], transform=None, progress=False)}, ValueError, "empty"),
        ({"dataset": (i for i in range(3))}, TypeError, "map-style"),
        ({"seed": -1}, ValueError, "seed"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"prefetch_factor": 2}, ValueError, "prefetch_factor"),
        ({"distributed": False, "rank": 1}, ValueError, "distributed"),
        ({"batch_size": 8, "drop_last": True}, ValueError, "no batch"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    args = {"dataset": make_dataset(), "batch_size": BATCH, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        seeded_loader(**args)


def test_items_need_an_epoch():
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        SeededDataset(make_dataset(), seed=0)[1]
    with pytest.raises(ValueError, match="epoch"):
        seeded_loader(make_dataset(), BATCH, seed=0).sampler.set_epoch(-1)
