"""A MONAI image reader built on SimpleITK: DICOM series folders, NRRD, MetaImage (and NIfTI on request).

The reader returns arrays in (x, y, z) order and a metadata dict following the conventions of MONAI's
``NibabelReader``/``ITKReader`` (RAS ``affine``/``original_affine``, ``spatial_shape``,
``original_channel_dim``, ``space``), so ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``Orientationd`` ->
``Spacingd`` behave exactly as for NIfTI files read by nibabel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["SimpleITKReader", "find_dicom_series"]

logger = logging.getLogger(__name__)

PathLike = str | Path
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def find_dicom_series(folder: PathLike) -> list[str]:
    """Return the sorted file names of the DICOM series in ``folder`` (the largest one if there are several).

    Args:
        folder: a directory holding the files of one DICOM series (file names need no extension).

    Returns:
        The series' file names, sorted by slice position (as GDCM orders them).

    Raises:
        ValueError: the folder holds no DICOM series.
    """
    folder = str(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise ValueError(f"No DICOM series found in folder '{folder}'.")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) for uid in series_ids}
    chosen = max(files, key=lambda uid: len(files[uid]))
    if len(files) > 1:
        counts = ", ".join(f"{uid or '<no uid>'} ({len(names)} files)" for uid, names in files.items())
        logger.warning(f"Folder '{folder}' holds {len(files)} DICOM series: {counts}; reading the largest, {chosen}.")
    return list(files[chosen])


def _ras_affine(img: sitk.Image) -> np.ndarray:
    """Voxel-to-world affine of ``img`` in RAS (ITK images are LPS), on at most 3 spatial dims."""
    ndim = img.GetDimension()
    sr = min(ndim, 3)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:sr, :sr]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:sr]
    affine = np.eye(sr + 1, dtype=np.float64)
    affine[:sr, :sr] = direction * spacing  # scales column j by spacing[j]
    affine[:sr, sr] = np.asarray(img.GetOrigin(), dtype=np.float64)[:sr]
    affine[: min(sr, 2)] *= -1.0  # LPS -> RAS: negate the x and y world rows (rotation and translation)
    return affine


class SimpleITKReader(ImageReader):
    """Read DICOM series folders and NRRD/MetaImage files (NIfTI only if ``read_nifti``) with SimpleITK.

    ``verify_suffix`` accepts directories (DICOM series) and ``.nrrd``/``.nhdr``/``.mha``/``.mhd``/``.dcm``
    files; ``read`` refuses anything else. Since ``LoadImage`` tries a user-given reader first and falls
    back to MONAI's default readers when ``read`` raises, ``LoadImaged(keys="image", reader=SimpleITKReader())``
    reads NIfTI with nibabel and the other formats with this reader.

    Args:
        read_nifti: also read ``.nii``/``.nii.gz`` files (through ITK's NIfTI IO) instead of refusing them.
    """

    def __init__(self, read_nifti: bool = False) -> None:
        super().__init__()
        self.read_nifti = read_nifti

    def _supports(self, name: PathLike) -> bool:
        if Path(name).is_dir():
            return True
        suffixes = _ITK_SUFFIXES + (_NIFTI_SUFFIXES if self.read_nifti else ())
        return str(name).lower().endswith(suffixes)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every name in ``filename`` is a directory or has a suffix this reader reads.

        Args:
            filename: a path or a sequence of paths.
        """
        return all(self._supports(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: object) -> sitk.Image | list[sitk.Image]:
        """Read one image per path: a DICOM series for a directory, otherwise the file itself.

        Args:
            data: a path or a sequence of paths (read as channels of one image by ``get_data``).
            kwargs: unused; accepted for the ``ImageReader`` interface.

        Raises:
            ValueError: a path has an unsupported suffix, or a directory holds no DICOM series.
        """
        images = []
        for name in ensure_tuple(data):
            if Path(name).is_dir():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(find_dicom_series(name))
                images.append(reader.Execute())
            elif self._supports(name):
                images.append(sitk.ReadImage(str(name)))
            else:
                nifti = " (NIfTI needs read_nifti=True)" if str(name).lower().endswith(_NIFTI_SUFFIXES) else ""
                raise ValueError(
                    f"SimpleITKReader does not read '{name}'{nifti}: expected a DICOM folder or one of {_ITK_SUFFIXES}."
                )
        return images[0] if len(images) == 1 else images

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Return the (x, y, z[, c]) array and the MONAI metadata dict of one image or several stacked ones.

        Several images must share affine and spatial shape; scalar images are stacked on a new first
        (channel) axis, vector images are concatenated on their channel axis.

        Args:
            img: the output of :meth:`read`.

        Raises:
            ValueError: several images differ in affine or spatial shape.
        """
        images = [img] if isinstance(img, sitk.Image) else list(img)  # ensure_tuple would iterate the pixels
        arrays, metas = zip(*(self._one(i) for i in images))
        meta = metas[0]
        for other in metas[1:]:
            same_shape = np.array_equal(other[MetaKeys.SPATIAL_SHAPE], meta[MetaKeys.SPATIAL_SHAPE])
            if not same_shape or not np.allclose(other[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]):
                raise ValueError(
                    "Images read as channels of one image must share affine and spatial shape, got "
                    f"{meta[MetaKeys.SPATIAL_SHAPE]} / {other[MetaKeys.SPATIAL_SHAPE]} and affines\n"
                    f"{meta[MetaKeys.AFFINE]}\n{other[MetaKeys.AFFINE]}."
                )
        if len(arrays) == 1:
            return arrays[0], meta
        if np.isnan(meta[MetaKeys.ORIGINAL_CHANNEL_DIM]):
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=-1), meta

    @staticmethod
    def _one(img: sitk.Image) -> tuple[np.ndarray, dict]:
        """Array in (x, y, z[, c]) order and metadata of a single SimpleITK image."""
        array = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, c) for vector pixels
        ndim = img.GetDimension()
        channel_last = img.GetNumberOfComponentsPerPixel() > 1
        axes = tuple(reversed(range(ndim))) + ((ndim,) if channel_last else ())
        array = np.ascontiguousarray(np.transpose(array, axes))
        sr = min(ndim, 3)
        meta: dict = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys() if not key.startswith("ITK_")}
        affine = _ras_affine(img)
        meta.update(
            {
                "spacing": np.asarray(img.GetSpacing(), dtype=np.float64),
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(img.GetSize()[:sr]),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if channel_last or ndim > 3 else float("nan"),
            }
        )
        return array, meta
