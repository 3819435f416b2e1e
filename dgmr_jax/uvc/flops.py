"""The UVC resource function R: FLOPs of a partly pruned, partly skipped ViT over the FLOPs of the full model.

Convention of dgmr_jax.prune.count_flops (2 x multiply-accumulates of one image; norms, softmax and biases
excluded), extended per the slim-model contract to layers with H kept heads of width d for q/k, V kept value dims
in all (only values lose dims) and M kept MLP neurons, over n tokens of width D:

    qkv n*D*(2*H*d + V),  q.k n*n*H*d,  attn.v n*n*V,  proj n*V*D,  fc1 n*D*M*(2 if gated else 1),  fc2 n*M*D

A block gate pi scales its block's FLOPs (pi = 0: skipped, pi = 1: run); the patch embedding and the head are
always paid. The same arithmetic serves the search (float arrays: differentiable in the kept counts and the gates)
and extraction (Python ints: exact). Counts meet arrays only as Python floats: a Python int above 2**31 inside
a JAX expression overflows int32 (DeiT-S at 224 px is 9.2 GFLOPs, EVA-E about 1e12).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.slim import Plan


def num_tokens(cfg: ModelConfig) -> int:
    """Tokens one block sees: prefix tokens plus patches at cfg.img_size."""
    return cfg.num_prefix_tokens + cfg.grid * cfg.grid


def layer_flops(cfg: ModelConfig, heads: Any, value_width: Any, neurons: Any) -> Any:
    """FLOPs of one block with `heads` kept heads, `value_width` kept value dims in all and `neurons` kept MLP
    neurons. Plain arithmetic, so it works elementwise on Python ints (exact), numpy and jax arrays (whose
    coefficients are then floats, so no product of sizes overflows int32)."""
    n, width, d = num_tokens(cfg), cfg.width, cfg.attn_head_dim
    fc1 = 2 if cfg.gated else 1
    if not all(isinstance(v, numbers.Integral) for v in (heads, value_width, neurons)):
        n, width, d, fc1 = float(n), float(width), float(d), float(fc1)
    macs = (
        n * width * (2 * d * heads + value_width)  # qkv
        + n * n * d * heads  # q k^T
        + n * n * value_width  # attn v
        + n * width * value_width  # proj
        + n * width * fc1 * neurons  # fc1 (gate and value halves when gated)
        + n * width * neurons  # fc2
    )
    return 2 * macs


def fixed_flops(cfg: ModelConfig) -> int:
    """FLOPs that no UVC decision changes: patch embedding, head and projection."""
    parts = count_flops(cfg, per_layer=True)
    return parts["embed"] + parts["head"]


def model_flops(cfg: ModelConfig, heads: Any, value_width: Any, neurons: Any, gates: Any) -> jnp.ndarray:
    """FLOPs of the whole tower for per-layer (depth,) kept heads, value widths, neurons and block gates."""
    dtype = jnp.result_type(float)
    per_layer = layer_flops(
        cfg, jnp.asarray(heads, dtype), jnp.asarray(value_width, dtype), jnp.asarray(neurons, dtype)
    )
    return float(fixed_flops(cfg)) + jnp.sum(jnp.asarray(gates, dtype) * per_layer)


def flops_ratio(cfg: ModelConfig, heads: Any, value_width: Any, neurons: Any, gates: Any) -> jnp.ndarray:
    """R = model_flops / count_flops(cfg): 1 for the full model, differentiable in every argument."""
    return model_flops(cfg, heads, value_width, neurons, gates) / float(count_flops(cfg))


def masks_ratio(
    cfg: ModelConfig, head_mask: jnp.ndarray, dim_mask: jnp.ndarray, neuron_mask: jnp.ndarray, gates: jnp.ndarray
) -> jnp.ndarray:
    """R of the masked model: head_mask (L, H), dim_mask (L, H, d), neuron_mask (L, M), gates (L,).

    Kept heads = sum of the head mask, value width = sum over heads of head mask x kept dims, neurons = sum of the
    neuron mask; exact at 0/1 masks, and it carries the masks' straight-through gradients to the counts.
    """
    heads = jnp.sum(head_mask, axis=-1)
    value_width = jnp.sum(head_mask * jnp.sum(dim_mask, axis=-1), axis=-1)
    return flops_ratio(cfg, heads, value_width, jnp.sum(neuron_mask, axis=-1), gates)


def plan_flops(cfg: ModelConfig, plan: Plan) -> int:
    """Exact FLOPs (int) of the model a Plan describes: skipped blocks cost nothing."""
    total = fixed_flops(cfg)
    for unit in plan:
        if unit.keep_block:
            total += layer_flops(cfg, len(unit.heads), sum(len(d) for d in unit.dims), len(unit.neurons))
    return total


def plan_ratio(cfg: ModelConfig, plan: Plan) -> float:
    """FLOPs ratio of a Plan against the full model."""
    return plan_flops(cfg, plan) / count_flops(cfg)
