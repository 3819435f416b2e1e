"""The pure distillation step: teacher and student on the same images, feature loss, AdamW update, EMA."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from dgmr_jax.distill.loss import distill_loss, features
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params
from dgmr_jax.train.state import OptimConfig, TrainState, lr_schedule


def make_step(
    student_cfg: ModelConfig,
    teacher_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    opt: OptimConfig,
    cls_coef: float = 1.0,
    feat_coef: float = 1.0,
) -> Callable[[TrainState, Params, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Pure step: teacher and student forward on the same images, loss, grads, AdamW update, EMA."""
    schedule = lr_schedule(opt)

    def step(state: TrainState, teacher_params: Params, images: jax.Array):
        target = jax.lax.stop_gradient(features(teacher_cfg, teacher_params, images.astype(teacher_cfg.dtype)))

        def loss_fn(params):
            return distill_loss(features(student_cfg, params, images), target, cls_coef, feat_coef)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree_util.tree_map(lambda e, p: opt.ema_decay * e + (1 - opt.ema_decay) * p, ema, params)
        update_step = state.step // opt.accum_steps
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "lr": schedule(update_step)}
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return step
