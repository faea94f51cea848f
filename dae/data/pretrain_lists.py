"""Pretraining datalists at the paper's scale: link, split by patient, merge, report and write.

:func:`make_pretrain_datalist` scans folders with :func:`dae.data.pretrain_scan.scan_source` (each with a dataset
preset, :data:`dae.data.pretrain_presets.PRESETS`: the six public datasets of the DAE paper, with their download
layout, modality, tag and split size, or as a plain folder), then splits them: the validation split is seeded and
patient-grouped, of the paper's size for a preset folder holding the paper's count (:func:`validation_size`), and
the same series (by ``series_uid``, e.g. LUNA16 scans, which are LIDC-IDRI series) is listed once.
:func:`merge_datalists` merges lists written earlier, and :func:`resolve_overlaps` keeps separately written lists
from sharing a patient, series or image. Both return a :class:`PretrainReport` (counts per dataset and modality next
to the paper's, skipped files with reasons), and :func:`write_pretrain_datalist` checks the written list with
:func:`dae.data.load_datalist`.

Written entries are ``{"image", "modality", "tags": [dataset tag], "patient"}`` plus ``"series_uid"`` when known,
with ``image`` relative to the list's data root, which is recorded as the top-level ``data_root`` (absolute) so that
:func:`merge_datalists` can re-base lists written with other roots.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

from dae.data.datalist import DatalistError, load_datalist
from dae.data.pretrain_presets import PRESETS, Preset
from dae.data.pretrain_scan import DEFAULT_MIN_SLICES, Skipped, Source, scan_source

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "PretrainReport",
    "make_pretrain_datalist",
    "merge_datalists",
    "resolve_overlaps",
    "validation_size",
    "write_pretrain_datalist",
]

DEFAULT_VAL_FRACTION = 0.05
"""Validation fraction of a folder without a preset."""

_SPLITS = ("training", "validation")


@dataclass
class PretrainReport:
    """The written list and what the report prints about it.

    Attributes:
        output: the written JSON file.
        content: its content.
        skipped: files and series left out.
        dropped: copies of series listed twice (same ``series_uid`` or image) that were dropped, by tag.
        moved: training entries moved to validation because they are linked (same patient, or same series) to a
            validation entry of another list.
        notes: other remarks, one line each.
    """

    output: Path
    content: dict
    skipped: list[Skipped] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    moved: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self, verbose: bool = False, shown: int = 3) -> str:
        """The report: counts per dataset and modality, the paper's counts, duplicates, notes, skipped files.

        Args:
            verbose: list every skipped file; otherwise ``shown`` per reason.
            shown: skipped files listed per reason without ``verbose``.
        """
        training, validation = (self.content[k] for k in _SPLITS)
        lines = [
            f"Wrote {self.output}: {len(training)} training and {len(validation)} validation volumes, "
            f"paths relative to {self.content['data_root']}.",
            "",
            *_count_table(training, validation),
        ]
        paper = _paper_lines(training, validation, self.dropped)
        if paper:
            lines += ["", "Compared with the paper's Table 1:", *paper]
        if self.dropped:
            per_tag = ", ".join(f"{tag} {n}" for tag, n in sorted(self.dropped.items()))
            lines += ["", f"Dropped {sum(self.dropped.values())} copies of series or images listed already: {per_tag}."]
        if self.moved:
            lines.append(
                f"Moved {self.moved} training entries to validation: they share a patient or series with a "
                "validation entry."
            )
        if self.notes:
            lines += ["", *(f"Note: {note}" for note in self.notes)]
        if self.skipped:
            lines += ["", f"Skipped {len(self.skipped)} files or DICOM series:"]
            by_reason: dict[str, list[Skipped]] = defaultdict(list)
            for item in self.skipped:
                by_reason[item.reason].append(item)
            for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {reason} ({len(items)}):")
                listed = items if verbose else items[:shown]
                lines += [f"    {item}" for item in listed]
                if len(items) > len(listed):
                    lines.append(f"    ... and {len(items) - len(listed)} more (--verbose lists all)")
        return "\n".join(lines)


def _count_table(training: Sequence[Mapping], validation: Sequence[Mapping]) -> list[str]:
    train = Counter((_tag(e), e["modality"]) for e in training)
    val = Counter((_tag(e), e["modality"]) for e in validation)
    rows = sorted(set(train) | set(val))
    width = max([len("dataset"), *(len(tag) for tag, _ in rows)])
    lines = [f"  {'dataset':<{width}}  {'modality':<8}  {'training':>8}  {'validation':>10}"]
    lines += [f"  {t:<{width}}  {m:<8}  {train[t, m]:>8}  {val[t, m]:>10}" for t, m in rows]
    lines.append(f"  {'all':<{width}}  {'':<8}  {len(training):>8}  {len(validation):>10}")
    return lines


def _paper_lines(training: Sequence[Mapping], validation: Sequence[Mapping], dropped: Mapping[str, int]) -> list[str]:
    presets = {p.tag: p for p in PRESETS.values()}
    lines = []
    for tag in sorted({_tag(e) for e in (*training, *validation)} & set(presets)):
        preset = presets[tag]
        train, val = ([e for e in entries if _tag(e) == tag] for entries in (training, validation))
        if preset.unit == "cases":
            n_train, n_val = (len({e.get("patient", e["image"]) for e in entries}) for entries in (train, val))
            found = f"{n_train + n_val} cases ({len(train) + len(val)} volumes)"
        else:
            n_train, n_val = len(train), len(val)
            found = f"{n_train + n_val} volumes"
        line = (
            f"  {tag}: {found}, {n_train} training + {n_val} validation; "
            f"paper {preset.total} = {preset.training} + {preset.validation}"
        )
        if n_train + n_val != preset.total:
            dropped_here = f" after dropping {dropped[tag]} duplicates" if dropped.get(tag) else ""
            line += f" -- differs from the paper's {preset.total} {preset.unit}{dropped_here}"
        lines.append(line)
    return lines


def _tag(entry: Mapping) -> str:
    tags = entry.get("tags") or ["<untagged>"]
    return str(tags[0])


# ------------------------------------------------------------------------------------------ linking and splitting
def _link_keys(entry: Mapping, patients: bool = True) -> list[Hashable]:
    """Keys that tie entries together: the same image, the same series, the same patient of the same dataset."""
    keys: list[Hashable] = [("image", os.path.normpath(entry["image"]))]
    if entry.get("series_uid"):
        keys.append(("series", entry["series_uid"]))
    if patients and entry.get("patient") is not None:
        keys.append(("patient", tuple(entry.get("tags", ())), str(entry["patient"])))
    return keys


def _link_groups(entries: Sequence[Mapping], patients: bool = True) -> list[Hashable]:
    """A group id per entry; entries sharing a link key, directly or through others, share a group."""
    parent: dict[Hashable, Hashable] = {}

    def find(key: Hashable) -> Hashable:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for entry in entries:
        keys = _link_keys(entry, patients)
        for key in keys:
            parent.setdefault(key, key)
        root = find(keys[0])
        for key in keys[1:]:
            parent[find(key)] = root
    return [find(_link_keys(e, patients)[0]) for e in entries]


def _duplicates(entries: Sequence[Mapping]) -> list[bool]:
    """Whether each entry repeats the image or ``series_uid`` of an earlier one."""
    seen: set[Hashable] = set()
    repeated = []
    for entry in entries:
        keys = set(_link_keys(entry, patients=False))
        repeated.append(bool(keys & seen))
        seen |= keys
    return repeated


def validation_size(
    units: int,
    patients: int,
    preset: Preset | None = None,
    val_count: int | None = None,
    val_fraction: float | None = None,
) -> int:
    """How many units (volumes, or cases for BraTS) of one folder go to validation.

    ``val_count`` if given; else, for a preset folder holding exactly the paper's count, the paper's validation
    count; else ``units * fraction`` rounded half up, where the fraction is ``val_fraction``, else the preset's
    validation / total, else :data:`DEFAULT_VAL_FRACTION`. A rounded size is at least 1 and leaves at least one
    unit for training. With fewer than two patients there is no validation.

    Args:
        units: the folder's volumes (cases for a preset counting cases).
        patients: its patients.
        preset: its preset, if any.
        val_count: an explicit size.
        val_fraction: an explicit fraction, in (0, 1).

    Raises:
        ValueError: ``val_count`` leaves no unit for training, or there are fewer than two patients for it.
    """
    if val_count is not None:
        if val_count >= units or patients < 2:
            raise ValueError(f"--val-count {val_count} leaves no training data ({units} in all, {patients} patients)")
        return val_count
    if patients < 2:
        return 0
    if val_fraction is None and preset is not None:
        if units == preset.total:
            return preset.validation
        val_fraction = preset.validation / preset.total
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    return min(max(math.floor(units * fraction + 0.5), 1), units - 1)


def _units(entries: Sequence[Mapping], preset: Preset | None) -> int:
    if preset is not None and preset.unit == "cases":
        return len({e["patient"] for e in entries})
    return len(entries)


def _split(
    entries: Sequence[Mapping],
    groups: Sequence[Hashable],
    owners: Sequence[int],
    sources: Sequence[Source],
    targets: Sequence[int],
    seed: int,
) -> set[Hashable]:
    """The groups that go to validation.

    Source by source, the groups holding that source's entries are shuffled (seeded by ``seed`` and the source's
    tag, so that a folder is split the same way alone or with others) and each goes to validation if it keeps every
    source it touches within its target.
    """
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    weights: dict[Hashable, Counter] = {}
    for group, indices in members.items():
        weight: Counter = Counter()
        for s in {owners[i] for i in indices}:
            weight[s] = _units([entries[i] for i in indices if owners[i] == s], sources[s].preset)
        weights[group] = weight
    filled: Counter = Counter()
    validation: set[Hashable] = set()
    for s, source in enumerate(sources):
        order = list(dict.fromkeys(g for g, owner in zip(groups, owners) if owner == s))
        random.Random(f"{seed}-{source.dataset_tag}").shuffle(order)
        for group in order:
            if filled[s] >= targets[s]:
                break
            if group not in validation and all(filled[t] + w <= targets[t] for t, w in weights[group].items()):
                filled.update(weights[group])
                validation.add(group)
    return validation


def make_pretrain_datalist(
    sources: Sequence[Source],
    output: str | Path,
    data_root: str | Path | None = None,
    seed: int = 0,
    min_slices: int = DEFAULT_MIN_SLICES,
    val_count: int | None = None,
    val_fraction: float | None = None,
    name: str = "dae_pretrain",
) -> PretrainReport:
    """Scan folders and write one validated, patient-grouped pretraining datalist.

    Each folder is scanned with :func:`scan_source` and split with its own validation size
    (:func:`validation_size`). No patient of a dataset, and no series (``series_uid``) or image, is in both lists:
    entries linked by any of them are kept together, also across folders (LUNA16 scans are LIDC-IDRI series), and a
    series found twice is listed once, from the first folder that has it.

    Args:
        sources: the folders, in order.
        output: the JSON file to write.
        data_root: folder the written paths are relative to (default: the folders' common parent).
        seed: seed of the patient shuffle.
        min_slices: DICOM series with fewer files are skipped.
        val_count: validation size of every folder, in its units (volumes; cases for BraTS).
        val_fraction: validation fraction of every folder (default: a preset's paper fraction, else 0.05).
        name: the list's ``name``.

    Returns:
        The report.

    Raises:
        ValueError: a folder is missing or holds no volume; some volumes' modality cannot be told (all listed);
            the validation size is impossible; the validation list would be empty.
        DatalistError: the written list does not load (it is then removed).
    """
    if not sources:
        raise ValueError("No folder to scan.")
    results = [scan_source(source, min_slices) for source in sources]
    undetermined = [path for result in results for path in result.undetermined]
    if undetermined:
        raise ValueError(
            f"Cannot tell the modality of {len(undetermined)} volumes (no DICOM Modality header, no ct/t1/t1ce/t2/"
            "flair token in the name); give it with --modality (e.g. --modality CT), or use a preset:\n"
            + "\n".join(f"  {path}" for path in undetermined)
        )
    for source, result in zip(sources, results):
        if not result.entries:
            preset = source.preset
            expected = f": preset {preset.name} expects {preset.expects} (from {preset.download})" if preset else ""
            reasons = Counter(item.reason for item in result.skipped)
            skipped = "; skipped: " + ", ".join(f"{r} ({n})" for r, n in reasons.items()) if reasons else ""
            raise ValueError(f"No volume found in '{source.folder}'{expected}{skipped}.")

    entries = [entry for result in results for entry in result.entries]
    owners = [s for s, result in enumerate(results) for _ in result.entries]
    groups = _link_groups(entries)  # before dropping duplicates, whose links still tie their patients together
    repeated = _duplicates(entries)
    report = PretrainReport(Path(output), {}, skipped=[item for result in results for item in result.skipped])
    report.dropped.update(_tag(e) for e, r in zip(entries, repeated) if r)
    kept = [not r for r in repeated]
    entries, groups, owners = (list(compress(items, kept)) for items in (entries, groups, owners))

    targets = []
    for s, source in enumerate(sources):
        own = [e for e, owner in zip(entries, owners) if owner == s]
        units = _units(own, source.preset)
        try:
            targets.append(
                validation_size(units, len({e["patient"] for e in own}), source.preset, val_count, val_fraction)
            )
        except ValueError as e:
            raise ValueError(f"--source {source}: {e}.") from e
        if targets[-1] == 0:
            report.notes.append(f"{source.dataset_tag}: fewer than two patients, all in training.")
        elif source.preset and val_count is None and val_fraction is None and units != source.preset.total:
            report.notes.append(
                f"{source.dataset_tag}: validation size {targets[-1]}, the paper's fraction "
                f"{source.preset.validation}/{source.preset.total} of {units} {source.preset.unit}."
            )
    validation_groups = _split(entries, groups, owners, sources, targets, seed)
    in_validation = [g in validation_groups for g in groups]
    for s, source in enumerate(sources):
        got = _units([e for e, v, owner in zip(entries, in_validation, owners) if v and owner == s], source.preset)
        if got != targets[s]:
            unit = source.preset.unit if source.preset else "volumes"
            report.notes.append(
                f"{source.dataset_tag}: validation holds {got} {unit}, not {targets[s]}: patients are kept whole."
            )
    training = [e for e, v in zip(entries, in_validation) if not v]
    validation = [e for e, v in zip(entries, in_validation) if v]
    if not validation:
        raise ValueError(
            "The validation list would be empty: each folder has fewer than two patients, or its patients hold "
            "more volumes than its validation size; give --val-count or --val-fraction (or --patient-regex)."
        )
    counts = ", ".join(f"{tag} {n}" for tag, n in Counter(_tag(e) for e in entries).items())
    description = f"Pretraining volumes ({counts}); dae.cli make-pretrain-datalist, seed {seed}"
    root = Path(data_root) if data_root is not None else _common_parent(s.folder for s in sources)
    report.content = write_pretrain_datalist(training, validation, output, root, name, description)
    return report


def _common_parent(folders: Iterable[str | Path]) -> Path:
    return Path(os.path.commonpath([os.path.abspath(f) for f in folders]))


def resolve_overlaps(
    training: Sequence[Mapping], validation: Sequence[Mapping], link_patients: bool = True
) -> tuple[list, list, Counter, int]:
    """Keep lists written separately from sharing a patient, series or image.

    Entries linked by the same image, ``series_uid`` or (with ``link_patients``) patient of the same tags form a
    group; a group with any entry in validation goes to validation whole. Then each image and series is kept once,
    the first copy (validation first).

    Args:
        training: training entries (absolute or commonly rooted ``image`` paths).
        validation: validation entries.
        link_patients: also keep each patient of a dataset on one side; False keeps the lists' patient split.

    Returns:
        The training and validation entries kept, the dropped copies by tag, and the number of training entries
        moved to validation.
    """
    entries = [*validation, *training]
    groups = _link_groups(entries, link_patients)
    validation_groups = set(groups[: len(validation)])
    in_validation = [g in validation_groups for g in groups]
    repeated = _duplicates(entries)
    moved = sum(v and not r for v, r in zip(in_validation[len(validation) :], repeated[len(validation) :]))
    dropped = Counter(_tag(e) for e, r in zip(entries, repeated) if r)
    new_validation = [dict(e) for e, v, r in zip(entries, in_validation, repeated) if v and not r]
    new_training = [dict(e) for e, v, r in zip(entries, in_validation, repeated) if not v and not r]
    return new_training, new_validation, dropped, moved


def merge_datalists(
    inputs: Sequence[str | Path], output: str | Path, data_root: str | Path | None = None, name: str = "dae_pretrain"
) -> PretrainReport:
    """Merge datalists into one, with paths re-based to one data root, no shared patient or series, each once.

    Each input's relative paths are joined to its top-level ``data_root`` (which :func:`make_pretrain_datalist`
    and :func:`dae.data.convert_reference_lists` record); an input without one is taken as relative to
    ``data_root``. Every input's training and validation lists are kept, except that entries linked to a
    validation entry of another input (same patient of the same dataset, same ``series_uid``, same image) move to
    validation, and each series or image is listed once (:func:`resolve_overlaps`).

    Args:
        inputs: the datalist JSON files.
        output: the JSON file to write.
        data_root: folder the written paths are relative to (default: the inputs' data roots' common parent);
            required when an input records no ``data_root``.
        name: the list's ``name``.

    Returns:
        The report.

    Raises:
        ValueError: an input is unreadable, lacks a list, or records no ``data_root`` while ``data_root`` is None.
        DatalistError: the written list does not load (it is then removed).
    """
    lists: dict[str, list[dict]] = {key: [] for key in _SPLITS}
    roots = []
    for path in inputs:
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"Cannot read datalist '{path}': {e}") from e
        if not isinstance(content, dict) or not all(isinstance(content.get(k), list) for k in _SPLITS):
            raise ValueError(f"Datalist '{path}' must be a JSON object with 'training' and 'validation' lists.")
        if content.get("data_root") is None and data_root is None:
            raise ValueError(
                f"Datalist '{path}' records no data_root; give --data-root, the folder its paths are relative to."
            )
        root = Path(content.get("data_root") or data_root)
        roots.append(root)
        for key in _SPLITS:
            for index, entry in enumerate(content[key]):
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                    raise ValueError(f"Datalist '{path}' ({key}[{index}]): each entry needs a string 'image'.")
                lists[key].append({**entry, "image": os.path.abspath(root / entry["image"])})
    training, validation, dropped, moved = resolve_overlaps(lists["training"], lists["validation"])
    names = ", ".join(Path(p).name for p in inputs)
    root = Path(data_root) if data_root is not None else _common_parent(roots)
    content = write_pretrain_datalist(training, validation, output, root, name, f"Merged from {names}")
    return PretrainReport(Path(output), content, dropped=dropped, moved=moved)


def write_pretrain_datalist(
    training: Sequence[Mapping],
    validation: Sequence[Mapping],
    output: str | Path,
    data_root: str | Path,
    name: str,
    description: str,
    check_files: bool = True,
) -> dict:
    """Write a datalist with paths relative to ``data_root`` and check it loads with :func:`dae.data.load_datalist`.

    Args:
        training: entries with absolute ``image`` paths.
        validation: the same for validation.
        output: the JSON file to write.
        data_root: the folder paths are written relative to; recorded (absolute) as ``data_root``.
        name: the list's ``name``.
        description: the list's ``description``.
        check_files: also read every image's header (structure and modalities are always checked).

    Returns:
        The written content.

    Raises:
        ValueError: an image is not below ``data_root``.
        DatalistError: the written list does not load; the file is removed and the error lists every bad entry.
    """
    root = Path(os.path.abspath(data_root))
    outside = [e["image"] for e in (*training, *validation) if not Path(e["image"]).is_relative_to(root)]
    if outside:
        raise ValueError(
            f"{len(outside)} images are not below the data root '{root}' (give a --data-root above them):\n"
            + "\n".join(f"  {p}" for p in outside[:20])
        )

    def relative(entries: Sequence[Mapping]) -> list[dict]:
        return [{**e, "image": Path(e["image"]).relative_to(root).as_posix()} for e in entries]

    content = {
        "name": name,
        "description": description,
        "data_root": str(root),
        "training": relative(training),
        "validation": relative(validation),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(content, indent=2) + "\n")
    errors = []
    for key in _SPLITS:
        try:
            load_datalist(output, key=key, data_root=root, validate=check_files)
        except DatalistError as e:
            errors.append(str(e))
    if errors:
        output.unlink()
        raise DatalistError("\n".join([*errors, f"'{output}' was removed: fix or remove these volumes and run again."]))
    return content
