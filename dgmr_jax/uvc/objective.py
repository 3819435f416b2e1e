"""The terms of the UVC Lagrangian and the updates of its duals, gates and pruned groups.

    L = distill(masked, gated student) + sum_l y_heads[l] * least_k(heads of l) + sum_l y_neurons[l] * least_k(...)
        + sum_{l,h} p_dims[l, h] * least_k(dims of head h) + z * (R(s, r, pi) - budget)

minimised over the weights, counts and gate logits, maximised over the duals (>= 0) by projected ascent. least_k
is the sum of the k = ceil(s) smallest squared group norms; it reaches the weights only through the proximal
shrink (prox_shrink), as in the official code, and the counts through its forward-difference gradient.

Deliberate differences from the official code (VITA-Group/UVC, uvc_optimizer.py / uvc_utils.py):
- z * (R - budget) is not clipped: the official clamp of R - budget to +-z_grad_clip zeroes dR/ds whenever
  |R - budget| > 0.5, so budgets far below 1 never move the counts;
- the z step follows its schedule (z_lr_at): the official PresetLRScheduler looks for a "zlr" key the param group
  never has, so z keeps its first rate;
- R is differentiated through the same masks and gate sample the forward used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import masked_params
from dgmr_jax.models.tree import Params
from dgmr_jax.uvc.masks import GroupNorms, group_norms, unit_mask
from dgmr_jax.uvc.state import Counts, Duals


def least_k_sum(counts: jax.Array, norms: jax.Array) -> jax.Array:
    """Sum of the k = min(ceil(s), n - 1) smallest norms along the last axis, for counts s (...,).

    Gradient in s: the (k+1)-th smallest norm, what removing one more unit would add (the official LeastSsum).
    The norms carry no gradient.
    """
    n = norms.shape[-1]
    v = jnp.sort(jax.lax.stop_gradient(norms), axis=-1)
    csum = jnp.concatenate([jnp.zeros_like(v[..., :1]), jnp.cumsum(v, axis=-1)], axis=-1)
    s = counts.astype(v.dtype)
    k = jnp.minimum(jnp.ceil(jax.lax.stop_gradient(s)), n - 1).astype(jnp.int32)[..., None]
    value = jnp.take_along_axis(csum, k, axis=-1)[..., 0]
    slope = jnp.take_along_axis(v, k, axis=-1)[..., 0]
    return value + (s - jax.lax.stop_gradient(s)) * slope


def sparsity_terms(counts: Counts, norms: GroupNorms) -> Counts:
    """least_k_sum of every group: heads (L,), dims (L, H), neurons (L,) (a Counts-shaped pytree of values)."""
    return Counts(
        heads=least_k_sum(counts.heads, norms.heads),
        dims=least_k_sum(counts.dims, norms.dims),
        neurons=least_k_sum(counts.neurons, norms.neurons),
    )


def sparsity_penalty(terms: Counts, duals: Duals) -> jax.Array:
    """Dual-weighted sum of the least-k terms (the duals are constants here)."""
    d = jax.lax.stop_gradient(duals)
    return jnp.sum(d.y_heads * terms.heads) + jnp.sum(d.p_dims * terms.dims) + jnp.sum(d.y_neurons * terms.neurons)


def constraint_term(ratio: jax.Array, budget: float, z: jax.Array) -> jax.Array:
    """z * (R - budget), no clipping: its gradient in R is z at every distance from the budget."""
    return jax.lax.stop_gradient(z) * (ratio - budget)


def gumbel_gates(logits: jax.Array, gumbel: jax.Array, tau: float) -> jax.Array:
    """Keep weight pi of each block: softmax((logits + gumbel) / tau)[..., 1] for logits (L, 2) = (skip, keep)
    and standard Gumbel noise of the same shape (a Gumbel-softmax sample, relaxed, not hard)."""
    return jax.nn.softmax((logits + gumbel) / tau, axis=-1)[..., 1]


def hard_gates(logits: jax.Array) -> jax.Array:
    """Deterministic gates for evaluation and extraction: 1 where keep > skip, else 0 (ties skip nothing)."""
    return (logits[..., 1] >= logits[..., 0]).astype(jnp.float32)


def keep_probability(logits: jax.Array) -> jax.Array:
    """P(keep) = softmax(logits)[..., 1]: the probability that a Gumbel sample's argmax keeps the block."""
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def z_lr_at(schedule: tuple[tuple[int, float], ...], search_step: jax.Array) -> jax.Array:
    """Piecewise-constant step size of z: the lr of the last (start, lr) piece with start <= search_step."""
    starts = jnp.asarray([s for s, _ in schedule], jnp.int32)
    values = jnp.asarray([v for _, v in schedule], jnp.float32)
    return values[jnp.searchsorted(starts, jnp.asarray(search_step, jnp.int32), side="right") - 1]


def project_duals(duals: Duals) -> Duals:
    """Projection onto the feasible dual set: every dual clipped at 0 from below."""
    return jax.tree_util.tree_map(lambda x: jnp.maximum(x, 0), duals)


def ascend_duals(
    duals: Duals,
    terms: Counts,
    ratio: jax.Array,
    budget: float,
    y_lr: float,
    p_lr: float,
    z_lr: jax.Array,
    multiplicative: bool = False,
) -> Duals:
    """One projected gradient-ascent step: dL/dy = least-k sums, dL/dp likewise, dL/dz = R - budget; z's step is
    additive, or multiplicative (exponentiated gradient: z * exp(z_lr * (R - budget)), positive, scale-free)."""
    t = jax.lax.stop_gradient(terms)
    gap = jax.lax.stop_gradient(ratio) - budget
    new = Duals(
        y_heads=duals.y_heads + y_lr * t.heads,
        y_neurons=duals.y_neurons + y_lr * t.neurons,
        p_dims=duals.p_dims + p_lr * t.dims,
        z=duals.z * jnp.exp(z_lr * gap) if multiplicative else duals.z + z_lr * gap,
    )
    return project_duals(new)


def prox_shrink(cfg: ModelConfig, params: Params, counts: Counts, duals: Duals, lr: jax.Array) -> Params:
    """Proximal step of lr * y * ||w||^2 on the groups about to be removed: w <- w / (1 + 2 lr y).

    The groups are the k weakest by the current (post-update) norms, k the rounded counts; a value dim of a removed
    head is shrunk by both its p and its head's y (the official prox_w). Rows of proj and fc2 only.
    """
    norms = group_norms(cfg, params)
    gone = lambda c, nrm: 1.0 - unit_mask(c, nrm, "hard")  # noqa: E731
    factor = lambda dual: 1.0 / (1.0 + 2.0 * lr * dual)  # noqa: E731
    heads = 1.0 - gone(counts.heads, norms.heads) * (1.0 - factor(duals.y_heads)[:, None])
    dims = 1.0 - gone(counts.dims, norms.dims) * (1.0 - factor(duals.p_dims)[..., None])
    neurons = 1.0 - gone(counts.neurons, norms.neurons) * (1.0 - factor(duals.y_neurons)[:, None])
    return masked_params(cfg, params, heads, dims, neurons)
