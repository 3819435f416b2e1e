"""DGMR feature-distillation loss: cls_coef * MSE(pooled) + feat_coef * MSE(patch tokens), mean reduction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.vit import VisionTransformer

TAPS = ("output", "raw")


def tap_config(cfg: ModelConfig, tap: str) -> ModelConfig:
    """The config whose forward yields the distilled tensors (docs/method.md, Recovery by distillation).

    "output": the model's own pooled vector and final-norm tokens (OpenCLIP: after ln_post and proj;
    DINOv2: class and patch tokens after the final norm; SigLIP: the attention pool's output and every token).
    "raw": final norm, pooling norm and head removed on both sides, i.e. the raw class token and patch tokens of the
    last block (EVA-CLIP); a model without a class token (SigLIP) has no raw tap.
    """
    if tap not in TAPS:
        raise UserError(f"unknown distillation tap {tap!r}; choose one of {TAPS}")
    if tap == "raw":
        if not cfg.class_token:
            raise UserError(
                f"tap 'raw' distils the raw class token, and model {cfg.name} has none (global_pool="
                f"{cfg.global_pool!r}); use tap 'output' (its pooled vector and final-norm tokens)"
            )
        return cfg.replace(final_norm=False, fc_norm=False, num_classes=0, proj_dim=0, global_pool="token")
    return cfg


def check_pair(student: ModelConfig, teacher: ModelConfig, tap: str, names: tuple[str, str]) -> None:
    """Refuse a student and teacher whose distilled tensors (tap configs) differ in shape, before anything is
    written: the loss compares them element by element and has no projection between them. `names` says
    which (student, teacher) models these are, for the message."""
    s, t = tap_config(student, tap), tap_config(teacher, tap)
    diffs = [
        f"{what} {of_teacher} vs {of_student}"
        for what, of_teacher, of_student in (
            ("patch size", t.patch_size, s.patch_size),  # another patch grid: another number of patch tokens
            ("token width", t.width, s.width),
            ("pooled width", t.proj_dim or t.width, s.proj_dim or s.width),
        )
        if of_teacher != of_student
    ]
    if diffs:
        raise UserError(
            f"teacher {teacher.name} ({names[1]}) and student {student.name} ({names[0]}) do not fit one "
            f"distillation loss (tap {tap!r}): {', '.join(diffs)}; the loss compares their tokens as they are, so "
            "distil a student pruned from this teacher (`dgmr-jax prune --model TEACHER`, or leave "
            "config.student.model_dir empty to prune at start) or a teacher of the student's patch size and widths"
        )


def features(cfg: ModelConfig, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pooled (B, E), patch tokens (B, N, D)) of cfg, a tap_config; unused params (head, norm) are ignored."""
    out = VisionTransformer(cfg).apply({"params": params}, images)
    return out["pooled"], out["tokens"][:, cfg.num_prefix_tokens :]


def distill_loss(
    student: tuple[jax.Array, jax.Array], teacher: tuple[jax.Array, jax.Array], cls_coef: float, feat_coef: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss (float32) and its two terms."""
    mse = lambda a, b: jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))  # noqa: E731
    cls, feat = mse(student[0], teacher[0]), mse(student[1], teacher[1])
    return cls_coef * cls + feat_coef * feat, {"loss_cls": cls, "loss_feat": feat}
