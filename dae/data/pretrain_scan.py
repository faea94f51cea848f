"""Scanning downloaded dataset folders into pretraining entries; modality from header or file name.

:func:`scan_source` finds the volumes of one folder (NIfTI, NRRD, MetaImage files and DICOM series, found
recursively), by its dataset preset's download layout (:data:`dae.data.pretrain_presets.PRESETS`) or as a plain
folder, and returns a :class:`ScanResult`: one entry per volume, the files and series left out (:class:`Skipped`,
with reasons) and the volumes whose modality cannot be told. :func:`scan_dicom_series` describes every DICOM series
below a folder (:class:`DicomSeries`, from the header of its first file).

Modality rules: a volume's modality comes from, in this order, an explicit modality, the DICOM header (``Modality``,
and for MR the series description, :func:`modality_from_series_description`), or its file name
(:func:`modality_from_filename`). :func:`file_stem`, :func:`brats_sequence` and :func:`tcia_covid19_patient` read
cases and patients from file names.

Entries are ``{"image", "modality", "tags": [dataset tag], "patient"}`` plus ``"series_uid"`` when known, with an
absolute ``image`` path; :mod:`dae.data.pretrain_lists` links, splits and writes them.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from dae.data.pretrain_presets import Preset

__all__ = [
    "DEFAULT_MIN_SLICES",
    "DicomSeries",
    "ScanResult",
    "Skipped",
    "Source",
    "brats_sequence",
    "file_stem",
    "modality_from_filename",
    "modality_from_series_description",
    "scan_dicom_series",
    "scan_source",
    "tcia_covid19_patient",
]

DEFAULT_MIN_SLICES = 64
"""DICOM series with fewer slices (files) are skipped: localizers, scouts and partial series."""

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files never part of a DICOM series: a folder holding only these is not handed to GDCM.
_NOT_DICOM_SUFFIXES = (
    *_IMAGE_SUFFIXES,
    *(".raw", ".zraw", ".gz", ".zip", ".json", ".csv", ".tsv", ".txt", ".md", ".xml", ".html", ".pdf"),
    *(".png", ".jpg", ".jpeg", ".tif", ".tiff", ".py", ".sh", ".log"),
)
_NAME_MODALITIES = {
    "ct": "CT",
    "t1": "T1",
    "t1w": "T1",
    "t1ce": "T1CE",
    "t1c": "T1CE",
    "t1gd": "T1CE",
    "t2": "T2",
    "t2w": "T2",
    "flair": "FLAIR",
}
_MODALITY_TOKEN = re.compile(
    r"(?:^|[_\-.\s]+)(?:" + "|".join(sorted(_NAME_MODALITIES, key=len, reverse=True)) + r")(?=$|[_\-.\s])",
    re.IGNORECASE,
)
_LABEL_TOKENS = {"seg", "segmentation", "label", "labels", "labelstr", "labelsts", "mask", "masks", "dseg"}
_TOKEN_SPLIT = re.compile(r"[_\-.\s]+")
_CONTRAST_TOKENS = {"ce", "gd", "gad", "gado", "gadolinium", "post", "postcontrast", "contrast"}
_NON_CONTRAST_TOKENS = {"pre", "precontrast", "non", "noncontrast", "without", "wo"}
_DICOM_TAGS = {
    "modality": "0008|0060",
    "description": "0008|103e",
    "image_type": "0008|0008",
    "patient_id": "0010|0020",
    "uid": "0020|000e",
}
_COVID_NAME = re.compile(r"volume-covid19-.*\.nii(?:\.gz)?", re.IGNORECASE)
_COVID_PATIENT = re.compile(r"volume-covid19-([a-z]+-\d+)", re.IGNORECASE)
_BRATS_NAME = re.compile(r"(?P<case>.+)_(?P<sequence>t1ce|t1|t2|flair|seg)\.nii(?:\.gz)?", re.IGNORECASE)
_BRATS_MODALITIES = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}


@dataclass(frozen=True)
class Source:
    """One folder to scan.

    Attributes:
        folder: the folder; scanned recursively.
        preset: the dataset preset that tells its layout, modality, tag and split size; None for a plain folder.
        tag: tag of a plain folder's entries (default: the folder's name).
        modality: modality of every volume of a plain folder (default: from DICOM headers or file names).
        patient_regex: for a plain folder, searched in each image's path relative to ``folder``; its first group
            (or the whole match) is the patient id. Default: the DICOM PatientID, else the file name without its
            extension and modality token (``case7_t1.nii.gz`` -> ``case7``).
    """

    folder: Path
    preset: Preset | None = None
    tag: str | None = None
    modality: str | None = None
    patient_regex: str | None = None

    @property
    def dataset_tag(self) -> str:
        """The tag of this folder's entries."""
        if self.preset is not None:
            return self.preset.tag
        return self.tag or Path(os.path.abspath(self.folder)).name

    def __str__(self) -> str:
        return f"{self.preset.name}={self.folder}" if self.preset else str(self.folder)


@dataclass(frozen=True)
class Skipped:
    """A file or DICOM series left out of the list.

    Attributes:
        path: the file, or the folder of a DICOM series.
        reason: why, shared by all files skipped for the same reason (the report groups by it).
        detail: what this file showed, e.g. ``"Modality SEG"``.
    """

    path: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.detail})" if self.detail else self.path


@dataclass
class ScanResult:
    """What :func:`scan_source` found in one folder.

    Attributes:
        entries: one entry per volume, with an absolute ``image`` path.
        skipped: files and series left out, with reasons.
        undetermined: volumes whose modality could not be told.
    """

    entries: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    undetermined: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series, described by the header of its first file.

    Attributes:
        folder: the folder holding its files.
        uid: the SeriesInstanceUID.
        slices: its number of files.
        modality: header Modality (0008,0060), e.g. ``"CT"``, ``"MR"``, ``"SEG"``; ``""`` when absent.
        description: SeriesDescription (0008,103E).
        image_type: ImageType (0008,0008), e.g. ``"ORIGINAL\\PRIMARY\\LOCALIZER"``.
        patient_id: PatientID (0010,0020).
        largest: whether this is the series :func:`dae.data.find_dicom_series` reads for its folder.
    """

    folder: Path
    uid: str
    slices: int
    modality: str
    description: str
    image_type: str
    patient_id: str
    largest: bool


# ------------------------------------------------------------------------------------------------ modality rules
def modality_from_series_description(description: str) -> str:
    """The MR modality tag a DICOM SeriesDescription names: ``FLAIR``, ``T1CE``, ``T1``, ``T2``, else ``MR``.

    Case-insensitive, on the description's alphanumeric tokens: any token containing ``flair`` gives FLAIR; a T1
    token (``t1``, ``t1w``) gives T1CE with a contrast marker (a ``t1ce``/``t1c``/``t1gd``/``t1post`` token, or a
    ``ce``/``gd``/``gad``/``gado``/``post``/``contrast`` token, or ``+c``/``c+``) unless it is negated
    (``pre``/``non``/``without``), else T1; a T2 token (``t2``, ``t2w``) gives T2.

    Args:
        description: the SeriesDescription, e.g. ``"AX T1 POST GD"``.
    """
    text = description.lower()
    tokens = re.findall(r"[a-z0-9]+", text)
    if any("flair" in t for t in tokens):
        return "FLAIR"
    if any(t in ("t1ce", "t1c", "t1gd", "t1post") for t in tokens):
        return "T1CE"
    if any(t in ("t1", "t1w") for t in tokens):
        compact = re.sub(r"\s+", "", text)
        contrast = bool(_CONTRAST_TOKENS & set(tokens)) or "+c" in compact or "c+" in compact
        return "T1CE" if contrast and not _NON_CONTRAST_TOKENS & set(tokens) else "T1"
    if any(t in ("t2", "t2w") for t in tokens):
        return "T2"
    return "MR"


def modality_from_filename(name: str) -> str | None:
    """The modality a file (or folder) name names, or None when it names none or several.

    The name without its extension is split at ``_``, ``-``, ``.`` and spaces; the tokens ``ct``, ``t1``/``t1w``,
    ``t1ce``/``t1c``/``t1gd``, ``t2``/``t2w`` and ``flair`` (any case) give CT, T1, T1CE, T2 and FLAIR. This covers
    BraTS (``BraTS2021_00000_t1ce.nii.gz``) and BIDS (``sub-01_T1w.nii.gz``) names.

    Args:
        name: a file name or path (only its last part is used).
    """
    found = {_NAME_MODALITIES[t] for t in _tokens(file_stem(Path(name).name)) if t in _NAME_MODALITIES}
    return found.pop() if len(found) == 1 else None


def file_stem(name: str) -> str:
    """The file name without its image extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``,
    ``.dcm``); other names unchanged."""
    lower = name.lower()
    for suffix in (*_IMAGE_SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def brats_sequence(name: str) -> tuple[str, str | None] | None:
    """The case and modality of a BraTS file name: ``BraTS2021_00000_t1ce.nii.gz`` -> ``("BraTS2021_00000", "T1CE")``.

    Returns:
        (case, modality), with modality None for the ``_seg`` label file; None for a name that is no BraTS case
        file ``<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``.
    """
    match = _BRATS_NAME.fullmatch(name)
    if match is None:
        return None
    return match["case"], _BRATS_MODALITIES.get(match["sequence"].lower())


def tcia_covid19_patient(name: str) -> str:
    """The patient of a TCIA COVID-19 file name (``volume-covid19-A-0269.nii.gz`` -> ``A-0269``), else its stem."""
    match = _COVID_PATIENT.match(name)
    return match.group(1) if match else file_stem(name)


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def _case_id(name: str) -> str:
    """The file name without extension and without modality tokens: ``case7_t1.nii.gz`` -> ``case7``."""
    stem = file_stem(name)
    return _MODALITY_TOKEN.sub("", stem).strip("_-. ") or stem


# ------------------------------------------------------------------------------------------------------ scanning
def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(directory, sorted visible file names) of every visible directory below ``folder``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def _image_files(folder: Path) -> Iterator[Path]:
    for directory, names in _walk(folder):
        yield from (directory / n for n in names if n.lower().endswith(_IMAGE_SUFFIXES))


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings (GDCM warns on every folder without a series)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def scan_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM series below ``folder``, found with GDCM one directory at a time.

    A directory holding only files with known non-DICOM suffixes (images, ``.raw``, text, ...) is not read. Each
    series is described by the header of its first file (in GDCM's slice order).

    Args:
        folder: the folder to search recursively.

    Returns:
        The series, by directory (sorted) and in GDCM's order within a directory.
    """
    found = []
    with _quiet_itk():
        for directory, names in _walk(Path(folder)):
            if all(n.lower().endswith(_NOT_DICOM_SUFFIXES) for n in names):
                continue
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
            files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid) for uid in uids}
            largest = max(files, key=lambda uid: len(files[uid]), default=None)  # as find_dicom_series chooses
            for uid, names_of_series in files.items():
                tags = _read_tags(names_of_series[0])
                found.append(
                    DicomSeries(
                        folder=directory,
                        uid=tags["uid"] or uid,
                        slices=len(names_of_series),
                        modality=tags["modality"].upper(),
                        description=tags["description"],
                        image_type=tags["image_type"],
                        patient_id=tags["patient_id"],
                        largest=uid == largest,
                    )
                )
    return found


def _read_tags(path: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return {
        name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else "" for name, tag in _DICOM_TAGS.items()
    }


def scan_source(source: Source, min_slices: int = DEFAULT_MIN_SLICES) -> ScanResult:
    """Find the volumes of one folder, by its preset's layout or as a plain folder.

    Presets: ``luna16`` takes every ``*.mhd`` outside ``seg-lungs*`` folders (patient and ``series_uid``: the file
    name, a SeriesInstanceUID); ``tcia-covid19`` every ``volume-covid19-*.nii(.gz)`` (patient: the ``A-XXXX`` id);
    ``brats2021`` every ``<case>_{t1,t1ce,t2,flair}.nii(.gz)`` (modality from the suffix, patient: the case;
    ``_seg`` files are skipped); ``hnscc``, ``tcia-colonography`` and ``lidc-idri`` every DICOM CT series (see
    below). A plain folder gives its image files (except label maps: names with a ``seg``/``label``/``mask`` token)
    and its DICOM series of Modality CT or MR (or none), its modality from ``source.modality``, else the DICOM
    header, else the file (or series folder) name (:func:`modality_from_filename`).

    DICOM series are skipped when they are not CT (presets) or not CT/MR (plain folders), are localizers (ImageType
    LOCALIZER), have fewer than ``min_slices`` files, or are not the one series the reader reads from their folder
    (:func:`dae.data.find_dicom_series` reads the largest). Patient: PatientID, else the patient folder of the NBIA
    layout ``<PatientID>/<study>/<series>``.

    Args:
        source: the folder and its preset or plain-folder settings.
        min_slices: DICOM series with fewer files are skipped.

    Returns:
        The entries (absolute ``image`` paths), the skipped files and the volumes of unknown modality.

    Raises:
        ValueError: the folder does not exist, or ``source.patient_regex`` does not match an image's path.
    """
    folder = Path(source.folder)
    if not folder.is_dir():
        raise ValueError(f"Folder '{folder}' of --source {source} does not exist.")
    layout = source.preset.layout if source.preset else "plain"
    result = ScanResult()
    if layout == "luna16":
        _scan_luna16(source, result)
    elif layout == "tcia_covid19":
        _scan_covid19(source, result)
    elif layout == "brats":
        _scan_brats(source, result)
    else:
        if layout == "plain":
            _scan_plain_files(source, result)
        _scan_dicom(source, result, min_slices, ct_only=layout == "dicom_ct")
    return result


def _entry(path: Path, modality: str, tag: str, patient: str, series_uid: str | None = None) -> dict:
    entry = {"image": os.path.abspath(path), "modality": modality, "tags": [tag], "patient": patient}
    if series_uid:
        entry["series_uid"] = series_uid
    return entry


def _scan_luna16(source: Source, result: ScanResult) -> None:
    for path in _image_files(source.folder):
        if not path.name.lower().endswith(".mhd"):
            continue
        if any(part.lower().startswith("seg-lungs") for part in path.relative_to(source.folder).parts[:-1]):
            result.skipped.append(Skipped(str(path), "LUNA16 lung mask (seg-lungs-LUNA16), not an image"))
            continue
        uid = file_stem(path.name)
        result.entries.append(_entry(path, "CT", source.dataset_tag, uid, uid))


def _scan_covid19(source: Source, result: ScanResult) -> None:
    for path in _image_files(source.folder):
        if not _COVID_NAME.fullmatch(path.name):
            result.skipped.append(Skipped(str(path), "not a volume-covid19-*.nii.gz file"))
            continue
        result.entries.append(_entry(path, "CT", source.dataset_tag, tcia_covid19_patient(path.name)))


def _scan_brats(source: Source, result: ScanResult) -> None:
    for path in _image_files(source.folder):
        parsed = brats_sequence(path.name)
        if parsed is None:
            result.skipped.append(Skipped(str(path), "not a BraTS case file <case>_{t1,t1ce,t2,flair}.nii.gz"))
        elif parsed[1] is None:
            result.skipped.append(Skipped(str(path), "BraTS tumour segmentation (_seg), not an image"))
        else:
            result.entries.append(_entry(path, parsed[1], source.dataset_tag, parsed[0]))


def _scan_plain_files(source: Source, result: ScanResult) -> None:
    for path in _image_files(source.folder):
        relative = path.relative_to(source.folder)
        if any(_LABEL_TOKENS & set(_tokens(part)) for part in (*relative.parts[:-1], file_stem(path.name))):
            result.skipped.append(Skipped(str(path), "label map (a seg/label/mask token in its path), not an image"))
            continue
        modality = source.modality or modality_from_filename(path.name)
        if modality is None:
            result.undetermined.append(str(path))
            continue
        patient = _patient_from_regex(source, relative) if source.patient_regex else _case_id(path.name)
        result.entries.append(_entry(path, modality, source.dataset_tag, patient))


def _patient_from_regex(source: Source, relative: Path) -> str:
    match = re.search(source.patient_regex, relative.as_posix())
    if match is None:
        raise ValueError(
            f"--patient-regex {source.patient_regex!r} does not match '{relative.as_posix()}' in '{source.folder}'."
        )
    return match.group(1) if match.re.groups else match.group(0)


def _series_problem(series: DicomSeries, min_slices: int, ct_only: bool) -> tuple[str, str] | None:
    """(reason, detail) why a series is no pretraining volume, or None."""
    if ct_only and series.modality != "CT":
        return "not a CT series", f"Modality {series.modality or 'missing'}"
    if not ct_only and series.modality not in ("", "CT", "MR"):
        return "not a CT or MR series", f"Modality {series.modality}"
    if "LOCALIZER" in series.image_type.upper():
        return "localizer or scout", f"ImageType {series.image_type}"
    if series.slices < min_slices:
        return "fewer slices than --min-slices", f"{series.slices} < {min_slices}"
    return None


def _scan_dicom(source: Source, result: ScanResult, min_slices: int, ct_only: bool) -> None:
    by_folder: dict[Path, list[DicomSeries]] = defaultdict(list)
    for series in scan_dicom_series(source.folder):
        by_folder[series.folder].append(series)
    for folder, all_series in by_folder.items():
        usable = []
        for series in all_series:
            problem = _series_problem(series, min_slices, ct_only)
            if problem:
                result.skipped.append(Skipped(str(folder), problem[0], f"series {series.uid}: {problem[1]}"))
            else:
                usable.append(series)
        if not usable:
            continue
        chosen = max(usable, key=lambda s: s.slices)
        for series in usable:
            if series is not chosen:
                detail = f"series {series.uid}, {series.slices} slices"
                result.skipped.append(
                    Skipped(str(folder), "folder holds several series; the reader reads the largest", detail)
                )
        if not chosen.largest:
            result.skipped.append(
                Skipped(
                    str(folder),
                    "a larger unusable series shares its folder; the reader reads the largest",
                    f"series {chosen.uid}",
                )
            )
            continue
        modality = source.modality or _dicom_modality(chosen)
        if modality is None:
            result.undetermined.append(str(folder))
            continue
        relative = folder.relative_to(source.folder)
        if source.patient_regex:
            patient = _patient_from_regex(source, relative)
        else:
            parts = relative.parts
            patient = chosen.patient_id or (parts[-3] if len(parts) >= 3 else parts[0] if parts else chosen.uid)
        result.entries.append(_entry(folder, modality, source.dataset_tag, patient, chosen.uid))


def _dicom_modality(series: DicomSeries) -> str | None:
    if series.modality == "CT":
        return "CT"
    if series.modality == "MR":
        return modality_from_series_description(series.description)
    return modality_from_filename(series.folder.name)
