"""CLIP / SigLIP zero-shot classification and image-text retrieval on frozen embeddings (open_clip's protocols).

Text is encoded sharded like image features (params by logical axes, batches over the data axes). Metrics run
on the host on L2-normalized embeddings, ranked by cosine: CLIP's softmax over exp(logit_scale) * cosine and
SigLIP's sigmoid(exp(logit_scale) * cosine + logit_bias) both rise with the cosine, so they rank alike. A query
counts as a hit at k when fewer than k candidates score strictly higher than its best positive, which equals
torch.topk's verdict except on exact score ties.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import batch_sharding, data_parallel_size, make_mesh, tree_shardings
from dgmr_jax.eval.knn import l2_normalize
from dgmr_jax.models.text import TextConfig, encode_text, text_logical_axes, text_param_shapes

Template = str | Callable[[str], str]
ZEROSHOT_KS, RETRIEVAL_KS = (1, 5), (1, 5, 10)  # the ks reported (those up to the class / image count)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode(params: Any, tokens: jnp.ndarray, *, cfg: TextConfig) -> jnp.ndarray:
    return encode_text(cfg, params, tokens).astype(jnp.float32)


def encode_texts(
    cfg: TextConfig,
    params: Any,
    tokens: np.ndarray,
    *,
    batch: int = 256,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Unnormalized float32 text embeddings (num, embed_dim) of token rows (num, n), on the host.

    Sharded like `extract_features`: params by their logical axes, each batch over the mesh's data axes
    (default mesh: every local device on the data axis); rows are padded to whole batches (one compilation).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise UserError(f"tokens must be a non-empty (num, length) array, got shape {tokens.shape}")
    mesh = mesh or make_mesh()
    dp = data_parallel_size(mesh)
    size = -(-min(batch, len(tokens)) // dp) * dp
    params = jax.device_put(params, tree_shardings(text_logical_axes(cfg), text_param_shapes(cfg), mesh, "text params"))
    padded = np.pad(tokens, ((0, -len(tokens) % size), (0, 0)))
    chunks = np.split(padded, len(padded) // size)
    out = [
        np.asarray(_encode(params, jax.device_put(chunk, batch_sharding(mesh)), cfg=cfg))
        for chunk in tqdm(chunks, desc="text embeddings", unit="batch", disable=not progress)
    ]
    return np.concatenate(out)[: len(tokens)]


def zeroshot_classifier(
    text_cfg: TextConfig,
    text_params: Any,
    classnames: Sequence[str],
    templates: Sequence[Template],
    tokenizer: Callable[..., Any],
    *,
    batch: int = 256,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(embed_dim, num_classes) zero-shot weights, as open_clip's build_zero_shot_classifier: per class the
    mean of its L2-normalized template embeddings, renormalized. Templates are format strings ("a photo of
    a {}.") or callables of the class name; tokenizer maps a list of texts and a context_length to token ids
    (ours or open_clip's)."""
    if not classnames or not templates:
        raise UserError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
    texts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
    tokens = np.asarray(tokenizer(texts, context_length=text_cfg.context_length))
    emb = l2_normalize(encode_texts(text_cfg, text_params, tokens, batch=batch, mesh=mesh, progress=progress))
    return np.asarray(l2_normalize(emb.reshape(len(classnames), len(templates), -1).mean(axis=1))).T


def image_text_scores(
    text_cfg: TextConfig, text_params: Any, image_emb: np.ndarray, text_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities), each (images, texts), as the model scores pairs: logits exp(logit_scale) * cosine
    (+ logit_bias with sigmoid scoring: transformers' logits_per_image); probabilities a softmax over the texts
    (CLIP) or an independent sigmoid per pair (SigLIP, whose probabilities need not sum to 1)."""
    cosine = np.asarray(l2_normalize(image_emb), np.float32) @ np.asarray(l2_normalize(text_emb), np.float32).T
    logits = np.exp(np.float32(text_params["logit_scale"])) * cosine
    if text_cfg.scoring == "sigmoid":
        logits = logits + np.float32(text_params["logit_bias"])
        return logits, np.asarray(jax.nn.sigmoid(logits))
    return logits, np.asarray(jax.nn.softmax(logits, axis=-1))


def _ranks(queries: np.ndarray, candidates: np.ndarray, pairs: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per query, how many candidates score (cosine) strictly above its best positive; `pairs` (m, 2) lists
    (query, candidate) positives. A query without positives gets rank len(candidates) (never a hit)."""
    queries, candidates = np.asarray(l2_normalize(queries)), np.asarray(l2_normalize(candidates))
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ candidates.T
        best = np.full(len(scores), -np.inf, np.float32)
        own = pairs[(pairs[:, 0] >= start) & (pairs[:, 0] < start + chunk)]
        np.maximum.at(best, own[:, 0] - start, scores[own[:, 0] - start, own[:, 1]])
        ranks[start : start + chunk] = (scores > best[:, None]).sum(axis=1)
    return ranks


def _check_ks(ks: Sequence[int], candidates: int, what: str) -> None:
    if not ks or min(ks) < 1 or max(ks) > candidates:
        raise UserError(f"ks must lie in [1, {candidates}] (the number of {what}), got {tuple(ks)}")


def zeroshot_accuracy(
    image_embeddings: np.ndarray, labels: np.ndarray, classifier: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """{k: top-k accuracy} of images (num, embed_dim) against zero-shot weights (embed_dim, num_classes)."""
    labels = np.asarray(labels)
    image_embeddings, classifier = np.asarray(image_embeddings), np.asarray(classifier)
    if image_embeddings.ndim != 2 or image_embeddings.shape[1] != classifier.shape[0]:
        raise UserError(f"image embeddings {image_embeddings.shape} do not fit classifier {classifier.shape}")
    if labels.shape != (len(image_embeddings),) or labels.min() < 0 or labels.max() >= classifier.shape[1]:
        raise UserError(f"labels must be ({len(image_embeddings)},) ints in [0, {classifier.shape[1]})")
    _check_ks(ks, classifier.shape[1], "classes")
    ranks = _ranks(image_embeddings, classifier.T, np.stack([np.arange(len(labels)), labels], axis=1))
    return {int(k): float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[int, float]]:
    """Recall@k both ways with several captions per image: text_to_image[j] is the image of caption j.

    "image_to_text": an image is a hit when any of its captions is among its k best texts;
    "text_to_image": a caption is a hit when its image is among its k best images.
    """
    text_to_image = np.asarray(text_to_image)
    if text_to_image.shape != (len(text_emb),):
        raise UserError(f"text_to_image needs one image index per caption ({len(text_emb)}), got {text_to_image.shape}")
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= len(image_emb)):
        raise UserError(f"text_to_image indices must lie in [0, {len(image_emb)})")
    without = np.setdiff1d(np.arange(len(image_emb)), text_to_image)
    if len(without):
        raise UserError(f"{len(without)} images have no caption (e.g. image {without[0]}); give each one at least one")
    _check_ks(ks, min(len(image_emb), len(text_emb)), "images and captions")
    captions = np.arange(len(text_to_image))
    i2t = _ranks(image_emb, text_emb, np.stack([text_to_image, captions], axis=1))
    t2i = _ranks(text_emb, image_emb, np.stack([captions, text_to_image], axis=1))
    return {
        "image_to_text": {int(k): float(np.mean(i2t < k)) for k in ks},
        "text_to_image": {int(k): float(np.mean(t2i < k)) for k in ks},
    }
