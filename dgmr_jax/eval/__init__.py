"""Evaluation on frozen features: DINOv2 kNN, linear probe, teacher agreement, feature extraction."""

from dgmr_jax.eval.agreement import cosine_similarity, feature_agreement
from dgmr_jax.eval.features import EvalBatches, extract_features
from dgmr_jax.eval.knn import DINOV2_KS, DINOV2_TEMPERATURE, knn_accuracy, knn_metrics, knn_predict
from dgmr_jax.eval.linear_probe import LogReg, fit_logreg, linear_probe, standardize

__all__ = [
    "DINOV2_KS",
    "DINOV2_TEMPERATURE",
    "EvalBatches",
    "LogReg",
    "cosine_similarity",
    "extract_features",
    "feature_agreement",
    "fit_logreg",
    "knn_accuracy",
    "knn_metrics",
    "knn_predict",
    "linear_probe",
    "standardize",
]
