"""Before a cache is filled: estimate its size from the image headers and refuse one that will not fit.

A ``CacheDataset`` larger than the free RAM gets the process killed by the kernel (exit code -9, no message),
hours into filling it; a disk cache larger than the free disk fails as late. :func:`check_cache_size` gives the
figures first and stops the run with the alternatives instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dae.data.cache_modes import CACHE_MODES, smart_window_sizes, validation_cache_mode
from dae.data.datalist import estimate_cache_bytes
from dae.errors import CacheSizeError, ConfigError, DiskSpaceError
from dae.utils.paths import free_disk_bytes, is_writable_folder
from dae.utils.sizes import format_bytes

__all__ = ["CACHE_MARGIN", "CacheEstimate", "available_memory_bytes", "check_cache_size"]

logger = logging.getLogger(__name__)

CACHE_MARGIN = 0.9
"""Share of the free RAM or disk a cache may take; the rest is left to the training itself."""

_GIB = 1024**3


@dataclass(frozen=True)
class CacheEstimate:
    """What the caches of a run will take, from the headers (volumes resampled, before foreground cropping).

    Attributes:
        ram_bytes: RAM on this node: every process on it holds its own memory or smart cache.
        disk_bytes: disk still to be written to the cache folder (what it already holds is subtracted).
        lines: one description per list.
    """

    ram_bytes: int
    disk_bytes: int
    lines: tuple[str, ...]


def available_memory_bytes() -> int:
    """RAM a new allocation can get: ``MemAvailable``, capped by the cgroup limit (containers, SLURM jobs)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def check_cache_size(
    lists: Mapping[str, Sequence[Mapping]],
    spacing: Sequence[float] | float | None,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_num: int | None = None,
    replace_rate: float = 0.25,
    cache_dir: str | os.PathLike | None = None,
    budget_gb: float | None = None,
    pad_to: Sequence[int] | None = None,
) -> CacheEstimate:
    """Log the estimated size of a run's caches, and stop the run when they will not fit.

    Meant for a bundle's ``initialize`` list, after the data check and before any dataset is built. The list
    named ``training`` uses ``cache``; the others use :func:`~dae.data.validation_cache_mode` (``memory`` for
    ``smart``). Sizes are float32 volumes at ``spacing``, padded to ``pad_to``, before foreground cropping (an
    upper bound):

    - ``memory``: the first ``cache_rate`` share of each list, times the processes on this node
      (``LOCAL_WORLD_SIZE`` under torchrun), against the available RAM (:func:`available_memory_bytes`);
    - ``disk``: every volume, less what ``cache_dir`` already holds, against the free space of its disk (the
      processes of a node share the folder);
    - ``smart``: the largest ``cache_num`` volumes plus those prepared for the next epoch, per process.

    A cache fits when it takes at most :data:`CACHE_MARGIN` of the free RAM or disk, or of ``budget_gb`` when
    given (to refuse earlier, or to run when the upper bound is known to be pessimistic).

    Args:
        lists: name -> datalist entries (loaded and validated).
        spacing: resampling target in mm (None: native spacing).
        cache: ``memory``, ``disk`` or ``smart``.
        cache_rate: memory: the share of each list cached.
        cache_num: smart: volumes in the window.
        replace_rate: smart: share of the window replaced every epoch.
        cache_dir: disk: the cache folder.
        budget_gb: GiB the caches may take instead of the free RAM (memory, smart) or disk (disk).
        pad_to: the size the preprocessing pads volumes to (the crop size), per axis.

    Returns:
        The estimate.

    Raises:
        ConfigError: an unknown ``cache``, smart without ``cache_num``, disk without a writable ``cache_dir``.
        CacheSizeError: the RAM the caches need exceeds the limit; the message gives both figures and the
            alternatives.
        DiskSpaceError: the disk cache exceeds the free space of its disk.
    """
    if cache not in CACHE_MODES:
        raise ConfigError(f"cache: expected one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if cache == "smart" and cache_num is None:
        raise ConfigError("cache_num: cache 'smart' needs the number of volumes kept in memory")
    folder = Path(cache_dir) if cache_dir is not None else None
    if cache == "disk" and (folder is None or not is_writable_folder(folder)):
        raise ConfigError(f"cache_dir: cache 'disk' needs a folder that can be created and written, got {cache_dir!r}")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram = disk = 0
    lines = []
    sizes_by_list = {
        name: [estimate_cache_bytes([entry], spacing, pad_to=pad_to) for entry in entries]
        for name, entries in lists.items()
    }
    for name, sizes in sizes_by_list.items():
        mode = cache if name == "training" else validation_cache_mode(cache)
        if mode == "memory":
            cached = int(cache_rate * len(sizes))
            size = sum(sizes[:cached])
            ram += size * ranks
            lines.append(f"{name}: {cached} of {len(sizes)} volumes in RAM, {format_bytes(size)} per process")
        elif mode == "smart":
            window, replace = smart_window_sizes(len(sizes), cache_num, replace_rate)
            size = sum(sorted(sizes, reverse=True)[: window + replace])
            ram += size * ranks
            lines.append(
                f"{name}: a window of {window} of {len(sizes)} volumes ({replace} replaced per epoch) in RAM, "
                f"at most {format_bytes(size)} per process"
            )
        else:
            size = sum(sizes)
            disk += size
            lines.append(f"{name}: {len(sizes)} volumes on disk in {folder}, {format_bytes(size)}")
    if disk:
        written = sum(f.stat().st_size for f in folder.glob("*.pt")) if folder.is_dir() else 0
        disk = max(disk - written, 0)
    per_node = f" ({ranks} processes on this node)" if ranks > 1 else ""
    logger.info("Cache '%s', estimated from the headers%s: %s", cache, per_node, "; ".join(lines))
    estimate = CacheEstimate(ram, disk, tuple(lines))
    _refuse_if_too_large(estimate, cache, sizes_by_list, folder, budget_gb, ranks, replace_rate)
    return estimate


def _refuse_if_too_large(
    estimate: CacheEstimate,
    cache: str,
    sizes_by_list: Mapping[str, Sequence[int]],
    folder: Path | None,
    budget_gb: float | None,
    ranks: int,
    replace_rate: float,
) -> None:
    given = budget_gb is not None
    if estimate.ram_bytes:
        limit = budget_gb * _GIB if given else available_memory_bytes()
        if estimate.ram_bytes > CACHE_MARGIN * limit:
            what = f"the budget of {budget_gb:g} GiB (cache_budget_gb)" if given else f"{format_bytes(limit)} of RAM"
            raise CacheSizeError(
                f"cache '{cache}' would take an estimated {format_bytes(estimate.ram_bytes)} of RAM on this node "
                f"({'; '.join(estimate.lines)}), more than {CACHE_MARGIN:.0%} of {what} available. "
                + _alternatives(cache, sizes_by_list, limit, ranks, replace_rate)
            )
    if estimate.disk_bytes and folder is not None:
        limit = budget_gb * _GIB if given else free_disk_bytes(folder)
        if estimate.disk_bytes > CACHE_MARGIN * limit:
            what = f"the budget of {budget_gb:g} GiB (cache_budget_gb)" if given else f"{format_bytes(limit)} free"
            raise DiskSpaceError(
                f"cache 'disk' would write an estimated {format_bytes(estimate.disk_bytes)} to {folder}, more than "
                f"{CACHE_MARGIN:.0%} of {what}.",
                advice="point --cache_dir to a larger disk (a node-local scratch disk is fastest), or use "
                "cache: smart with a cache_num that fits in RAM",
            )


def _alternatives(
    cache: str, sizes_by_list: Mapping[str, Sequence[int]], limit: float, ranks: int, replace_rate: float
) -> str:
    """The other cache modes with their figures, for the refusal message."""
    training = list(sizes_by_list.get("training", []))
    everything = [s for sizes in sizes_by_list.values() for s in sizes]
    options = [f"cache: disk needs about {format_bytes(sum(everything))} of disk and little RAM"]
    others = sum(s for name, sizes in sizes_by_list.items() if name != "training" for s in sizes) * ranks
    if training and cache != "smart":
        mean = sum(training) / len(training)
        room = (CACHE_MARGIN * limit - others) / ranks / (1 + replace_rate)
        window = int(room // mean) if mean else 0
        if window >= 2:
            options.append(f"cache: smart with cache_num up to about {min(window, len(training) - 1)}")
    if cache == "memory":
        options.append("a lower cache_rate (uncached volumes are prepared every time they are read)")
    elif cache == "smart":
        options.append("a smaller cache_num")
    options.append("cache_budget_gb to set the limit yourself (the estimate is an upper bound)")
    return "Alternatives: " + "; ".join(options) + "."
