"""The UVC search state as one pytree (Orbax checkpoints it whole, jit donates it whole).

Layout, for a tower of L layers, H heads of width d and MLP width M:

    SearchState
      step         int32 ()          optimizer steps taken (warm-up included)
      params       Params            the student's weights (full shapes; masks are applied in the forward only)
      vars         SearchVars
        counts     Counts            continuous counts of units REMOVED, float32
          heads    (L,)              s1: heads of each layer
          dims     (L, H)            r: value dims of each head
          neurons  (L,)              s3: MLP neurons of each layer
        gate_logits (L, 2)           block skip gate logits (skip, keep)
      duals        Duals             all >= 0, float32
        y_heads    (L,)              weight of "sum of the k smallest head norms" of each layer
        y_neurons  (L,)              same for neurons
        p_dims     (L, H)            same for the value dims of each head
        z          ()                weight of the FLOPs constraint R - budget
      opt_weights, opt_counts, opt_gates   optax states (AdamW; Adam/SGD; SGD/Adam)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params
from dgmr_jax.uvc.config import SearchConfig


@struct.dataclass
class Counts:
    """Continuous counts of removed units: heads (L,), dims (L, H), neurons (L,)."""

    heads: jax.Array
    dims: jax.Array
    neurons: jax.Array


@struct.dataclass
class SearchVars:
    """What the search learns besides the weights: the counts and the block gate logits (L, 2) = (skip, keep)."""

    counts: Counts
    gate_logits: jax.Array


@struct.dataclass
class Duals:
    """Dual variables (projected to >= 0): y_heads (L,), y_neurons (L,), p_dims (L, H), z ()."""

    y_heads: jax.Array
    y_neurons: jax.Array
    p_dims: jax.Array
    z: jax.Array


@struct.dataclass
class SearchState:
    step: jax.Array
    params: Params
    vars: SearchVars
    duals: Duals
    opt_weights: Any
    opt_counts: Any
    opt_gates: Any


def group_sizes(cfg: ModelConfig) -> Counts:
    """Units per group, as Counts of Python ints: H heads, d value dims per head, M neurons."""
    return Counts(heads=cfg.num_heads, dims=cfg.attn_head_dim, neurons=cfg.mlp_hidden[0])


def init_vars(cfg: ModelConfig, scfg: SearchConfig) -> SearchVars:
    """Counts at their initial fractions of each group (0: nothing removed), gate logits at scfg.gate_init."""
    n, h = cfg.depth, cfg.num_heads
    sizes = group_sizes(cfg)
    full = lambda shape, v: jnp.full(shape, v, jnp.float32)  # noqa: E731
    counts = Counts(
        heads=full((n,), scfg.heads_init * sizes.heads),
        dims=full((n, h), scfg.dims_init * sizes.dims),
        neurons=full((n,), scfg.neurons_init * sizes.neurons),
    )
    return SearchVars(counts, jnp.tile(jnp.asarray(scfg.gate_init, jnp.float32), (n, 1)))


def init_duals(cfg: ModelConfig, scfg: SearchConfig) -> Duals:
    n, h = cfg.depth, cfg.num_heads
    return Duals(
        y_heads=jnp.full((n,), scfg.y_init, jnp.float32),
        y_neurons=jnp.full((n,), scfg.y_init, jnp.float32),
        p_dims=jnp.full((n, h), scfg.p_init, jnp.float32),
        z=jnp.asarray(scfg.z_init, jnp.float32),
    )
