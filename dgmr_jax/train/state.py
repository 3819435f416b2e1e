"""Train state and optimizer of every task: AdamW with the DGMR schedules, the state and its shardings, and
the jit with explicit shardings and a donated state."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from dgmr_jax.core.parallel import batch_sharding, replicated, tree_shardings
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params
from dgmr_jax.models.vit import logical_axes, param_shapes


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with the DGMR schedules (docs/method.md, Recovery by distillation); all schedules are per step."""

    base_lr: float = 6e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    global_batch: int = 256
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    wd_start: float = 0.04
    wd_end: float = 0.2
    clip_norm: float = 0.0  # 0: no clipping
    accum_steps: int = 1  # gradient accumulation: one optimizer update every accum_steps micro-batches
    ema_decay: float = 0.0  # 0: no EMA of the student

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.global_batch / 256


def lr_schedule(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to base_lr * batch / 256, then cosine to min_lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.peak_lr, max(opt.warmup_steps, 0), max(opt.total_steps, opt.warmup_steps + 1), opt.min_lr
    )


def wd_schedule(opt: OptimConfig) -> optax.Schedule:
    """Cosine from wd_start up to wd_end over total_steps."""

    def schedule(step):
        t = jnp.clip(step / max(opt.total_steps, 1), 0.0, 1.0)
        return opt.wd_end + 0.5 * (opt.wd_start - opt.wd_end) * (1 + jnp.cos(jnp.pi * t))

    return schedule


def make_optimizer(opt: OptimConfig, decay_mask: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """AdamW (decoupled decay on all params, or on those `decay_mask(params)` marks True) with scheduled lr and
    wd, optional clip and accumulation."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr_schedule(opt),
        weight_decay=wd_schedule(opt),
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        mask=decay_mask,
    )
    tx = _clipped(adamw, opt.clip_norm) if opt.clip_norm > 0 else adamw
    return optax.MultiSteps(tx, every_k_schedule=opt.accum_steps) if opt.accum_steps > 1 else tx


def _clipped(tx: optax.GradientTransformation, max_norm: float) -> optax.GradientTransformation:
    """`tx` on gradients clipped to global norm `max_norm`, with tx's own state: turning optim.clip_norm on or off
    keeps a run's checkpoints resumable (a chain would add a state of its own)."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        return tx.update(clip.update(updates, clip.init(updates))[0], state, params)

    return optax.GradientTransformation(tx.init, update)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: Any
    ema: Params | None


def init_state(params: Params, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
    """Fresh state owning its buffers (it is donated each step, so it must not alias the teacher's)."""
    own = lambda tree: jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), tree)  # noqa: E731
    params = own(params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), own(params) if ema else None)


def state_shardings(student_cfg: ModelConfig, state_shapes: Any, mesh: Mesh) -> Any:
    """Shardings of a train state (TrainState, or a UVC SearchState) of a student: see `shardings_like_params`."""
    return shardings_like_params(
        logical_axes(student_cfg), param_shapes(student_cfg), state_shapes, mesh, "student params"
    )


def shardings_like_params(logical: Any, shapes: Any, state_shapes: Any, mesh: Mesh, what: str = "params") -> Any:
    """Shardings of a train state over params with these logical axes and shapes (any model: a ViT, a text
    tower): every leaf whose dict path ends like a param's path and has its shape (the params, EMA, optimizer
    moments) is sharded like that param; everything else (step, scalars, search counts and duals) is replicated."""
    param_sh = tree_shardings(logical, shapes, mesh, what)
    by_path = {
        _dict_keys(path): (sh, tuple(leaf.shape))
        for (path, sh), leaf in zip(
            jax.tree_util.tree_leaves_with_path(param_sh), jax.tree_util.tree_leaves(shapes), strict=True
        )
    }

    def leaf_sharding(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            match = by_path.get(keys[i:])
            if match and match[1] == tuple(np.shape(leaf)):
                return match[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, state_shapes)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def jit_step(step: Callable, mesh: Mesh, state_sh: TrainState, teacher_sh: Params) -> Callable:
    """jax.jit with explicit in/out shardings; the state is donated (updated in place). Traced under the mesh, so
    the model keeps its activations split over the batch (models.vit._batch_sharded)."""
    metrics_sh = replicated(mesh)

    @functools.wraps(step)
    def in_mesh(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    return jax.jit(
        in_mesh,
        in_shardings=(state_sh, teacher_sh, batch_sharding(mesh)),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0,),
    )
