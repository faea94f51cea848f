"""Command-line tools for datalists: ``python -m dae.cli make-folds``, ``make-xray-datalist``, ``validate-datalist``,
``make-pretrain-datalist``, ``convert-dae-jsons`` (these two in :mod:`dae.cli.pretrain_lists`) and ``pretrain-report``
(:mod:`dae.cli.run_report`).

Exit codes: 0 success, 1 bad data (unpairable files, too few patients, volumes of unknown modality, missing files,
invalid datalist), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from dae.cli import pretrain_lists, run_report
from dae.data.datalist import DatalistError, load_datalist, read_class_names
from dae.data.deep_check import deep_check_lists
from dae.data.labels import BTCV_CLASSES, FETA_CLASSES
from dae.data.splits import (
    assign_patients,
    kfold_splits,
    pair_images_and_labels,
    write_fold_files,
    write_test_file,
)
from dae.data.xray import XRAY_EXTENSIONS, make_xray_datalist

__all__ = ["build_parser", "main"]

_CLASSES = {"btcv": ("BTCV", BTCV_CLASSES), "feta": ("FeTA", FETA_CLASSES), "none": (None, None)}
_SPLITS = ("training", "validation", "test")


def build_parser() -> argparse.ArgumentParser:
    """The ``dae.cli`` argument parser: ``make-folds``, ``make-xray-datalist``, ``validate-datalist``,
    ``make-pretrain-datalist`` and ``convert-dae-jsons``."""
    parser = argparse.ArgumentParser(
        prog="python -m dae.cli",
        description="dae datalist tools: make cross-validation folds, an X-ray datalist or a pretraining datalist, "
        "convert the DAE paper's pretraining lists, validate a datalist.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    folds = commands.add_parser(
        "make-folds",
        help="pair images with labels and write patient-grouped k-fold JSON files (fold_0.json, ...)",
        description="Pair images and labels by case id (BTCV img0001/label0001, Decathlon imagesTr/labelsTr, "
        "FeTA sub-001_rec-mial_T2w/_dseg), split them into folds with no patient in two folds, and write one "
        "MONAI dataset_0.json-style file per fold with paths relative to the data root.",
    )
    folds.add_argument("--images", required=True, help="folder of the images")
    folds.add_argument("--labels", required=True, help="folder of the labels")
    folds.add_argument("--out", required=True, help="output folder of fold_{k}.json")
    folds.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    folds.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle (default: 0)")
    folds.add_argument(
        "--patient-regex",
        help="regex searched in each case id giving its patient id (first group, or the whole match), e.g. "
        "'sub-[0-9]+'; default: every case is its own patient",
    )
    folds.add_argument(
        "--data-root", help="folder the written paths are relative to (default: common parent of --images/--labels)"
    )
    folds.add_argument(
        "--classes", choices=sorted(_CLASSES), default="none", help="class names written as 'labels' (default: none)"
    )
    folds.add_argument("--modality", default="CT", help="modality tag of every image, e.g. CT or T2 (default: CT)")
    folds.add_argument("--image-pattern", default="*.nii.gz", help="glob of the image files (default: *.nii.gz)")
    folds.add_argument("--label-pattern", help="glob of the label files (default: --image-pattern)")
    folds.add_argument("--name", help="dataset name (default: from --classes, else the images folder's parent)")
    folds.add_argument(
        "--test-only",
        action="store_true",
        help="write one test.json with every pair in a 'test' list (an external test set), no folds",
    )

    xray = commands.add_parser(
        "make-xray-datalist",
        help="find 2D X-rays in a folder, attach CSV or folder-name labels and write a patient-grouped "
        "train/validation/test datalist, or keep the dataset's split folders, or write a test-only list",
        description="Find the images under FOLDER (recursively, sorted), attach the columns of a labels CSV (the class "
        "column becomes an integer 'label', names in the top-level 'labels' map) or take each class from the "
        "image's folder name, split them into training, validation and test with no group (patient) in two lists, "
        "stratified by label (or keep the dataset's train/valid/test folders, or put every image in a test list), "
        "and write one datalist JSON.",
    )
    xray.add_argument("folder", help="folder of the images")
    xray.add_argument("--output", required=True, help="the datalist JSON to write")
    classes = xray.add_mutually_exclusive_group()
    classes.add_argument("--labels", help="CSV with one row per image (paths relative to FOLDER); default: no labels")
    classes.add_argument(
        "--classes-from-folders",
        action="store_true",
        help="each image's class is its parent folder's name (PNEUMONIA/img1.png); sorted names get labels 0..K-1",
    )
    xray.add_argument("--path-column", default="path", help="CSV column of the image path (default: path)")
    xray.add_argument("--label-column", default="label", help="CSV column of the class; '' for none (default: label)")
    xray.add_argument(
        "--group-column",
        default="patient",
        help="CSV column of the patient id; '' to split by image (default: patient; ignored without --labels)",
    )
    layout = xray.add_mutually_exclusive_group()
    layout.add_argument(
        "--keep-splits",
        action="store_true",
        help="keep the dataset's split folders (train/training, valid/val/validation/dev, test/testing, any case) "
        "instead of splitting anew; without a validation folder, validation is drawn from training "
        "(--val-fraction)",
    )
    layout.add_argument(
        "--test-only",
        action="store_true",
        help="put every image in the 'test' list, e.g. an external test set for a model trained elsewhere",
    )
    xray.add_argument(
        "--val-fraction",
        type=float,
        help="fraction for validation (default: 0.15); with --keep-splits, of the training images, used only "
        "without a validation folder",
    )
    xray.add_argument(
        "--test-fraction",
        type=float,
        help="fraction for test (default: 0.15; not used with --keep-splits, --test-only)",
    )
    xray.add_argument("--seed", type=int, default=0, help="seed of the group shuffle (default: 0)")
    xray.add_argument(
        "--extensions",
        nargs="+",
        default=list(XRAY_EXTENSIONS),
        help=f"image file extensions (default: {' '.join(XRAY_EXTENSIONS)})",
    )
    xray.add_argument(
        "--data-root",
        help="folder the written paths are relative to; pass it as --data-root to validate-datalist "
        "(default: the output file's folder)",
    )
    xray.add_argument("--modality", default="XR", help="modality tag of every image: XR, DX or CR (default: XR)")
    xray.add_argument("--name", help="dataset name (default: the folder's name)")

    check = commands.add_parser(
        "validate-datalist",
        help="check a datalist JSON: structure, modalities, every image a readable 3D volume (2D for X-rays), "
        "labels present; with --deep every image and label decoded completely",
        description="Load a datalist with dae.data.load_datalist and report OK with counts, or every problem. "
        "With --deep, decode every image and label image completely (dae.data.deep_check): truncated files, "
        "NaN/Inf voxels, constant images, extra channels, labels of another shape or grid, non-integer label values "
        "or values outside the classes are all reported at once, and per-modality statistics are printed.",
    )
    check.add_argument("path", help="the datalist JSON file")
    check.add_argument(
        "--key", nargs="+", help="list(s) to check (default: each of training, validation and test the file has)"
    )
    check.add_argument("--data-root", help="folder relative paths are joined to (default: current directory)")
    check.add_argument("--deep", action="store_true", help="decode every image and label image completely")
    check.add_argument("--workers", type=int, help="decoding processes for --deep (default: min(8, CPU count))")
    check.add_argument(
        "--num-classes",
        type=int,
        help="for --deep: label values must lie in 0..K-1 (default: the size of the datalist's 'labels' map, if any)",
    )
    pretrain_lists.add_commands(commands)
    run_report.add_commands(commands)
    return parser


def _make_folds(args: argparse.Namespace) -> None:
    entries = pair_images_and_labels(args.images, args.labels, args.image_pattern, args.label_pattern)
    entries = assign_patients(entries, args.patient_regex)
    root = args.data_root or os.path.commonpath([os.path.abspath(args.images), os.path.abspath(args.labels)])
    dataset, class_names = _CLASSES[args.classes]
    name = args.name or dataset or os.path.basename(os.path.dirname(os.path.abspath(args.images)))
    if args.test_only:
        description = f"{name}: test set of {len(entries)} cases (dae.cli make-folds --test-only)"
        path = write_test_file(entries, args.out, root, class_names, args.modality, name, description)
        print(f"Wrote {path}: test {len(entries)} cases.")
        return
    folds = kfold_splits(entries, n_folds=args.folds, seed=args.seed)
    description = f"{name}: {args.folds}-fold cross-validation by patient, seed {args.seed} (dae.cli make-folds)"
    paths = write_fold_files(folds, args.out, root, class_names, args.modality, name, description)
    patients = len({e["patient"] for e in entries})
    sizes = ", ".join(str(len(val)) for _, val in folds)
    print(
        f"Wrote {len(paths)} fold files to {args.out}: {len(entries)} cases, {patients} patients, "
        f"validation sizes {sizes}."
    )


def _make_xray_datalist(args: argparse.Namespace) -> None:
    notes: list[str] = []
    content = make_xray_datalist(
        args.folder,
        args.output,
        labels=args.labels,
        label_column=args.label_column,
        group_column=args.group_column,
        path_column=args.path_column,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        extensions=args.extensions,
        data_root=args.data_root,
        modality=args.modality,
        name=args.name,
        classes_from_folders=args.classes_from_folders,
        keep_splits=args.keep_splits,
        test_only=args.test_only,
        note=notes.append,
    )
    names = content.get("labels", {})
    sizes = []
    for key in ("training", "validation", "test"):
        entries = content.get(key, [])
        counts = Counter(names.get(str(e["label"]), e["label"]) for e in entries if "label" in e)
        detail = f" ({', '.join(f'{n} {c}' for n, c in sorted(counts.items()))})" if counts else ""
        sizes.append(f"{key} {len(entries)}{detail}")
    print(f"Wrote {args.output}: {'; '.join(sizes)}.")
    for line in notes:
        print(f"Note: {line}")


def _validate(args: argparse.Namespace) -> None:
    content = _read_json(args.path)
    keys = args.key or [k for k in _SPLITS if k in content] or ["training"]  # load_datalist names the keys present
    lists, errors = {}, []
    for key in keys:
        try:
            # --deep checks the files itself, and reports them together with every other problem
            lists[key] = load_datalist(args.path, key=key, data_root=args.data_root, validate=not args.deep)
        except DatalistError as e:
            errors.append(str(e))
    if errors:
        raise DatalistError("\n".join(errors))
    if args.deep:
        summaries = deep_check_lists(
            lists, num_classes=_num_classes(args, content, lists), workers=args.workers, source=f"'{args.path}'"
        )
        for summary in summaries.values():
            print(summary)
    for key, entries in lists.items():
        missing = [e["label"] for e in entries if isinstance(e.get("label"), str) and not os.path.exists(e["label"])]
        if missing:
            raise DatalistError(f"Datalist '{args.path}' (key '{key}'): missing label files: {', '.join(missing)}")
        counts = Counter(e["modality"] for e in entries)
        detail = ", ".join(f"{m}: {n}" for m, n in sorted(counts.items()))
        print(f"OK {args.path} [{key}]: {len(entries)} entries ({detail}).")


def _read_json(path: str) -> dict:
    """The datalist's content; {} when unreadable (load_datalist then reports why)."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _num_classes(args: argparse.Namespace, content: Mapping, lists: Mapping[str, list[dict]]) -> int | None:
    if args.num_classes is not None:
        return args.num_classes
    if "labels" not in content:
        return None
    num_classes = len(read_class_names(args.path))
    tables = sorted({str(e["id_table"]) for entries in lists.values() for e in entries if "id_table" in e})
    if tables:
        print(
            f"Note: entries name the id tables {', '.join(tables)}, which this command does not know; label values "
            f"are not checked against the {num_classes} classes (--num-classes checks them as stored)."
        )
        return None
    return num_classes


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when the data are unusable or a file is missing (the error is printed to
        stderr).
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make-folds":
            _make_folds(args)
        elif args.command == "make-xray-datalist":
            _make_xray_datalist(args)
        elif args.command in pretrain_lists.COMMANDS:
            pretrain_lists.run(args)
        elif args.command in run_report.COMMANDS:
            run_report.run(args)
        else:
            _validate(args)
    except (DatalistError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
