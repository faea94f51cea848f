"""Cross-validation folds: pairing images with labels, patient-grouped k-fold splits, fold JSON files, label subsets.

Entries are dicts with ``image`` and ``label`` paths, a ``case`` id and optionally a ``patient`` id; the fold
files are MONAI ``dataset_0.json``-style JSONs readable by ``monai.data.load_decathlon_datalist`` and by
:func:`dae.data.load_datalist` (every entry also carries its ``modality``).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "assign_patients",
    "case_id_from_filename",
    "kfold_splits",
    "label_fraction_subset",
    "pair_images_and_labels",
    "write_fold_files",
    "write_test_file",
]

_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_PREFIX = re.compile(r"^(?:img|image|label|labels|seg|mask)[_-]?(?=\d)", re.IGNORECASE)
_SUFFIX = re.compile(r"[_-](?:T1w|T2w|dseg|seg|label|labels|mask)$", re.IGNORECASE)


def case_id_from_filename(name: str) -> str:
    """The case id shared by an image file and its label file.

    Removes the file extension, a leading ``img``/``image``/``label``/``labels``/``seg``/``mask`` directly before
    digits (BTCV ``img0001`` and ``label0001`` give ``0001``) and a trailing BIDS-like ``_T1w``/``_T2w``/``_dseg``/
    ``_seg``/``_label(s)``/``_mask`` (FeTA ``sub-001_rec-mial_T2w`` and ``sub-001_rec-mial_dseg`` give
    ``sub-001_rec-mial``). Other names (Decathlon ``spleen_2``) are kept as they are.

    Args:
        name: a file name (a path's directories are ignored).
    """
    stem = Path(name).name
    for ext in _EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _SUFFIX.sub("", _PREFIX.sub("", stem))


def _by_case(folder: Path, pattern: str, case_id: Callable[[str], str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"Folder '{folder}' does not exist.")
    cases: dict[str, Path] = {}
    for path in sorted(folder.glob(pattern)):
        if path.name.startswith("."):
            continue
        case = case_id(path.name)
        if case in cases:
            raise ValueError(f"Files '{cases[case]}' and '{path}' have the same case id {case!r}.")
        cases[case] = path
    if not cases:
        raise ValueError(f"No file matches '{pattern}' in '{folder}'.")
    return cases


def pair_images_and_labels(
    image_dir: str | Path,
    label_dir: str | Path,
    image_pattern: str = "*.nii.gz",
    label_pattern: str | None = None,
    case_id: Callable[[str], str] = case_id_from_filename,
) -> list[dict[str, str]]:
    """Pair every image with the label file of the same case id.

    Args:
        image_dir: folder of the images (e.g. BTCV/Decathlon ``imagesTr``).
        label_dir: folder of the labels (e.g. ``labelsTr``); may be ``image_dir`` if the patterns differ.
        image_pattern: glob of the image files in ``image_dir``.
        label_pattern: glob of the label files in ``label_dir``; defaults to ``image_pattern``.
        case_id: file name to case id; the default, :func:`case_id_from_filename`, handles BTCV, Decathlon and
            FeTA (BIDS) names.

    Returns:
        Entries ``{"case", "image", "label"}`` sorted by case id, with paths joined to the given folders.

    Raises:
        ValueError: a folder is missing or matches no file, two files of a folder share a case id, or some
            images have no label or some labels no image (all listed).
    """
    images = _by_case(Path(image_dir), image_pattern, case_id)
    labels = _by_case(Path(label_dir), label_pattern or image_pattern, case_id)
    lonely_images = [str(images[c]) for c in sorted(images.keys() - labels.keys())]
    lonely_labels = [str(labels[c]) for c in sorted(labels.keys() - images.keys())]
    if lonely_images or lonely_labels:
        lines = [f"Cannot pair the images of '{image_dir}' with the labels of '{label_dir}' by case id:"]
        lines += [f"  image without label: {p}" for p in lonely_images]
        lines += [f"  label without image: {p}" for p in lonely_labels]
        raise ValueError("\n".join(lines))
    return [{"case": c, "image": str(images[c]), "label": str(labels[c])} for c in sorted(images)]


def assign_patients(entries: Sequence[Mapping], patient_regex: str | None = None) -> list[dict]:
    """Copy the entries with a ``patient`` id: the case id, or what ``patient_regex`` finds in it.

    Args:
        entries: entries with a ``case`` id.
        patient_regex: searched in the case id; its first group (or whole match without groups) is the patient
            id, e.g. ``"sub-\\d+"`` or ``"^(\\d+)_"``. None: each case is its own patient.

    Raises:
        ValueError: the regex does not match a case id.
    """
    pattern = re.compile(patient_regex) if patient_regex else None
    out = []
    for entry in entries:
        patient = entry["case"]
        if pattern is not None:
            match = pattern.search(entry["case"])
            if match is None:
                raise ValueError(f"Patient regex {patient_regex!r} does not match case {entry['case']!r}.")
            patient = match.group(1) if pattern.groups else match.group(0)
        out.append({**entry, "patient": patient})
    return out


def kfold_splits(
    entries: Sequence[Mapping], n_folds: int = 5, seed: int = 0, group_key: str = "patient"
) -> list[tuple[list[Mapping], list[Mapping]]]:
    """Split entries into ``n_folds`` (train, validation) pairs with no group in two folds.

    Groups (``entry[group_key]``, falling back to ``entry["case"]``) are shuffled with ``seed`` and each is
    given to the fold with the fewest entries so far, so fold sizes differ by at most the largest group. Every
    entry is in exactly one validation list; the same entries and seed give the same folds.

    Args:
        entries: entries with a ``group_key`` or ``case`` key.
        n_folds: number of folds (at least 2).
        seed: seed of the group shuffle.
        group_key: key of the group (patient) id.

    Returns:
        One ``(train, validation)`` pair per fold, each list in the order of ``entries``.

    Raises:
        ValueError: ``n_folds < 2``, an entry has no group, or there are fewer groups than folds.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}.")
    groups = []
    for entry in entries:
        group = entry.get(group_key, entry.get("case"))
        if group is None:
            raise ValueError(f"Entry {dict(entry)} has neither '{group_key}' nor 'case'.")
        groups.append(str(group))
    unique = sorted(set(groups))
    if len(unique) < n_folds:
        raise ValueError(f"{len(unique)} groups ('{group_key}') cannot make {n_folds} folds.")
    random.Random(seed).shuffle(unique)
    sizes = Counter(groups)
    fold_of: dict[str, int] = {}
    load = [0] * n_folds
    for group in unique:
        k = load.index(min(load))
        fold_of[group], load[k] = k, load[k] + sizes[group]
    return [
        (
            [e for e, g in zip(entries, groups) if fold_of[g] != k],
            [e for e, g in zip(entries, groups) if fold_of[g] == k],
        )
        for k in range(n_folds)
    ]


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        raise ValueError(f"File '{path}' is not inside the data root '{root}'.") from None


def write_fold_files(
    folds: Sequence[tuple[Sequence[Mapping], Sequence[Mapping]]],
    out_dir: str | Path,
    data_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    modality: str = "CT",
    name: str = "dataset",
    description: str = "",
) -> list[Path]:
    """Write one MONAI ``dataset_0.json``-style file per fold, ``fold_{k}.json``.

    Each file holds ``description``, ``fold`` (k), ``numFolds``, ``labels`` (``{"0": "background", ...}``, if
    ``class_names``), ``modality`` (``{"0": modality}``), ``name``, ``numTraining`` (training entries of that
    fold), ``tensorImageSize`` ``"3D"``, and ``training``/``validation`` lists of ``{"image", "label",
    "modality"}`` with paths relative to ``data_root``.

    Args:
        folds: ``(train, validation)`` pairs, e.g. from :func:`kfold_splits`.
        out_dir: output folder (created).
        data_root: folder the paths are written relative to; None writes them as they are.
        class_names: class names by label id (e.g. :data:`dae.data.BTCV_CLASSES`), or None for no ``labels``.
        modality: modality tag of every image (``CT``, ``T2``, ...).
        name: dataset name.
        description: free text.

    Returns:
        The written files.

    Raises:
        ValueError: a file is not inside ``data_root``.
    """
    root = Path(data_root) if data_root is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (train, val) in enumerate(folds):
        lists = {"training": train, "validation": val}
        header = {"description": description, "fold": k, "numFolds": len(folds)}
        paths.append(_write_datalist(out / f"fold_{k}.json", header, lists, root, class_names, modality, name))
    return paths


def write_test_file(
    entries: Sequence[Mapping],
    out_dir: str | Path,
    data_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    modality: str = "CT",
    name: str = "dataset",
    description: str = "",
) -> Path:
    """Write ``test.json``: every pair in one ``test`` list, an external test set for a model trained elsewhere.

    The file has the keys of :func:`write_fold_files` (without ``fold``/``numFolds``, ``numTraining`` 0) and a
    ``test`` list instead of ``training``/``validation``. Args as for :func:`write_fold_files`.

    Returns:
        The written file.
    """
    root = Path(data_root) if data_root is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"description": description}
    return _write_datalist(out / "test.json", header, {"test": entries}, root, class_names, modality, name)


def _write_datalist(
    path: Path,
    header: dict[str, object],
    lists: Mapping[str, Sequence[Mapping]],
    root: Path | None,
    class_names: Sequence[str] | None,
    modality: str,
    name: str,
) -> Path:
    """One JSON datalist: ``header``, ``labels``, ``modality``, ``name``, ``numTraining``, then the ``lists``."""
    content = dict(header)
    if class_names is not None:
        content["labels"] = {str(i): c for i, c in enumerate(class_names)}
    training = len(lists.get("training", ()))
    content |= {"modality": {"0": modality}, "name": name, "numTraining": training, "tensorImageSize": "3D"}
    for key, entries in lists.items():
        content[key] = [
            {"image": _relative(e["image"], root), "label": _relative(e["label"], root), "modality": modality}
            for e in entries
        ]
    path.write_text(json.dumps(content, indent=4) + "\n")
    return path


def label_fraction_subset(entries: Sequence[Mapping], fraction: float, seed: int = 0) -> list[Mapping]:
    """A seeded subset of ``max(1, round(fraction * n))`` training entries, for label-efficiency experiments.

    The entries are ranked by one permutation drawn from ``seed`` (independent of ``fraction``) and the first
    ones are kept, so for the same entries and seed the subsets are nested: the 20 % subset is inside the 50 %
    subset, which is inside the 100 % set, as in the DAE paper's FeTA 20/50/100 % experiments. ``round`` is
    Python's (half to even).

    Args:
        entries: the training entries of one fold.
        fraction: kept fraction, in (0, 1]; 1.0 keeps all.
        seed: seed of the permutation.

    Returns:
        The kept entries, in their original order.

    Raises:
        ValueError: ``fraction`` outside (0, 1] or no entries.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if not entries:
        raise ValueError("Cannot take a subset of no entries.")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    kept = sorted(order[: max(1, round(fraction * len(entries)))])
    return [entries[i] for i in kept]
