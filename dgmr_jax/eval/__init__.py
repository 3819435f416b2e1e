"""Evaluation on frozen features: DINOv2 kNN, linear probe, teacher agreement, feature extraction, CLIP
zero-shot classification and retrieval, and one evaluator per kind (eval/evaluators.py)."""

from dgmr_jax.data.eval_batches import EvalBatches
from dgmr_jax.eval.agreement import cosine_similarity, feature_agreement
from dgmr_jax.eval.evaluators import (
    Context,
    EvalSpec,
    KnnEval,
    LinearProbeEval,
    RetrievalEval,
    TextTower,
    ZeroShotEval,
    make_evaluator,
)
from dgmr_jax.eval.features import extract_features
from dgmr_jax.eval.knn import DINOV2_KS, DINOV2_TEMPERATURE, knn_accuracy, knn_metrics, knn_predict
from dgmr_jax.eval.linear_probe import LogReg, fit_logreg, linear_probe, standardize
from dgmr_jax.eval.zeroshot import (
    RETRIEVAL_KS,
    ZEROSHOT_KS,
    encode_texts,
    image_text_scores,
    retrieval_recall,
    zeroshot_accuracy,
    zeroshot_classifier,
)

__all__ = [
    "DINOV2_KS",
    "DINOV2_TEMPERATURE",
    "RETRIEVAL_KS",
    "ZEROSHOT_KS",
    "Context",
    "EvalBatches",
    "EvalSpec",
    "KnnEval",
    "LinearProbeEval",
    "LogReg",
    "RetrievalEval",
    "TextTower",
    "ZeroShotEval",
    "cosine_similarity",
    "encode_texts",
    "extract_features",
    "feature_agreement",
    "image_text_scores",
    "fit_logreg",
    "knn_accuracy",
    "knn_metrics",
    "knn_predict",
    "linear_probe",
    "make_evaluator",
    "retrieval_recall",
    "standardize",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
