"""Check datalists before training: every image and label decoded completely, every bad entry reported at once.

:func:`check_data` is the bundles' entry point (their ``data_check`` key: ``deep``, ``basic`` or ``off``);
:func:`deep_check_lists` decodes the files in worker processes (:func:`~dae.data.image_check.inspect_entry`),
checks the label values against the classes, logs per-modality statistics and caches the results of unchanged
files in a JSON file, so that a resumed run does not decode them again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from dae.data.datalist import MODALITY_GROUPS, DatalistError, label_problem
from dae.data.image_check import inspect_entry
from dae.errors import ConfigError
from dae.utils.dist import get_rank, get_world_size, is_main_process

__all__ = ["CACHE_NAME", "CHECK_LEVELS", "ModalitySummary", "check_data", "deep_check_lists"]

CHECK_LEVELS: tuple[str, ...] = ("deep", "basic", "off")
"""Values of a bundle's ``data_check`` key."""

CACHE_NAME = "data_check.json"
"""File name of :func:`check_data`'s result cache in the run's output folder."""

_CACHE_VERSION = 1
_INTENSITY = ("min", "p1", "median", "p99", "max")
_SHOWN_VALUES = 10

logger = logging.getLogger(__name__)

Lists = Mapping[str, Sequence[Mapping]]
Problems = dict[tuple[str, int], list[str]]


@dataclass(frozen=True)
class ModalitySummary:
    """Statistics of the checked images of one modality.

    Attributes:
        modality: the entries' ``modality`` tag.
        count: number of distinct images.
        intensity: for each of an image's ``min``, ``p1``, ``median``, ``p99`` and ``max``: its lowest and highest
            value over the images.
        spacing: per axis, the min, median and max voxel size in mm (empty when no image gives one).
        shape: per axis, the min and max number of voxels (pixels: rows, columns for X-rays).
    """

    modality: str
    count: int
    intensity: dict[str, tuple[float, float]]
    spacing: tuple[tuple[float, float, float], ...]
    shape: tuple[tuple[int, int], ...]

    def __str__(self) -> str:
        intensity = ", ".join(f"{k} {_span(lo, hi)}" for k, (lo, hi) in self.intensity.items())
        spacing = " x ".join("/".join(f"{v:.4g}" for v in axis) for axis in self.spacing) or "not given"
        shape = " x ".join(_span(lo, hi, "d") for lo, hi in self.shape)
        return (
            f"{self.modality}: {self.count} images\n"
            f"    intensity (range over images): {intensity}\n"
            f"    spacing mm (min/median/max per axis): {spacing}\n"
            f"    shape: {shape}"
        )


def check_data(
    lists: Lists,
    level: str | bool | None = "deep",
    *,
    num_classes: int | None = None,
    label_maps: Mapping[str, Mapping[int, int]] | None = None,
    output_dir: str | Path | None = None,
    workers: int | None = None,
    require_label: bool | str = False,
    source: str | None = None,
) -> dict[str, ModalitySummary]:
    """Check loaded datalists as a bundle's ``data_check`` setting asks, raising one error for all bad entries.

    ``basic`` makes the checks that need no decoding: files exist, labels are present (``require_label``) and of
    the right kind, integer class labels lie in ``0..num_classes-1``, and each entry's ``id_table`` is a key of
    ``label_maps``. ``deep`` adds :func:`deep_check_lists`'s decoding, with its cache in
    ``<output_dir>/data_check.json``. ``off`` checks nothing. Under a process group every rank must call it:
    the files are decoded once, split over the ranks, and every rank gets every result.

    Args:
        lists: split name to entries, as returned by :func:`~dae.data.load_datalist` (paths resolved).
        level: ``"deep"``, ``"basic"`` or ``"off"`` (case-insensitive); False and None also mean off, since YAML
            reads a bare ``off`` as false.
        num_classes: number of classes, background included; None skips the class-range checks.
        label_maps: id table name to ``{stored id: class id}``, as given to :class:`~dae.data.RemapLabelsd`; None
            when labels are used as stored (an entry's ``id_table`` is then not applied).
        output_dir: the run's folder, for the cache; None: no cache.
        workers: decoding processes per rank (default ``min(8, CPUs / ranks on the node)``; 0 or 1: in this process).
        require_label: False, True (a class index or a label image), ``"class"`` or ``"image"``, as for
            :func:`~dae.data.load_datalist`.
        source: name of the datalist for the error message (e.g. its path).

    Returns:
        Per-modality statistics of the decoded images (empty unless ``level`` is ``deep``).

    Raises:
        ConfigError: ``level`` is not one of :data:`CHECK_LEVELS`.
        DatalistError: some entries are bad; one line per entry.
    """
    mode = _level(level)
    if mode == "off":
        return {}
    if mode == "deep":
        cache_file = Path(output_dir) / CACHE_NAME if output_dir is not None else None
        return deep_check_lists(
            lists,
            num_classes=num_classes,
            label_maps=label_maps,
            require_label=require_label,
            workers=workers,
            cache_file=cache_file,
            source=source,
        )
    _raise_for(lists, _basic_problems(lists, num_classes, label_maps, require_label), source)
    logger.info("Data check (basic): %d entries OK", sum(len(entries) for entries in lists.values()))
    return {}


def deep_check_lists(
    lists: Lists,
    *,
    num_classes: int | None = None,
    label_maps: Mapping[str, Mapping[int, int]] | None = None,
    require_label: bool | str = False,
    workers: int | None = None,
    cache_file: str | Path | None = None,
    source: str | None = None,
) -> dict[str, ModalitySummary]:
    """Decode every image and label image of ``lists`` completely and report every bad entry in one error.

    Besides the checks of :func:`check_data`'s ``basic`` level, each image must decode to its end, have 3
    spatial axes and one channel (X-rays, modality group ``XR``: a 2D image, read with
    :func:`~dae.data.read_xray`), hold only finite values and not be constant; a label image must decode, match
    the image's shape and grid, and hold integers that are ``0`` or ids of ``label_maps[entry["id_table"]]``, or
    else lie in ``0..num_classes-1`` (see :func:`~dae.data.image_check.inspect_entry`). Files are decoded in
    ``workers`` forked processes with a progress bar; with ``cache_file``, the results of files whose size and
    modification time are unchanged are read from it instead. Per-modality statistics are logged and returned.

    Args:
        lists: split name to entries, as returned by :func:`~dae.data.load_datalist` (paths resolved).
        num_classes: number of classes, background included; None skips the class-range checks.
        label_maps: id table name to ``{stored id: class id}``; None when labels are used as stored.
        require_label: False, True, ``"class"`` or ``"image"``, as for :func:`~dae.data.load_datalist`.
        workers: decoding processes per rank (default ``min(8, CPUs / ranks on the node)``; 0 or 1: in this process).
        cache_file: JSON file of results of earlier runs, updated here; None: no cache.
        source: name of the datalist for the error message (e.g. its path).

    Returns:
        Modality tag to the statistics of its images.

    Raises:
        DatalistError: a header naming ``source`` and the splits, then ``  [<split> <index>] <path>: <reasons>``
            for every bad entry.
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the processes of a node share its cores
    workers = min(8, max((os.cpu_count() or 1) // ranks_here, 1)) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    problems = _basic_problems(lists, num_classes, label_maps, require_label)
    jobs = {}
    for key, entry in _items(lists):
        label = entry.get("label")
        label = os.path.abspath(label) if isinstance(label, str) and os.path.exists(label) else None
        if os.path.exists(entry["image"]):
            jobs[key] = (os.path.abspath(entry["image"]), label, _is_xray(entry))
    results, decoded = _inspect_all(list(dict.fromkeys(jobs.values())), workers, cache_file)
    for (split, index), args in jobs.items():
        result = results[args]
        problems[split, index] += result["problems"]
        if result["label_values"] is not None:
            entry = lists[split][index]
            problems[split, index] += _label_value_problems(entry, result["label_values"], num_classes, label_maps)
    _raise_for(lists, problems, source)
    summaries = _summaries(lists, jobs, results)
    logger.info(
        "Data check (deep): %d entries OK, %d files decoded, %d results from the cache",
        len(problems),
        decoded,
        len(results) - decoded,
    )
    for summary in summaries.values():
        logger.info("%s", summary)
    return summaries


def _level(level: object) -> str:
    if level is False or level is None:
        return "off"
    if isinstance(level, str) and level.lower() in CHECK_LEVELS:
        return level.lower()
    raise ConfigError(f"data_check must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")


def _items(lists: Lists) -> list[tuple[tuple[str, int], Mapping]]:
    return [((split, index), entry) for split, entries in lists.items() for index, entry in enumerate(entries)]


def _is_xray(entry: Mapping) -> bool:
    group = entry.get("modality_group") or MODALITY_GROUPS.get(str(entry.get("modality", "")).upper())
    return group == "XR"


def _is_class(label: object) -> bool:
    return isinstance(label, int) and not isinstance(label, bool)


def _basic_problems(
    lists: Lists,
    num_classes: int | None,
    label_maps: Mapping[str, Mapping[int, int]] | None,
    require_label: bool | str,
) -> Problems:
    """The problems found without decoding, per ``(split, index)`` (every entry has a list, maybe empty)."""
    problems: Problems = {}
    for key, entry in _items(lists):
        found = problems[key] = []
        if not os.path.exists(entry["image"]):
            found.append("image does not exist")
        missing = label_problem(entry, require_label)
        if missing:
            found.append(missing)
        label = entry.get("label")
        if isinstance(label, str) and not os.path.exists(label):
            found.append(f"label {label} does not exist")
        if _is_class(label) and num_classes is not None and not 0 <= label < num_classes:
            found.append(f"class label {label} is outside 0..{num_classes - 1}")
        table = entry.get("id_table")
        if table is not None and label_maps is not None and table not in label_maps:
            found.append(f"id_table {table!r} is not a key of label_maps (keys: {', '.join(map(str, label_maps))})")
    return problems


def _label_value_problems(
    entry: Mapping, values: list[int], num_classes: int | None, label_maps: Mapping[str, Mapping[int, int]] | None
) -> list[str]:
    table = entry.get("id_table")
    if table is not None and label_maps is not None:
        if table not in label_maps:
            return []  # reported by _basic_problems
        ids = {0, *(int(k) for k in label_maps[table])}  # RemapLabelsd sends ids missing from the table to 0
        bad = [v for v in values if v not in ids]
        return (
            [f"label {entry['label']}: values {_show(bad)} are neither 0 nor ids of label_maps[{table!r}]"]
            if bad
            else []
        )
    bad = [v for v in values if num_classes is not None and v >= num_classes]
    if not bad:
        return []
    note = f" (its id_table {table!r} is not applied: label_maps is not set)" if table is not None else ""
    return [f"label {entry['label']}: values {_show(bad)} are outside the classes 0..{num_classes - 1}{note}"]


def _show(values: Sequence[int]) -> str:
    shown = ", ".join(map(str, values[:_SHOWN_VALUES]))
    return f"[{shown}{', ...' if len(values) > _SHOWN_VALUES else ''}]"


def _span(low: float, high: float, spec: str = ".4g") -> str:
    return format(low, spec) if low == high else f"{low:{spec}}..{high:{spec}}"


def _raise_for(lists: Lists, problems: Problems, source: str | None) -> None:
    lines = []
    for (split, index), entry in _items(lists):
        if problems[split, index]:
            lines.append(f"  [{split} {index}] {entry['image']}: {'; '.join(problems[split, index])}")
    if lines:
        name = f"{source or 'the datalist'} ({', '.join(repr(split) for split in lists)})"
        header = f"Data check of {name}: {len(lines)} of {len(problems)} entries are invalid:"
        raise DatalistError("\n".join([header, *lines]))


def _inspect_all(
    jobs: list[tuple[str, str | None, bool]], workers: int, cache_file: str | Path | None
) -> tuple[dict[tuple, dict[str, Any]], int]:
    """:func:`inspect_entry` of every job, read from the cache where its files are unchanged; and the decoded count."""
    cache_path = Path(cache_file) if cache_file is not None else None
    cache = _read_cache(cache_path)
    results, todo = {}, {}
    for args in jobs:
        key, fingerprint = json.dumps(args), _fingerprint(args)
        cached = cache.get(key)
        if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
            results[args] = cached["result"]
        else:
            todo[args] = fingerprint
    results |= _decode_shared(list(todo), workers)
    if cache_path is not None and todo and is_main_process():
        for args, fingerprint in todo.items():
            if results[args]["problems"]:
                cache.pop(json.dumps(args), None)
            else:
                cache[json.dumps(args)] = {"fingerprint": fingerprint, "result": results[args]}
        _write_cache(cache_path, cache)
    return results, len(todo)


def _fingerprint(args: tuple[str, str | None, bool]) -> list[list[int] | None]:
    """Size and modification time of the image and label (for a DICOM folder: file count, total size, latest)."""
    prints = []
    for path in args[:2]:
        if path is None:
            prints.append(None)
        elif os.path.isdir(path):
            stats = [f.stat() for f in os.scandir(path) if f.is_file()]
            prints.append([len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
        else:
            stat = os.stat(path)
            prints.append([stat.st_size, stat.st_mtime_ns])
    return prints


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("Ignoring the unreadable data-check cache %s (%s)", path, e)
        return {}
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        return {}
    return dict(content.get("entries", {}))


def _write_cache(path: Path, entries: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed, so that concurrent ranks and interrupted runs never leave a torn file
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump({"version": _CACHE_VERSION, "entries": entries}, f)
    os.replace(f.name, path)


def _decode_shared(jobs: list[tuple[str, str | None, bool]], workers: int) -> dict[tuple, dict[str, Any]]:
    """:func:`_decode_all` with the jobs split over the ranks of a process group, every rank getting all results."""
    world = get_world_size()
    mine = _decode_all(jobs[get_rank() :: world], workers)
    if world == 1:
        return mine
    shares: list[dict[tuple, dict[str, Any]] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {args: result for share in shares for args, result in share.items()}


def _decode_all(jobs: list[tuple[str, str | None, bool]], workers: int) -> dict[tuple, dict[str, Any]]:
    results = {}
    with tqdm(total=len(jobs), desc="Decoding data", unit="entry", disable=not jobs or not is_main_process()) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for args in jobs:
                results[args] = inspect_entry(*args)
                bar.update()
            return results
        # forked workers skip re-importing torch and MONAI (seconds each); inspect_entry runs no torch operations
        context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            futures = {pool.submit(inspect_entry, *args): args for args in jobs}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    return results


def _summaries(
    lists: Lists, jobs: Mapping[tuple[str, int], tuple], results: Mapping[tuple, dict[str, Any]]
) -> dict[str, ModalitySummary]:
    by_modality: dict[str, dict[str, dict[str, Any]]] = {}
    for (split, index), args in jobs.items():
        modality = str(lists[split][index].get("modality", "unknown"))
        by_modality.setdefault(modality, {})[args[0]] = results[args]["stats"]
    summaries = {}
    for modality, images in sorted(by_modality.items()):
        stats = list(images.values())
        axes = range(len(stats[0]["shape"]))
        spacings = [[s["spacing"][a] for s in stats if s["spacing"][a] is not None] for a in axes]
        summaries[modality] = ModalitySummary(
            modality=modality,
            count=len(stats),
            intensity={k: (min(s[k] for s in stats), max(s[k] for s in stats)) for k in _INTENSITY},
            spacing=tuple((min(v), statistics.median(v), max(v)) for v in spacings) if all(spacings) else (),
            shape=tuple((min(s["shape"][a] for s in stats), max(s["shape"][a] for s in stats)) for a in axes),
        )
    return summaries
