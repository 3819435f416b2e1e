"""DINOv2's weighted k-nearest-neighbour classifier on frozen features (docs/method.md, Evaluation).

Train and test features are L2-normalized, so the similarity is the cosine. Each test point takes
its k most similar train points; a neighbour with similarity s votes for its class with weight
exp(s / T) (T = 0.07), and the class with the largest summed weight is the prediction. DINOv2
reports top-1 (and top-5) accuracy for k in (10, 20, 100, 200).

Test points are processed `chunk` at a time in one jitted function (the last chunk is padded, so
it compiles once): device memory is about 4 * chunk * num_train bytes for the similarities on top
of the train features themselves. Ties (equal similarities, equal class scores) go to the lower
index, as in `jax.lax.top_k`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError

DINOV2_KS = (10, 20, 100, 200)
DINOV2_TEMPERATURE = 0.07


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to unit length in float32 (F.normalize(x, dim=-1)); zero rows stay zero."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes", "topn"))
def _ranked_chunk(
    train: jnp.ndarray,
    train_labels: jnp.ndarray,
    test: jnp.ndarray,
    temperature: jnp.ndarray,
    *,
    ks: tuple[int, ...],
    num_classes: int,
    topn: int,
) -> jnp.ndarray:
    """(len(ks), chunk, topn) class indices of one test chunk, best first, for each k."""
    sims = jnp.dot(test, train.T, precision=jax.lax.Precision.HIGHEST)
    top_sims, top_idx = jax.lax.top_k(sims, max(ks))
    top_labels = train_labels[top_idx]
    weights = jnp.exp(top_sims / temperature)

    def class_scores(labels: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros(num_classes, jnp.float32).at[labels].add(w)

    ranked = []
    for k in ks:  # neighbours are sorted by similarity, so the k nearest are the first k columns
        scores = jax.vmap(class_scores)(top_labels[:, :k], weights[:, :k])
        ranked.append(jax.lax.top_k(scores, topn)[1])
    return jnp.stack(ranked)


def _ranked_classes(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk: int,
    topn: int,
) -> dict[int, np.ndarray]:
    """{k: (num_test, topn) int array} of class indices ordered by kNN score, for each requested k."""
    train_labels = np.asarray(train_labels)
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise UserError(f"features must be (num, dim) with equal dims, got {train_feats.shape} and {test_feats.shape}")
    if train_labels.shape != (len(train_feats),):
        raise UserError(f"train_labels must have shape ({len(train_feats)},), got {train_labels.shape}")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise UserError("need at least one train and one test feature")
    if not ks or min(ks) <= 0 or chunk <= 0 or temperature <= 0:
        raise UserError(f"ks, chunk and temperature must be positive, got ks={ks}, chunk={chunk}, T={temperature}")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise UserError(f"train labels must lie in [0, num_classes={num_classes})")
    clipped = tuple(sorted({min(int(k), len(train_feats)) for k in ks}))
    train = l2_normalize(jnp.asarray(train_feats))
    labels = jnp.asarray(train_labels, jnp.int32)
    chunk = min(chunk, len(test_feats))
    outs = []
    for start in range(0, len(test_feats), chunk):
        block = np.asarray(test_feats[start : start + chunk])
        n = len(block)
        block = np.pad(block, ((0, chunk - n), (0, 0)))  # zero rows: harmless, dropped below
        ranked = _ranked_chunk(
            train,
            labels,
            l2_normalize(jnp.asarray(block)),
            jnp.float32(temperature),
            ks=clipped,
            num_classes=num_classes,
            topn=min(topn, num_classes),
        )
        outs.append(np.asarray(ranked)[:, :n])
    ranked = np.concatenate(outs, axis=1)
    return {int(k): ranked[clipped.index(min(int(k), len(train_feats)))] for k in ks}


def _num_classes(num_classes: int | None, *labels: np.ndarray) -> int:
    return int(num_classes) if num_classes is not None else int(max(np.max(lab) for lab in labels)) + 1


def knn_predict(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    ks: Sequence[int] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, np.ndarray]:
    """{k: (num_test,) predicted class} of the weighted kNN classifier; k is clipped to the train size."""
    num_classes = _num_classes(num_classes, train_labels)
    ranked = _ranked_classes(train_feats, train_labels, test_feats, ks, temperature, num_classes, chunk, topn=1)
    return {k: r[:, 0] for k, r in ranked.items()}


def knn_accuracy(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    ks: Sequence[int] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, float]:
    """{k: top-1 accuracy} of the weighted kNN classifier (DINOv2's protocol with the defaults)."""
    metrics = knn_metrics(train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes, chunk)
    return {k: m["top1"] for k, m in metrics.items()}


def knn_metrics(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    ks: Sequence[int] = DINOV2_KS,
    temperature: float = DINOV2_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, dict[str, float]]:
    """{k: {"top1": acc, "top5": acc}} in one pass; "top5" only when there are at least 5 classes."""
    test_labels = np.asarray(test_labels)
    if test_labels.shape != (len(test_feats),):
        raise UserError(f"test_labels must have shape ({len(test_feats)},), got {test_labels.shape}")
    num_classes = _num_classes(num_classes, train_labels, test_labels)
    ranked = _ranked_classes(train_feats, train_labels, test_feats, ks, temperature, num_classes, chunk, topn=5)
    metrics = {}
    for k, r in ranked.items():
        hits = r == test_labels[:, None]
        metrics[k] = {"top1": float(hits[:, 0].mean())}
        if num_classes >= 5:
            metrics[k]["top5"] = float(hits.any(axis=1).mean())
    return metrics
