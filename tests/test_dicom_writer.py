"""Tests of dae.data.write_dicom_series: a volume written as a DICOM series reads back with its geometry and voxels."""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dae.data import read_image_header, write_dicom_series

UID_ROOT = "1.2.826.0.1.3680043.2.1125.8"


def read_series(folder: Path, uid: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def test_write_dicom_series_round_trip(tmp_path: Path) -> None:
    voxels = (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 37 - 1000).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.75, 0.5, 2.5))
    image.SetOrigin((-120.25, 35.5, 10.0))
    folder = tmp_path / "series"
    uid = f"{UID_ROOT}.1"

    files = write_dicom_series(image, folder, uid, patient_id="P7", description="round trip")

    assert len(files) == 4 and all(f.parent == folder for f in files)
    header = read_image_header(folder)
    assert header.shape == (6, 5, 4)
    assert header.spacing == pytest.approx((0.75, 0.5, 2.5))
    back = read_series(folder, uid)
    assert back.GetSize() == (6, 5, 4)
    assert back.GetSpacing() == pytest.approx((0.75, 0.5, 2.5))
    assert back.GetOrigin() == pytest.approx((-120.25, 35.5, 10.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), voxels)

    other = f"{UID_ROOT}.2"
    write_dicom_series(sitk.Image(3, 3, 2, sitk.sitkInt16), folder, other, modality="MR")
    assert set(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == {uid, other}
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), other)) == 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_series(folder, uid)), voxels)

    with pytest.raises(ValueError, match="3D"):
        write_dicom_series(sitk.Image(8, 8, sitk.sitkInt16), tmp_path / "flat", f"{UID_ROOT}.3")


def test_writing_keeps_the_process_locale(tmp_path: Path) -> None:
    # GDCM's writer sets the C locale to "C": later subprocess output would be decoded as ASCII.
    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(sitk.Image(4, 4, 2, sitk.sitkInt16), tmp_path / "s", "1.2.3.4")
    assert locale.setlocale(locale.LC_ALL) == before
