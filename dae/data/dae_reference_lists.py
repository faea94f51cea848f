"""Import the DAE paper's own pretraining lists (the official DAE / Swin UNETR JSON files) as one dae datalist.

The CT files are Decathlon-style, ``{"training": [{"image": "images/img_480.nii.gz"}, ...], "validation": [...]}``,
one per dataset: ``dataset_LUNA16_0.json``, ``dataset_TCIAcovid19_0.json``, ``dataset_HNSCC_0.json``,
``dataset_TCIAcolon_v2_0.json``, ``dataset_LIDC_0.json``. ``brats21_pre.json`` uses folds: each item of its
``training`` list has a ``fold`` and an ``image`` (one sequence file, or a list of the case's four), fold 0 being
validation. The reference code guessed a volume's modality from substrings of its path, and so labelled LUNA16
volumes ``t1``; here the five CT datasets are CT and a BraTS volume's modality comes from its file name's
``_t1``/``_t1ce``/``_t2``/``_flair`` suffix.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dae.data.pretrain_lists import PretrainReport, resolve_overlaps, write_pretrain_datalist
from dae.data.pretrain_presets import PRESETS
from dae.data.pretrain_scan import brats_sequence, file_stem, tcia_covid19_patient

__all__ = ["ReferenceFile", "convert_reference_lists", "read_reference_list", "reference_dataset"]

# Searched, in order, in the lower-case file name stripped of everything but letters and digits.
_NAME_KEYS = (
    ("luna16", "luna16"),
    ("covid19", "tcia_covid19"),
    ("hnscc", "hnscc"),
    ("colon", "tcia_colonography"),
    ("lidc", "lidc_idri"),
    ("brats", "brats2021"),
)
_TAGS = {p.tag: p for p in PRESETS.values()}
_DICOM_UID = re.compile(r"\d+(?:\.\d+)+")


@dataclass(frozen=True)
class ReferenceFile:
    """One reference JSON file and where its relative paths lead.

    Attributes:
        path: the JSON file.
        base_dir: the folder its relative ``image`` paths are joined to.
        dataset: its dataset tag (``luna16``, ``tcia_covid19``, ``hnscc``, ``tcia_colonography``, ``lidc_idri``,
            ``brats2021``; preset names such as ``lidc-idri`` are accepted); None: from the file name
            (:func:`reference_dataset`).
    """

    path: Path
    base_dir: Path
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and self.dataset not in _TAGS and self.dataset not in PRESETS:
            raise ValueError(f"Unknown dataset {self.dataset!r} for '{self.path}'; known: {', '.join(_TAGS)}.")

    @property
    def tag(self) -> str:
        """The dataset tag of its entries.

        Raises:
            ValueError: no ``dataset`` is given and the file name names none.
        """
        if self.dataset is None:
            return reference_dataset(self.path)
        return PRESETS[self.dataset].tag if self.dataset in PRESETS else self.dataset


def reference_dataset(path: str | Path) -> str:
    """The dataset tag of a reference JSON file from its name: ``dataset_TCIAcolon_v2_0.json`` -> ``tcia_colonography``.

    Raises:
        ValueError: the name names none of the six datasets.
    """
    key = re.sub(r"[^a-z0-9]", "", Path(path).name.lower())
    for needle, tag in _NAME_KEYS:
        if needle in key:
            return tag
    raise ValueError(
        f"Cannot tell the dataset of '{path}' from its name; name it after the base folder, --json FILE=BASE_DIR:TAG "
        f"with TAG one of {', '.join(_TAGS)}."
    )


def _entry(image: str, base_dir: Path, tag: str) -> tuple[dict | None, str | None]:
    """The entry of one image path, or why there is none."""
    name = Path(image).name
    entry = {"image": os.path.abspath(base_dir / image), "modality": _TAGS[tag].modality, "tags": [tag]}
    if tag == "brats2021":
        parsed = brats_sequence(name)
        if parsed is None or parsed[1] is None:
            return None, f"{image}: not a BraTS sequence file <case>_{{t1,t1ce,t2,flair}}.nii.gz"
        entry["patient"], entry["modality"] = parsed
    elif tag == "tcia_covid19":
        entry["patient"] = tcia_covid19_patient(name)
    else:
        entry["patient"] = file_stem(name)
        if tag == "luna16" and _DICOM_UID.fullmatch(entry["patient"]):
            entry["series_uid"] = entry["patient"]
    return entry, None


def read_reference_list(reference: ReferenceFile) -> tuple[list[dict], list[dict]]:
    """Read one reference JSON file into training and validation entries with absolute paths.

    Items of ``training`` with ``fold`` 0 and items of ``validation`` are validation, other items training. An
    ``image`` that is a list gives one entry per file. Keys other than ``image`` are dropped.

    Args:
        reference: the file, its base folder and optionally its dataset.

    Returns:
        The training and validation entries ``{"image", "modality", "tags", "patient"}`` (plus ``series_uid`` for
        LUNA16 files named by their SeriesInstanceUID).

    Raises:
        ValueError: the file is unreadable, has no ``training`` list, or has items without a usable image path or
            (BraTS) without a sequence suffix, all listed.
    """
    tag = reference.tag
    try:
        content = json.loads(Path(reference.path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read '{reference.path}': {e}") from e
    if not isinstance(content, Mapping) or not isinstance(content.get("training"), list):
        raise ValueError(f"'{reference.path}' must be a JSON object with a 'training' list.")
    lists: dict[str, list[dict]] = {"training": [], "validation": []}
    problems = []
    for key in ("training", "validation"):
        items = content.get(key, [])
        if not isinstance(items, list):
            problems.append(f"'{key}' must be a list, got {type(items).__name__}")
            continue
        for index, item in enumerate(items):
            image = item.get("image") if isinstance(item, Mapping) else None
            paths = [image] if isinstance(image, str) else image
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                problems.append(f"{key}[{index}]: 'image' must be a path or a list of paths, got {image!r}")
                continue
            side = "validation" if key == "validation" or item.get("fold") in (0, "0") else "training"
            for path in paths:
                entry, problem = _entry(path, Path(reference.base_dir), tag)
                if entry is None:
                    problems.append(f"{key}[{index}]: {problem}")
                else:
                    lists[side].append(entry)
    if problems:
        raise ValueError(
            f"'{reference.path}' ({tag}): {len(problems)} unusable items:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return lists["training"], lists["validation"]


def convert_reference_lists(
    references: Sequence[ReferenceFile],
    output: str | Path,
    data_root: str | Path | None = None,
    check_files: bool = True,
    name: str = "dae_pretrain",
    max_listed: int | None = 20,
) -> PretrainReport:
    """Convert reference JSON files into one datalist with explicit modalities, tags and patients.

    Args:
        references: the files with their base folders.
        output: the JSON file to write.
        data_root: folder the written paths are relative to (default: the base folders' common parent).
        check_files: stop with an error listing the missing images, and read every image's header after writing;
            False writes the list without looking at the images.
        name: the list's ``name``.
        max_listed: missing images listed per file (None: all).

    Returns:
        The report (a note per file: its dataset and counts).

    Raises:
        ValueError: a file is unusable (see :func:`read_reference_list`), or images are missing (``check_files``).
        DatalistError: the written list does not load (it is then removed).
    """
    if not references:
        raise ValueError("No reference JSON file given.")
    training, validation, notes, missing = [], [], [], []
    for reference in references:
        train, val = read_reference_list(reference)
        training += train
        validation += val
        notes.append(f"{reference.path} -> {reference.tag}: {len(train)} training, {len(val)} validation volumes.")
        if check_files:
            missing += _missing_lines(reference, [*train, *val], max_listed)
    if missing:
        raise ValueError(
            "Images of the reference lists are missing; check each BASE_DIR (--no-check-files writes the list "
            "anyway):\n" + "\n".join(missing)
        )
    # the paper's split is kept as it is: only an image listed twice is moved (to validation) and kept once
    training, validation, dropped, moved = resolve_overlaps(training, validation, link_patients=False)
    train_patients, val_patients = ({(e["tags"][0], e["patient"]) for e in side} for side in (training, validation))
    for tag, count in sorted(Counter(tag for tag, _ in train_patients & val_patients).items()):
        notes.append(f"{tag}: {count} patients have volumes in both lists of the paper's split (kept as they are).")
    root = data_root if data_root is not None else os.path.commonpath([os.path.abspath(r.base_dir) for r in references])
    names = ", ".join(Path(r.path).name for r in references)
    description = f"The DAE paper's pretraining lists ({names}); dae.cli convert-dae-jsons"
    content = write_pretrain_datalist(training, validation, output, root, name, description, check_files=check_files)
    return PretrainReport(Path(output), content, dropped=dropped, moved=moved, notes=notes)


def _missing_lines(reference: ReferenceFile, entries: Sequence[Mapping], max_listed: int | None) -> list[str]:
    absent = [e["image"] for e in entries if not os.path.exists(e["image"])]
    if not absent:
        return []
    listed = absent if max_listed is None else absent[:max_listed]
    lines = [f"  {reference.path} (base folder {reference.base_dir}): {len(absent)} of {len(entries)} missing"]
    lines += [f"    {path}" for path in listed]
    if len(absent) > len(listed):
        lines.append(f"    ... and {len(absent) - len(listed)} more (--verbose lists all)")
    return lines
