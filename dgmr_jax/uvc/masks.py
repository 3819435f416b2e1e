"""From learned continuous counts to unit masks: which heads, value dims and MLP neurons the search removes.

A count s of a group of n units (heads of a layer, value dims of a head, neurons of a layer) is rounded up,
k = min(ceil(s), n - 1), so at least one unit stays; the k weakest units by current weight norm go:

- head h of layer l: the rows h*d .. h*d + d - 1 of the Flax attn/proj kernel (the head's output projection);
- value dim j of head h: the single proj row h*d + j;
- MLP neuron i: row i of the Flax mlp/fc2 kernel.

Norms are squared L2 norms (the official UVC scores; their proximal map is the 1 / (1 + 2 lr y) shrink of
objective.prox_shrink). Ties go to the lower index (removed first).

Mask variants (value, d/ds):

- ``hard``: 0/1 masks at the rounded count, no gradient;
- ``ste`` (the search's default): the hard value, and the straight-through gradient of the next unit to go,
  d mask[unit of rank k] / ds = -1 (0 at the cap n - 1): a forward difference, the same convention as the
  gradient of objective.least_k_sum and of the FLOPs ratio, so the task loss, the penalty and R see one s;
- ``soft``: mask = clip(rank + 1 - s, 0, 1), no rounding: the linear interpolation between neighbouring
  hard masks (an analysis tool; what it evaluates is not what extraction keeps).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import masked_params
from dgmr_jax.models.tree import Params

MASK_MODES = ("ste", "hard", "soft")


@struct.dataclass
class GroupNorms:
    """Squared L2 norms of the prunable groups: heads (L, H), dims (L, H, d), neurons (L, M)."""

    heads: jax.Array
    dims: jax.Array
    neurons: jax.Array


@struct.dataclass
class Masks:
    """Unit masks of the masked model: heads (L, H), dims (L, H, d), neurons (L, M); 1 keeps, 0 removes."""

    heads: jax.Array
    dims: jax.Array
    neurons: jax.Array


def stacked_kernel(cfg: ModelConfig, params: Params, module: str, name: str) -> jax.Array:
    """(L, ...) stack of blocks' `module/name/kernel` (e.g. "attn", "proj") for scanned or per-layer params."""
    if "blocks" in params:
        return params["blocks"]["block"][module][name]["kernel"]
    return jnp.stack([params[f"blocks_{i}"][module][name]["kernel"] for i in range(cfg.depth)])


@functools.partial(jax.jit, static_argnums=0)
def group_norms(cfg: ModelConfig, params: Params) -> GroupNorms:
    """Squared norms of every head, value dim and neuron (float32, no gradient: they only rank and penalise)."""
    proj = stacked_kernel(cfg, params, "attn", "proj").astype(jnp.float32)  # (L, H*d, D)
    fc2 = stacked_kernel(cfg, params, "mlp", "fc2").astype(jnp.float32)  # (L, M, D)
    dims = jnp.sum(jnp.square(proj), axis=-1).reshape(cfg.depth, cfg.num_heads, cfg.attn_head_dim)
    norms = GroupNorms(heads=jnp.sum(dims, axis=-1), dims=dims, neurons=jnp.sum(jnp.square(fc2), axis=-1))
    return jax.tree_util.tree_map(jax.lax.stop_gradient, norms)


def ste_ceil(x: jax.Array) -> jax.Array:
    """ceil(x) forward, identity gradient (straight-through)."""
    return x + jax.lax.stop_gradient(jnp.ceil(x) - x)


def rounded(counts: jax.Array, n: int) -> jax.Array:
    """Integer count min(ceil(s), n - 1) as a float, with the straight-through gradient of s (>= 1 unit kept)."""
    k = jnp.minimum(jnp.ceil(jax.lax.stop_gradient(counts)), n - 1)
    return k + (counts - jax.lax.stop_gradient(counts))


def ranks(norms: jax.Array) -> jax.Array:
    """Rank of each unit along the last axis, 0 = weakest; ties to the lower index (stable sort)."""
    order = jnp.argsort(norms, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def unit_mask(counts: jax.Array, norms: jax.Array, mode: str = "ste") -> jax.Array:
    """Mask (..., n) removing the counts[...] weakest units of norms (..., n); see the module docstring."""
    if mode not in MASK_MODES:
        raise UserError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    n = norms.shape[-1]
    rank = ranks(norms).astype(counts.dtype)
    s = counts[..., None]
    if mode == "soft":
        return jnp.clip(rank + 1 - s, 0.0, 1.0)
    k = jnp.minimum(jnp.ceil(jax.lax.stop_gradient(s)), n - 1)
    hard = (rank >= k).astype(counts.dtype)
    if mode == "hard":
        return hard
    nxt = ((rank == k) & (k < n - 1)).astype(counts.dtype)
    return hard - (s - jax.lax.stop_gradient(s)) * nxt


def masks_from_counts(heads: jax.Array, dims: jax.Array, neurons: jax.Array, norms: GroupNorms, mode: str) -> Masks:
    """Masks of the counts heads (L,), dims (L, H), neurons (L,) removed, on the current group norms."""
    return Masks(
        heads=unit_mask(heads, norms.heads, mode),
        dims=unit_mask(dims, norms.dims, mode),
        neurons=unit_mask(neurons, norms.neurons, mode),
    )


def apply_masks(cfg: ModelConfig, params: Params, masks: Masks) -> Params:
    """The masked model's params (models.slim.masked_params): proj rows and fc2 rows scaled by the masks."""
    return masked_params(cfg, params, masks.heads, masks.dims, masks.neurons)


def kept_counts(masks: Masks) -> dict[str, Any]:
    """Per-layer kept heads, value width and neurons of (hard) masks, for reports."""
    return {
        "heads": jnp.sum(masks.heads, axis=-1),
        "value_width": jnp.sum(masks.heads * jnp.sum(masks.dims, axis=-1), axis=-1),
        "neurons": jnp.sum(masks.neurons, axis=-1),
    }
