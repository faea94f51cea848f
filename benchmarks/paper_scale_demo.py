"""The paper-scale path on the shipped volumes: six dataset-shaped folders -> datalists -> pretraining per cache mode.

Lays out the CT and MR volumes of ``data/`` as a new user lays out the six downloads of the DAE paper (LUNA16
MetaImage files in ``subsetN/``, TCIA COVID-19 NIfTI files, HNSCC / CT Colonography / LIDC-IDRI DICOM series in
the NBIA folder layout with a segmentation series, a localizer and a short series among them, BraTS 2021 cases
with four sequences and a ``_seg`` file; one LIDC-IDRI series has the UID of a LUNA16 scan, as in the real data),
then runs the commands a user runs: one ``make-pretrain-datalist`` per dataset, one ``--merge``, and the demo-sized
pretraining (``train.yaml`` + ``demo.yaml``) on the merged list once per ``cache`` mode. It prints the commands,
the datalist counts, and per mode the estimated cache size, the peak memory of the run, the disk cache's size on
disk and the wall time; ``--record`` appends the table to ``benchmarks/results.md``.

    python benchmarks/paper_scale_demo.py [--root /tmp/six] [--epochs 2] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from dae.data.dicom_writer import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CT = {
    "chest": DATA / "ct/chest_ct/cxr_ct_1.5mm_int16.nii.gz",
    "abdomen": DATA / "ct/totalseg/example_ct.nii.gz",
    "spleen": DATA / "ct/msd_spleen2/sub-spleen2_ct.nii.gz",
    "short": DATA / "ct/totalseg/example_ct_sm.nii.gz",
}
MASK = DATA / "ct/chest_ct/mask_1.5mm.nii.gz"
FETAL = [DATA / f"mr/fetal_atlas/fetal_SB_atlas_GA{ga}_notoperated/srr.nii.gz" for ga in (21, 22, 24)]
LUNA_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.{}"
CONFIGS = "['bundles/dae_pretrain/configs/train.yaml','bundles/dae_pretrain/configs/demo.yaml']"
# (dataset folder, preset, output list)
DATASETS = [
    ("LUNA16", "luna16", "luna16.json"),
    ("CT-Covid-19-August2020", "tcia-covid19", "tcia_covid19.json"),
    ("TCIA/HNSCC", "hnscc", "hnscc.json"),
    ("TCIA/CT COLONOGRAPHY", "tcia-colonography", "tcia_colonography.json"),
    ("TCIA/LIDC-IDRI", "lidc-idri", "lidc_idri.json"),
    ("BraTS2021", "brats2021", "brats2021.json"),
]


def read(path: Path, pixel: int = sitk.sitkInt16) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(path)), pixel)


def nbia_series(root: Path, patient: str, series: str, image: sitk.Image, uid: str, **tags: str) -> None:
    """One series in the NBIA Data Retriever's layout: <patient>/<study>/<series>/*.dcm."""
    folder = root / patient / "01-01-2000-NA-CT CHEST-00001" / series
    write_dicom_series(image, folder, uid, patient_id=patient, **tags)


def build_tree(root: Path) -> None:
    """The six dataset folders, from the shipped volumes (the same volume may appear under several names)."""
    luna = root / "LUNA16"
    for k, (subset, name) in enumerate([("subset0", "chest"), ("subset1", "abdomen")], start=1):
        (luna / subset).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(read(CT[name]), str(luna / subset / f"{LUNA_UID.format(k)}.mhd"))
    (luna / "seg-lungs-LUNA16").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(read(MASK), str(luna / "seg-lungs-LUNA16" / f"{LUNA_UID.format(1)}.mhd"))

    covid = root / "CT-Covid-19-August2020"
    covid.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(["spleen", "abdomen"], start=1):
        sitk.WriteImage(read(CT[name]), str(covid / f"volume-covid19-A-{k:04d}.nii.gz"))

    for k, (collection, prefix) in enumerate(
        [("HNSCC", "HNSCC-01-"), ("CT COLONOGRAPHY", "1.3.6.1.4.1.9328.50.4."), ("LIDC-IDRI", "LIDC-IDRI-")], start=1
    ):
        folder = root / "TCIA" / collection
        for p, name in enumerate(["chest", "abdomen"], start=1):
            patient = f"{prefix}{p:04d}"
            uid = LUNA_UID.format(1) if collection == "LIDC-IDRI" and p == 1 else f"1.2.826.0.1.3680043.9.{k}.{p}"
            nbia_series(folder, patient, "2.000000-CT-0001", read(CT[name]), uid, description="CT")
        first = f"{prefix}0001"
        segmentation = f"1.2.826.0.1.3680043.9.{k}.90"
        nbia_series(folder, first, "300.000000-Segmentation-0002", read(MASK), segmentation, modality="SEG")
        nbia_series(
            folder, first, "1.000000-Localizer-0003", read(CT["short"])[:, :, :2], f"1.2.826.0.1.3680043.9.{k}.91",
            image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        )  # fmt: skip
        nbia_series(folder, first, "3.000000-Short-0004", read(CT["short"]), f"1.2.826.0.1.3680043.9.{k}.92")

    for c, volume in enumerate(FETAL, start=1):
        case = root / "BraTS2021" / f"BraTS2021_{c:05d}"
        case.mkdir(parents=True, exist_ok=True)
        image = read(volume, sitk.sitkFloat32)
        for sequence, scale in (("t1", 1.0), ("t1ce", 1.3), ("t2", 0.7), ("flair", 1.1)):
            sitk.WriteImage(image * scale, str(case / f"{case.name}_{sequence}.nii.gz"))
        sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(case / f"{case.name}_seg.nii.gz"))


def run(command: list[str], log: Path | None = None) -> tuple[str, float, int]:
    """Run ``command`` from the repository root; its output, wall seconds and peak resident memory (KiB)."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    seconds = time.perf_counter() - start
    if log is not None:
        log.write_text(text, encoding="utf-8")
    if process.returncode:
        sys.exit(f"command failed ({process.returncode}):\n{text[-4000:]}")
    return text, seconds, usage.ru_maxrss


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="folder of the dataset tree and runs (default: a new temporary one)")
    parser.add_argument("--epochs", type=int, default=2, help="pretraining epochs per cache mode (default: 2)")
    parser.add_argument("--cache_num", type=int, default=6, help="smart: volumes in the window (default: 6)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/results.md")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="dae_six_"))
    build_tree(root)
    lists = root / "lists"
    cli = [sys.executable, "-m", "dae.cli", "make-pretrain-datalist"]
    counts = []
    for folder, preset, name in DATASETS:
        out, _, _ = run([*cli, "--source", f"{preset}={root / folder}", "--output", str(lists / name)])
        counts.append(out.strip())
    merged = lists / "dae_pretrain.json"
    out, _, _ = run([*cli, "--merge", *(str(lists / name) for *_, name in DATASETS), "--output", str(merged)])
    counts.append(out.strip())
    print("\n\n".join(counts))

    rows = []
    for mode in ("memory", "disk", "smart"):
        run_dir = root / "runs" / mode
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", CONFIGS, "--datalist", str(merged),
            "--dataset_dir", str(root), "--output_dir", str(run_dir), "--epochs", str(args.epochs), "--cache", mode,
            "--cache_num", str(args.cache_num), "--replace_rate", "0.5",
        ]  # fmt: skip
        text, seconds, peak_kib = run(command, log=root / f"{mode}.log")
        estimate = re.search(r"Cache '\w+', estimated from the headers: (.*)", text)
        rows.append(
            f"| {mode} | {estimate[1] if estimate else '?'} | {peak_kib / 1024**2:.2f} GiB | "
            f"{folder_bytes(run_dir / 'cache') / 1024**2:.1f} MiB | {seconds:.0f} s |"
        )
    table = [
        f"{datetime.date.today()}, {os.cpu_count()} CPUs, demo.yaml for {args.epochs} epochs on the merged list "
        f"({merged}); smart: cache_num {args.cache_num}, replace_rate 0.5",
        "",
        "| cache | estimate before filling (from the headers) | peak RSS of the run | disk cache | wall |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(table))
    if args.record:
        results = Path(__file__).resolve().parent / "results.md"
        with results.open("a") as f:
            f.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
