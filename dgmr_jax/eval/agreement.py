"""Teacher agreement: how closely a pruned student's features follow the teacher's on the same images.

Cosine similarity is scale-free, so it stays readable across families whose feature norms differ
by orders of magnitude, unlike the distillation MSE. It is measured on the two tensors the DGMR
loss matches (docs/method.md, Recovery by distillation): the pooled vector and the patch tokens (prefix tokens dropped).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from dgmr_jax.core.errors import UserError


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """Cosine along the last axis, computed in float32; norms are clamped to eps as in torch."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / norms


def feature_agreement(
    student_out: Mapping[str, jnp.ndarray], teacher_out: Mapping[str, jnp.ndarray], num_prefix_tokens: int
) -> dict[str, jnp.ndarray]:
    """Mean cosine between student and teacher outputs of `models.forward` on one batch.

    "pooled_cos": over images of cos(student pooled, teacher pooled); "tokens_cos": over images and
    patch tokens (tokens[:, num_prefix_tokens:]) of the per-token cosine. Scalars as jnp arrays, so
    this can run inside a jitted eval step; average batch values weighted by batch size.
    """
    for name, out in (("student", student_out), ("teacher", teacher_out)):
        if "pooled" not in out or "tokens" not in out:
            raise UserError(f"{name} output needs 'pooled' and 'tokens' (from models.forward), got {sorted(out)}")
    s_tokens, t_tokens = student_out["tokens"], teacher_out["tokens"]
    if s_tokens.shape != t_tokens.shape or student_out["pooled"].shape != teacher_out["pooled"].shape:
        raise UserError(
            f"student and teacher shapes differ: tokens {s_tokens.shape} vs {t_tokens.shape}, pooled "
            f"{student_out['pooled'].shape} vs {teacher_out['pooled'].shape}"
        )
    if not 0 <= num_prefix_tokens < s_tokens.shape[1]:
        raise UserError(f"num_prefix_tokens must be in [0, {s_tokens.shape[1]}), got {num_prefix_tokens}")
    return {
        "pooled_cos": cosine_similarity(student_out["pooled"], teacher_out["pooled"]).mean(),
        "tokens_cos": cosine_similarity(s_tokens[:, num_prefix_tokens:], t_tokens[:, num_prefix_tokens:]).mean(),
    }
