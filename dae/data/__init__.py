"""Data layer: a SimpleITK reader for MONAI, datalists with validation, and modality-aware intensity scaling; 2D X-ray
reading, datalists, DAX preprocessing and DINO multi-crop views."""

from __future__ import annotations

from dae.data.cache_report import log_cache_estimate
from dae.data.datalist import (
    GROUP_NAMES,
    MODALITY_GROUPS,
    DatalistError,
    ImageHeader,
    estimate_cache_bytes,
    format_bytes,
    inference_entries,
    load_datalist,
    read_class_names,
    read_image_header,
    validate_datalist,
)
from dae.data.labels import (
    BTCV_CLASSES,
    FETA_ATLAS_TO_FETA,
    FETA_CLASSES,
    TOTALSEGMENTATOR_BTCV_NAMES,
    RemapLabelsd,
    read_totalsegmentator_classes,
    remap_labels,
    totalsegmentator_to_btcv,
)
from dae.data.loaders import split_loaders
from dae.data.multicrop import DINOMultiCrop, MultiCropd
from dae.data.readers import SimpleITKReader, find_dicom_series
from dae.data.splits import (
    assign_patients,
    case_id_from_filename,
    kfold_splits,
    label_fraction_subset,
    pair_images_and_labels,
    write_fold_files,
)
from dae.data.transforms import ScaleIntensityByModalityd
from dae.data.xray import XRAY_EXTENSIONS, LoadXRayd, make_xray_datalist, read_xray
from dae.data.xray_transforms import (
    PREPROCESSING_NAMES,
    DAXPreprocessd,
    RandDAXPreprocessd,
    dax_preprocess,
    xray_preprocessing,
)

__all__ = [
    "BTCV_CLASSES",
    "FETA_ATLAS_TO_FETA",
    "FETA_CLASSES",
    "GROUP_NAMES",
    "MODALITY_GROUPS",
    "PREPROCESSING_NAMES",
    "TOTALSEGMENTATOR_BTCV_NAMES",
    "XRAY_EXTENSIONS",
    "DAXPreprocessd",
    "DINOMultiCrop",
    "DatalistError",
    "ImageHeader",
    "LoadXRayd",
    "MultiCropd",
    "RandDAXPreprocessd",
    "RemapLabelsd",
    "ScaleIntensityByModalityd",
    "SimpleITKReader",
    "assign_patients",
    "case_id_from_filename",
    "dax_preprocess",
    "estimate_cache_bytes",
    "find_dicom_series",
    "format_bytes",
    "inference_entries",
    "kfold_splits",
    "label_fraction_subset",
    "load_datalist",
    "log_cache_estimate",
    "make_xray_datalist",
    "pair_images_and_labels",
    "read_class_names",
    "read_image_header",
    "read_totalsegmentator_classes",
    "read_xray",
    "remap_labels",
    "split_loaders",
    "totalsegmentator_to_btcv",
    "validate_datalist",
    "write_fold_files",
    "xray_preprocessing",
]
