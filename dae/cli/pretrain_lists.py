"""``make-pretrain-datalist`` and ``convert-dae-jsons``: pretraining datalists at the DAE paper's scale.

:func:`add_commands` registers both subcommands on the ``dae.cli`` parser and :func:`run` runs one. Bad arguments
exit with code 2 (argparse); :class:`~dae.data.DatalistError` and ``ValueError`` from the data layer are left to
``dae.cli.main``, which prints them and returns 1.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dae.data.dae_reference_lists import ReferenceFile, convert_reference_lists
from dae.data.datalist import MODALITY_GROUPS
from dae.data.pretrain_lists import DEFAULT_VAL_FRACTION, make_pretrain_datalist, merge_datalists
from dae.data.pretrain_presets import PRESETS
from dae.data.pretrain_scan import DEFAULT_MIN_SLICES, Source

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("make-pretrain-datalist", "convert-dae-jsons")
"""The subcommands this module adds."""

_PRESET_LIST = ", ".join(PRESETS)
_SCAN_OPTIONS = {
    "seed": "--seed",
    "min_slices": "--min-slices",
    "val_count": "--val-count",
    "val_fraction": "--val-fraction",
    "modality": "--modality",
    "tag": "--tag",
    "patient_regex": "--patient-regex",
}
_PLAIN_OPTIONS = ("modality", "tag", "patient_regex")
_PREFIX = re.compile(r"([A-Za-z0-9_-]+)=(.+)")
_DATASET_SUFFIX = re.compile(r"(.+):([A-Za-z0-9_-]+)")


def _source(value: str) -> Source:
    """``[PRESET=]FOLDER`` as a :class:`Source` (a plain folder's tag and modality are set later)."""
    match = _PREFIX.fullmatch(value)
    if match is None or Path(value).exists():
        return Source(Path(value))
    name = match[1].lower().replace("_", "-")
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown preset {match[1]!r} in {value!r}; presets: {_PRESET_LIST} (a folder without a preset is "
            "given as --source FOLDER)"
        )
    return Source(Path(match[2]), PRESETS[name])


def _reference(value: str) -> ReferenceFile:
    """``FILE=BASE_DIR[:DATASET]`` as a :class:`ReferenceFile`."""
    path, sep, base = value.partition("=")
    if not sep or not path or not base:
        raise argparse.ArgumentTypeError(f"expected FILE=BASE_DIR[:DATASET], got {value!r}")
    match = _DATASET_SUFFIX.fullmatch(base)
    if match is None or Path(base).exists():
        return ReferenceFile(Path(path), Path(base))
    try:
        return ReferenceFile(Path(path), Path(match[1]), match[2].lower())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _modality(value: str) -> str:
    modality = value.upper()
    if MODALITY_GROUPS.get(modality) not in ("CT", "MR"):
        known = ", ".join(m for m, group in MODALITY_GROUPS.items() if group in ("CT", "MR"))
        raise argparse.ArgumentTypeError(f"{value!r} is not a 3D modality tag; one of {known}")
    return modality


def _count(value: str) -> int:
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return count


def _fraction(value: str) -> float:
    fraction = float(value)
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return fraction


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``make-pretrain-datalist`` and ``convert-dae-jsons`` to the ``dae.cli`` subcommands."""
    make = subparsers.add_parser(
        "make-pretrain-datalist",
        help="scan dataset folders (presets for the DAE paper's six datasets) and write one validated, "
        "patient-grouped pretraining datalist; or merge datalists",
        description="Find the volumes (NIfTI, NRRD, MetaImage files, DICOM series) under each --source folder, tell "
        "each one's modality (--modality, else the DICOM header, else the file name), split them by patient into "
        "training and validation (of the paper's size for a preset folder holding the paper's count), list each "
        "series once (LUNA16 scans are LIDC-IDRI series), write one datalist and check that it loads. Presets: "
        f"{_PRESET_LIST}. With --merge, merge datalists written earlier instead.",
    )
    inputs = make.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--source",
        action="append",
        type=_source,
        metavar="[PRESET=]FOLDER",
        help="a folder to scan, with the preset of its dataset (e.g. luna16=/data/LUNA16) or without (a plain "
        "folder); repeat to merge several into one list",
    )
    inputs.add_argument(
        "--merge",
        nargs="+",
        metavar="LIST.json",
        help="merge these datalists instead of scanning: paths re-based from each file's recorded data_root to "
        "--data-root, entries linked to a validation entry of another list (same patient or series) moved to "
        "validation, each series listed once",
    )
    make.add_argument("--output", required=True, help="the datalist JSON to write")
    make.add_argument(
        "--data-root",
        help="folder the written paths are relative to (default: the common parent of the folders, or of the merged "
        "lists' data roots); required with --merge for a list that records no data_root",
    )
    make.add_argument("--seed", type=int, help="seed of the patient shuffle (default: 0)")
    sizes = make.add_mutually_exclusive_group()
    sizes.add_argument(
        "--val-count",
        type=_count,
        help="validation size of every folder, in volumes (cases for brats2021) (default: the paper's size for a "
        "preset folder with the paper's count, else --val-fraction)",
    )
    sizes.add_argument(
        "--val-fraction",
        type=_fraction,
        help="validation fraction of every folder, rounded half up, at least 1 (default: the paper's fraction for "
        f"a preset, {DEFAULT_VAL_FRACTION} for a plain folder)",
    )
    make.add_argument(
        "--min-slices",
        type=_count,
        help=f"skip DICOM series with fewer slices, e.g. localizers and scouts (default: {DEFAULT_MIN_SLICES})",
    )
    make.add_argument(
        "--modality",
        type=_modality,
        help="modality of every volume of the folders without a preset, e.g. CT or T2 (default: the DICOM header, "
        "else the file name's ct/t1/t1ce/t2/flair token)",
    )
    make.add_argument("--tag", help="tag of the entries of the folders without a preset (default: the folder's name)")
    make.add_argument(
        "--patient-regex",
        help="for folders without a preset: regex searched in each image's path below its folder giving the patient "
        "(first group, or the whole match), e.g. '^(patient[0-9]+)/' (default: the DICOM PatientID, else the file "
        "name without extension and modality token)",
    )
    make.add_argument("--name", default="dae_pretrain", help="the list's name (default: dae_pretrain)")
    make.add_argument("--verbose", action="store_true", help="list every skipped file, not the first few per reason")
    make.set_defaults(usage_error=make.error)

    convert = subparsers.add_parser(
        "convert-dae-jsons",
        help="convert the DAE paper's own pretraining JSON files (dataset_LUNA16_0.json, ..., brats21_pre.json) "
        "into one datalist with explicit modalities",
        description="Read the official DAE / Swin UNETR pretraining lists with your base folders and write one "
        "datalist of the paper's exact volumes: the five CT files (Decathlon style) become CT entries, "
        "brats21_pre.json (fold format, fold 0 = validation) one entry per MR sequence file, its modality from the "
        "file name's _t1/_t1ce/_t2/_flair suffix. The dataset of a file is told from its name.",
    )
    convert.add_argument(
        "--json",
        action="append",
        required=True,
        type=_reference,
        metavar="FILE=BASE_DIR[:DATASET]",
        help="a reference JSON file and the folder its relative paths start from; append :DATASET (luna16, "
        "tcia_covid19, hnscc, tcia_colonography, lidc_idri, brats2021) when the file name does not tell it; repeat "
        "for each file",
    )
    convert.add_argument("--output", required=True, help="the datalist JSON to write")
    convert.add_argument(
        "--data-root", help="folder the written paths are relative to (default: the common parent of the base folders)"
    )
    convert.add_argument(
        "--check-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop with a list of the missing images and read every image's header (default: on); "
        "--no-check-files writes the list without looking at the images",
    )
    convert.add_argument("--name", default="dae_pretrain", help="the list's name (default: dae_pretrain)")
    convert.add_argument("--verbose", action="store_true", help="list every missing image")


def run(args: argparse.Namespace) -> None:
    """Run ``args.command``, one of :data:`COMMANDS`, and print its report."""
    if args.command == "make-pretrain-datalist":
        _make_pretrain_datalist(args)
    else:
        _convert_dae_jsons(args)


def _make_pretrain_datalist(args: argparse.Namespace) -> None:
    if args.merge:
        given = [flag for key, flag in _SCAN_OPTIONS.items() if getattr(args, key) is not None]
        if given:
            args.usage_error(f"{', '.join(given)}: only for scanned folders (--source), not with --merge")
        report = merge_datalists(args.merge, args.output, data_root=args.data_root, name=args.name)
    else:
        plain = [flag for key, flag in _SCAN_OPTIONS.items() if key in _PLAIN_OPTIONS and getattr(args, key)]
        if plain and all(source.preset for source in args.source):
            args.usage_error(f"{', '.join(plain)}: only for folders given without a preset, and every --source has one")
        sources = [
            source
            if source.preset
            else Source(source.folder, tag=args.tag, modality=args.modality, patient_regex=args.patient_regex)
            for source in args.source
        ]
        report = make_pretrain_datalist(
            sources,
            args.output,
            data_root=args.data_root,
            seed=0 if args.seed is None else args.seed,
            min_slices=DEFAULT_MIN_SLICES if args.min_slices is None else args.min_slices,
            val_count=args.val_count,
            val_fraction=args.val_fraction,
            name=args.name,
        )
    print(report.format(verbose=args.verbose))
    print("Checked: training and validation load with dae.data.load_datalist (image headers read).")


def _convert_dae_jsons(args: argparse.Namespace) -> None:
    report = convert_reference_lists(
        args.json,
        args.output,
        data_root=args.data_root,
        check_files=args.check_files,
        name=args.name,
        max_listed=None if args.verbose else 20,
    )
    print(report.format(verbose=args.verbose))
    if args.check_files:
        print("Checked: training and validation load with dae.data.load_datalist (image headers read).")
    else:
        print(
            "Not checked (--no-check-files): run python -m dae.cli validate-datalist on the list once the images "
            "are there."
        )
