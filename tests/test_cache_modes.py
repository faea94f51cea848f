"""The three cache modes (memory, disk, smart): contents, exact resume of the data stream, size checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropSamplesd, Spacingd

from dae.data import (
    PersistentDataset,
    RollingCacheDataset,
    cache_dataset,
    check_cache_size,
    seeded_loader,
    transform_fingerprint,
)
from dae.errors import CacheSizeError, ConfigError, DataError, DiskSpaceError

GIB = 1024**3


def volumes(folder, count: int, shape=(16, 16, 12)) -> list[dict]:
    """``count`` NIfTI volumes whose voxels all hold their index, as datalist entries."""
    entries = []
    for i in range(count):
        path = folder / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.full(shape, i, dtype=np.float32), np.eye(4)), path)
        entries.append({"image": str(path), "modality": "CT", "id": i})
    return entries


def transforms(pixdim=(1.0, 1.0, 1.0)) -> Compose:
    return Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Spacingd("image", pixdim=pixdim),
            RandSpatialCropSamplesd("image", roi_size=(8, 8, 8), num_samples=1, random_size=False),
        ]
    )


def epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    return [batch["image"].clone() for batch in loader]


def test_fingerprint_follows_settings_not_objects():
    assert transform_fingerprint(transforms()) == transform_fingerprint(transforms())
    assert transform_fingerprint(transforms()) != transform_fingerprint(transforms(pixdim=(2.0, 2.0, 2.0)))


def test_disk_cache_is_written_once_and_read_back(tmp_path):
    entries = volumes(tmp_path, 3)
    cache = tmp_path / "cache"
    first = cache_dataset("disk", entries, transforms(), cache_dir=cache)
    assert isinstance(first, PersistentDataset)
    _ = [first[i] for i in range(3)]
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]

    again = PersistentDataset(entries, transforms(), cache)
    assert [float(again[i][0]["image"].mean()) for i in range(3)] == [0.0, 1.0, 2.0]
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == stamps  # read, not rewritten

    PersistentDataset(entries, transforms(pixdim=(2.0, 2.0, 2.0)), cache)[0]
    assert len(list(cache.glob("*.pt"))) == 4  # other settings, another file


def test_disk_cache_names_the_failing_entry(tmp_path):
    entries = volumes(tmp_path, 2)
    (tmp_path / "vol1.nii.gz").write_bytes(b"not an image")
    dataset = PersistentDataset(entries, transforms(), tmp_path / "cache")
    with pytest.raises(DataError, match=r"entry 1 \(image .*vol1.nii.gz\)"):
        dataset[1]


def test_rolling_window_moves_by_replace_num_and_jumps_to_any_epoch(tmp_path):
    entries = volumes(tmp_path, 7)
    rolling = RollingCacheDataset(entries, transforms(), cache_num=4, replace_rate=0.5, seed=3, progress=False)
    try:
        assert len(rolling) == 4 and rolling._cache == []  # nothing cached before set_epoch
        seen = []
        for epoch in range(4):
            rolling.set_epoch(epoch)
            ids = [int(item["id"]) for item in rolling._cache]
            assert ids == [int(rolling.data[p]["id"]) for p in rolling.window(epoch)]
            seen.append(ids)
        assert seen[1][:2] == seen[0][2:]  # two volumes replaced per epoch
        assert {i for ids in seen for i in ids} == set(range(7))  # every volume passes through the window

        resumed = RollingCacheDataset(entries, transforms(), cache_num=4, replace_rate=0.5, seed=3, progress=False)
        resumed.set_epoch(3)
        assert [int(item["id"]) for item in resumed._cache] == seen[3]
        resumed.shutdown()
    finally:
        rolling.shutdown()


def test_rolling_cache_resumes_the_same_batches(tmp_path):
    entries = volumes(tmp_path, 7)

    def loader():
        dataset = cache_dataset("smart", entries, transforms(), cache_num=4, replace_rate=0.5, seed=1, progress=False)
        return seeded_loader(dataset, batch_size=2, seed=1, num_workers=0)

    straight = loader()
    batches = [epoch_batches(straight, epoch) for epoch in range(3)]
    resumed = loader()
    assert all(torch.equal(a, b) for a, b in zip(batches[2], epoch_batches(resumed, 2)))
    assert not torch.equal(batches[0][0], batches[1][0])
    for one in (straight, resumed):
        one.dataset.dataset.shutdown()


def test_rolling_cache_refuses_reads_before_set_epoch(tmp_path):
    rolling = RollingCacheDataset(volumes(tmp_path, 3), transforms(), cache_num=2, progress=False)
    with pytest.raises(RuntimeError, match="set_epoch"):
        rolling[0]


def test_memory_estimate_refused_above_the_budget_with_alternatives(tmp_path):
    entries = volumes(tmp_path, 4)  # 16*16*12 float32 = 12 KiB each at 1 mm
    lists = {"training": entries[:3], "validation": entries[3:]}
    estimate = check_cache_size(lists, (1.0, 1.0, 1.0), budget_gb=1.0)
    assert estimate.ram_bytes == 4 * 16 * 16 * 12 * 4 and estimate.disk_bytes == 0

    with pytest.raises(CacheSizeError) as caught:
        check_cache_size(lists, (1.0, 1.0, 1.0), budget_gb=50 * 1024 / GIB)  # 90% of it: 45 KiB
    message = str(caught.value)
    assert "48.0 KiB" in message and "cache: disk" in message and "cache: smart with cache_num up to about 2" in message
    assert "cache_rate" in message


def test_estimate_counts_the_processes_of_a_node_and_the_smart_window(tmp_path, monkeypatch):
    entries = volumes(tmp_path, 5)
    one = 16 * 16 * 12 * 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check_cache_size({"training": entries}, None, budget_gb=1.0).ram_bytes == 2 * 5 * one
    smart = check_cache_size(
        {"training": entries, "validation": entries[:1]}, None, cache="smart", cache_num=2, replace_rate=0.5
    )
    assert smart.ram_bytes == 2 * (2 + 1) * one + 2 * one  # window and its replacement, validation in memory


def test_disk_estimate_subtracts_what_is_written_and_checks_the_disk(tmp_path):
    entries = volumes(tmp_path, 2)
    cache = tmp_path / "cache"
    estimate = check_cache_size({"training": entries}, None, cache="disk", cache_dir=cache)
    assert estimate.disk_bytes == 2 * 16 * 16 * 12 * 4 and estimate.ram_bytes == 0
    PersistentDataset(entries, transforms(), cache)[0]
    assert check_cache_size({"training": entries}, None, cache="disk", cache_dir=cache).disk_bytes < estimate.disk_bytes
    with pytest.raises(DiskSpaceError, match="cache_budget_gb"):
        check_cache_size({"training": entries}, None, cache="disk", cache_dir=cache, budget_gb=1e-6)


def test_bad_cache_settings_are_named(tmp_path):
    entries = volumes(tmp_path, 2)
    with pytest.raises(ConfigError, match="cache: expected one of memory, disk, smart"):
        check_cache_size({"training": entries}, None, cache="ram")
    with pytest.raises(ConfigError, match="cache_num"):
        check_cache_size({"training": entries}, None, cache="smart")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cache_dir"):
        check_cache_size({"training": entries}, None, cache="disk", cache_dir=tmp_path / "file" / "sub")
