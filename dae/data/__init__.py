"""Data layer: a SimpleITK reader for MONAI, datalists with validation and deep checks, modality-aware intensity
scaling, caches in RAM, on disk or in a rolling window (sized before they are filled) that name failing entries;
2D X-ray reading, datalists, DAX preprocessing, the uint8 DINO multi-crop path with its device-side augmentation,
and training loaders whose random stream is seeded per sample and epoch."""

from __future__ import annotations

from dae.data.cache_dataset import CacheDataset
from dae.data.cache_modes import (
    CACHE_MODES,
    PersistentDataset,
    RollingCacheDataset,
    cache_dataset,
    transform_fingerprint,
    validation_cache_mode,
)
from dae.data.cache_report import CacheEstimate, available_memory_bytes, check_cache_size
from dae.data.dae_reference_lists import ReferenceFile, convert_reference_lists
from dae.data.datalist import (
    GROUP_NAMES,
    MODALITY_GROUPS,
    DatalistError,
    ImageHeader,
    estimate_cache_bytes,
    format_bytes,
    inference_entries,
    label_problem,
    load_datalist,
    read_class_names,
    read_image_header,
    validate_datalist,
)
from dae.data.deep_check import CHECK_LEVELS, ModalitySummary, check_data, deep_check_lists
from dae.data.device_augment import CropAugment, augment_batch, augment_crops
from dae.data.dicom_writer import write_dicom_series
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
from dae.data.loaders import list_loaders, load_splits
from dae.data.multicrop import DINOMultiCrop, MultiCropd, multicrop_working_size
from dae.data.pretrain_lists import PretrainReport, make_pretrain_datalist, merge_datalists, validation_size
from dae.data.pretrain_presets import PRESETS, Preset
from dae.data.pretrain_scan import Source, modality_from_filename, modality_from_series_description, scan_source
from dae.data.readers import SimpleITKReader, find_dicom_series
from dae.data.seeded_loading import EpochSampler, EpochShuffleSampler, SeededDataset, sample_seeds, seeded_loader
from dae.data.splits import (
    assign_patients,
    case_id_from_filename,
    kfold_splits,
    label_fraction_subset,
    pair_images_and_labels,
    write_fold_files,
    write_test_file,
)
from dae.data.stratified_sampling import StratifiedEpochSampler, stratified_order
from dae.data.test_sets import TestSet, load_test_set
from dae.data.transforms import ScaleIntensityByModalityd
from dae.data.xray import XRAY_EXTENSIONS, LoadXRayd, make_xray_datalist, read_xray
from dae.data.xray_transforms import (
    PREPROCESSING_NAMES,
    DAXPreprocessd,
    RandDAXPreprocessd,
    dax_preprocess,
    xray_preprocessing,
)
from dae.data.xray_uint8 import VARIANTS_SUFFIX, DAXv2Variants, RandXRayVariantd, XRayToUint8d, reduce_to_uint8

__all__ = [
    "BTCV_CLASSES",
    "CACHE_MODES",
    "CHECK_LEVELS",
    "FETA_ATLAS_TO_FETA",
    "FETA_CLASSES",
    "GROUP_NAMES",
    "MODALITY_GROUPS",
    "PREPROCESSING_NAMES",
    "PRESETS",
    "TOTALSEGMENTATOR_BTCV_NAMES",
    "VARIANTS_SUFFIX",
    "XRAY_EXTENSIONS",
    "CacheDataset",
    "CacheEstimate",
    "CropAugment",
    "DAXPreprocessd",
    "DAXv2Variants",
    "DINOMultiCrop",
    "DatalistError",
    "EpochSampler",
    "EpochShuffleSampler",
    "ImageHeader",
    "LoadXRayd",
    "ModalitySummary",
    "MultiCropd",
    "PersistentDataset",
    "Preset",
    "PretrainReport",
    "RandDAXPreprocessd",
    "RandXRayVariantd",
    "ReferenceFile",
    "RemapLabelsd",
    "RollingCacheDataset",
    "ScaleIntensityByModalityd",
    "SeededDataset",
    "SimpleITKReader",
    "Source",
    "StratifiedEpochSampler",
    "TestSet",
    "XRayToUint8d",
    "assign_patients",
    "augment_batch",
    "augment_crops",
    "available_memory_bytes",
    "cache_dataset",
    "case_id_from_filename",
    "check_cache_size",
    "check_data",
    "convert_reference_lists",
    "dax_preprocess",
    "deep_check_lists",
    "estimate_cache_bytes",
    "find_dicom_series",
    "format_bytes",
    "inference_entries",
    "kfold_splits",
    "label_fraction_subset",
    "label_problem",
    "list_loaders",
    "load_datalist",
    "load_splits",
    "load_test_set",
    "make_pretrain_datalist",
    "make_xray_datalist",
    "merge_datalists",
    "modality_from_filename",
    "modality_from_series_description",
    "multicrop_working_size",
    "pair_images_and_labels",
    "read_class_names",
    "read_image_header",
    "read_totalsegmentator_classes",
    "read_xray",
    "reduce_to_uint8",
    "remap_labels",
    "sample_seeds",
    "scan_source",
    "seeded_loader",
    "stratified_order",
    "totalsegmentator_to_btcv",
    "transform_fingerprint",
    "validate_datalist",
    "validation_cache_mode",
    "validation_size",
    "write_dicom_series",
    "write_fold_files",
    "write_test_file",
    "xray_preprocessing",
]
