"""Write a 3D image as a DICOM series: one file per slice, with the tags scanners and archives set.

For tests and demos of the DICOM paths (the reader, ``make-pretrain-datalist`` on TCIA-style downloads) and for
sharing a volume with DICOM-only tools. The files are written by SimpleITK (GDCM); the pixel data keep the image's
type (e.g. int16 Hounsfield units).
"""

from __future__ import annotations

import locale
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import SimpleITK as sitk

__all__ = ["write_dicom_series"]


@contextmanager
def _locale_kept() -> Iterator[None]:
    """Restore the process's C locale afterwards: GDCM's DICOM writer sets it to "C", which would make Python
    decode the output of every later subprocess as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(
    image: sitk.Image,
    folder: str | Path,
    series_uid: str,
    modality: str = "CT",
    patient_id: str = "anonymous",
    description: str = "",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    extra_tags: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``image`` (3D) to ``folder`` as one DICOM file per slice of its third axis.

    Each file holds the series, study (``<series_uid>.0``) and instance (``<series_uid>.<k>``) UIDs, the patient
    id, the modality, the series description, the image type, the instance number and the slice's position and
    orientation (from the image's origin, spacing and direction), so that GDCM groups and orders the files into one
    series with the image's geometry. Files are named ``<last UID component>_<slice>.dcm``, so several series can
    share a folder.

    Args:
        image: a 3D SimpleITK image.
        folder: where the files go (created if needed).
        series_uid: the SeriesInstanceUID (digits and dots).
        modality: the Modality tag (0008,0060), e.g. ``CT``, ``MR``, ``SEG``.
        patient_id: the PatientID tag (0010,0020).
        description: the SeriesDescription tag (0008,103e).
        image_type: the ImageType tag (0008,0008), e.g. ``ORIGINAL\\PRIMARY\\LOCALIZER`` for a scout.
        extra_tags: further ``"gggg|eeee": value`` tags for every file.

    Returns:
        The written files, in slice order.

    Raises:
        ValueError: ``image`` is not 3D.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"write_dicom_series needs a 3D image, got {image.GetDimension()} dimensions")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0:9:3], *direction[1:9:3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    prefix = series_uid.rsplit(".", 1)[-1]
    files = []
    for k in range(image.GetSize()[2]):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0008|0008": image_type,
            "0020|000e": series_uid,
            "0020|000d": f"{series_uid}.0",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0010|0020": patient_id,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            **(extra_tags or {}),
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        path = folder / f"{prefix}_{k:04d}.dcm"
        writer.SetFileName(str(path))
        with _locale_kept():
            writer.Execute(plane)
        files.append(path)
    return files
