"""Evaluation of frozen or fine-tuned backbones: features, k-NN, linear probes, retrieval, metrics and reports;
the segmentation probe, whole-volume segmentation evaluation and inference."""

from dae.evaluation.features import (
    EXTRACTORS,
    INPUT_OPTIONS,
    AdaptedExtractor,
    DAE3DExtractor,
    DinoBackboneExtractor,
    FeatureExtractor,
    HFDinov2Extractor,
    build_extractor,
    extract_features,
)
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.finetune import FinetuneResult, ProbeFeatures, run_finetune
from dae.evaluation.inference import run_inference
from dae.evaluation.knn import KnnMonitor, knn_evaluate, knn_predict, run_knn
from dae.evaluation.linear_probe import (
    LinearProbeConfig,
    ProbeResult,
    ProbeSetting,
    fit_probe_and_test,
    run_linear_probe,
    select_probe_setting,
)
from dae.evaluation.metrics import (
    MetricEstimate,
    RocCurve,
    accuracy,
    auroc,
    bootstrap_ci,
    bootstrap_estimate,
    bootstrap_samples,
    classification_estimates,
    metric_value,
    resolve_metric,
    roc_curves,
)
from dae.evaluation.neighbours import cosine_topk
from dae.evaluation.report import (
    estimate_rows,
    flatten_row,
    format_table,
    retrieval_figure,
    roc_figure,
    save_figure,
    save_retrieval_figure,
    write_results,
)
from dae.evaluation.retrieval import precision_at_k, retrieve, run_retrieval
from dae.evaluation.runner import PROTOCOLS, BackboneContext, evaluate_backbones
from dae.evaluation.seg_metrics import dice_iou, dice_iou_per_case, mean_per_class, overlap_counts
from dae.evaluation.seg_probe import SegProbeResult, first_samples, run_seg_probe, seg_probe_picture
from dae.evaluation.volumes import (
    SegmentationEvaluator,
    evaluate_segmentation,
    run_evaluation,
    summarise_cases,
    write_tables,
)

__all__ = [
    "EXTRACTORS",
    "INPUT_OPTIONS",
    "PROTOCOLS",
    "AdaptedExtractor",
    "BackboneContext",
    "DAE3DExtractor",
    "DinoBackboneExtractor",
    "FeatureExtractor",
    "FeatureSet",
    "FinetuneResult",
    "HFDinov2Extractor",
    "KnnMonitor",
    "LinearProbeConfig",
    "MetricEstimate",
    "ProbeFeatures",
    "ProbeResult",
    "ProbeSetting",
    "RocCurve",
    "SegProbeResult",
    "SegmentationEvaluator",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "bootstrap_estimate",
    "bootstrap_samples",
    "build_extractor",
    "classification_estimates",
    "cosine_topk",
    "dice_iou",
    "dice_iou_per_case",
    "estimate_rows",
    "evaluate_backbones",
    "evaluate_segmentation",
    "extract_features",
    "first_samples",
    "fit_probe_and_test",
    "flatten_row",
    "format_table",
    "knn_evaluate",
    "knn_predict",
    "mean_per_class",
    "metric_value",
    "overlap_counts",
    "precision_at_k",
    "resolve_metric",
    "retrieval_figure",
    "retrieve",
    "roc_curves",
    "roc_figure",
    "run_evaluation",
    "run_finetune",
    "run_inference",
    "run_knn",
    "run_linear_probe",
    "run_retrieval",
    "run_seg_probe",
    "save_figure",
    "save_retrieval_figure",
    "seg_probe_picture",
    "select_probe_setting",
    "summarise_cases",
    "write_results",
    "write_tables",
]
