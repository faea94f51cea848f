"""Data layer: a SimpleITK reader for MONAI, datalists with validation, and modality-aware intensity scaling."""

from __future__ import annotations

from dae.data.cache_report import log_cache_estimate
from dae.data.datalist import (
    GROUP_NAMES,
    MODALITY_GROUPS,
    DatalistError,
    ImageHeader,
    estimate_cache_bytes,
    format_bytes,
    load_datalist,
    read_image_header,
    validate_datalist,
)
from dae.data.readers import SimpleITKReader, find_dicom_series
from dae.data.transforms import ScaleIntensityByModalityd

__all__ = [
    "GROUP_NAMES",
    "MODALITY_GROUPS",
    "DatalistError",
    "ImageHeader",
    "ScaleIntensityByModalityd",
    "SimpleITKReader",
    "estimate_cache_bytes",
    "find_dicom_series",
    "format_bytes",
    "load_datalist",
    "log_cache_estimate",
    "read_image_header",
    "validate_datalist",
]
