"""The six public datasets of the DAE paper's pretraining set: download layout, modality, tag and split sizes.

Counts are the paper's Table 1 (total / training / validation). They count volumes, except for BraTS 2021, where
they count cases of four MR sequences each (1251 cases, 5004 volumes).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """One dataset of the paper's pretraining set.

    Attributes:
        name: the preset's name on the command line, e.g. ``"luna16"``.
        title: the dataset's name in the paper.
        tag: the tag of its datalist entries.
        layout: which scanner reads it: ``"luna16"`` (MetaImage files), ``"tcia_covid19"`` (NIfTI files),
            ``"brats"`` (NIfTI, one file per MR sequence) or ``"dicom_ct"`` (TCIA DICOM series, CT only).
        modality: the modality of every volume; None when it comes from each file's name (BraTS).
        total: the paper's count (volumes, or cases for ``unit == "cases"``).
        training: the paper's training count.
        validation: the paper's validation count.
        unit: what the counts count: ``"volumes"`` or ``"cases"``.
        download: where the data are downloaded from.
        expects: the folder layout the scanner expects.
    """

    name: str
    title: str
    tag: str
    layout: str
    modality: str | None
    total: int
    training: int
    validation: int
    unit: str
    download: str
    expects: str


_TCIA = "The Cancer Imaging Archive (TCIA), with the NBIA Data Retriever"
_NBIA = "NBIA layout <Collection>/<PatientID>/<study>/<series>/*.dcm; CT series only"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="luna16",
            title="LUNA16",
            tag="luna16",
            layout="luna16",
            modality="CT",
            total=888,
            training=844,
            validation=44,
            unit="volumes",
            download="luna16.grand-challenge.org (or its Zenodo records)",
            expects="subset0/ ... subset9/ holding <SeriesInstanceUID>.mhd + .raw; seg-lungs-LUNA16/ is ignored",
        ),
        Preset(
            name="tcia-covid19",
            title="TCIA COVID-19",
            tag="tcia_covid19",
            layout="tcia_covid19",
            modality="CT",
            total=761,
            training=723,
            validation=38,
            unit="volumes",
            download="TCIA collection CT Images in COVID-19 (NIfTI, e.g. CT-Covid-19-August2020/)",
            expects="volume-covid19-A-XXXX*.nii.gz files anywhere below the folder",
        ),
        Preset(
            name="hnscc",
            title="HNSCC",
            tag="hnscc",
            layout="dicom_ct",
            modality="CT",
            total=1287,
            training=1223,
            validation=64,
            unit="volumes",
            download=_TCIA,
            expects=_NBIA,
        ),
        Preset(
            name="tcia-colonography",
            title="TCIA CT Colonography",
            tag="tcia_colonography",
            layout="dicom_ct",
            modality="CT",
            total=1599,
            training=1520,
            validation=79,
            unit="volumes",
            download=_TCIA,
            expects=_NBIA,
        ),
        Preset(
            name="lidc-idri",
            title="LIDC-IDRI",
            tag="lidc_idri",
            layout="dicom_ct",
            modality="CT",
            total=475,
            training=451,
            validation=24,
            unit="volumes",
            download=_TCIA,
            expects=_NBIA,
        ),
        Preset(
            name="brats2021",
            title="BraTS 2021",
            tag="brats2021",
            layout="brats",
            modality=None,
            total=1251,
            training=1188,
            validation=63,
            unit="cases",
            download="the RSNA-ASNR-MICCAI BraTS 2021 challenge (Synapse)",
            expects="BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair}.nii.gz; _seg files are ignored",
        ),
    )
}
"""Presets by name."""
