"""Evaluation on frozen features: DINOv2 kNN, linear probe, teacher agreement, feature extraction, CLIP
zero-shot classification and retrieval."""

from dgmr_jax.eval.agreement import cosine_similarity, feature_agreement
from dgmr_jax.eval.features import EvalBatches, extract_features
from dgmr_jax.eval.knn import DINOV2_KS, DINOV2_TEMPERATURE, knn_accuracy, knn_metrics, knn_predict
from dgmr_jax.eval.linear_probe import LogReg, fit_logreg, linear_probe, standardize
from dgmr_jax.eval.zeroshot import encode_texts, retrieval_recall, zeroshot_accuracy, zeroshot_classifier

__all__ = [
    "DINOV2_KS",
    "DINOV2_TEMPERATURE",
    "EvalBatches",
    "LogReg",
    "cosine_similarity",
    "encode_texts",
    "extract_features",
    "feature_agreement",
    "fit_logreg",
    "knn_accuracy",
    "knn_metrics",
    "knn_predict",
    "linear_probe",
    "retrieval_recall",
    "standardize",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
