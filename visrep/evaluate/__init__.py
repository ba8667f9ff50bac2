"""Evaluation: cached feature extraction, weighted kNN, offline linear probe, a run's own head, few-shot
episodes and calibration."""
from visrep.evaluate.api import (evaluate_calibration, evaluate_classifier, evaluate_fewshot, evaluate_knn,
                                 evaluate_linear)
from visrep.evaluate.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORM_VERSION,
    default_cache_dir,
    extract_features,
    extract_features_with_info,
    feature_cache_key,
)
from visrep.evaluate.knn import knn_classify, knn_scores
from visrep.evaluate.linear import linear_probe

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TRANSFORM_VERSION", "default_cache_dir", "evaluate_knn", "evaluate_linear",
    "evaluate_classifier", "evaluate_fewshot", "evaluate_calibration",
    "extract_features", "extract_features_with_info", "feature_cache_key", "knn_classify", "knn_scores",
    "linear_probe",
]
