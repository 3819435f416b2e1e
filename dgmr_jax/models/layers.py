"""Layer helpers shared by the vision and text towers: Dense, LayerNorm and RMSNorm with logical axis names,
activations.

`cfg` is any config with dtype and param_dtype (and norm_eps for norms): ModelConfig or TextConfig.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

kernel_init = nn.initializers.truncated_normal(0.02)


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """Attach logical axis names (mapped to mesh axes by dgmr_jax.core.parallel rules) to an initializer."""
    return nn.with_logical_partitioning(init, names)


def dense(
    features: int, names: tuple[str, str], cfg: Any, name: str, bias: bool = True
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """nn.Dense applied to the tokens flattened to 2-D: with (B, N, D) inputs the kernel gradient contracts two
    dims, which XLA:CPU runs about 2x slower than the same GEMM on (B*N, D)."""
    layer = nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(nn.initializers.zeros, names[1:]),
        name=name,
    )
    return lambda x: layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


def layer_norm(cfg: Any, name: str, axis: str = "embed") -> nn.LayerNorm:
    """LayerNorm in PyTorch's two-pass form, scale and bias named by `axis`."""
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        use_fast_variance=False,  # E[x^2]-E[x]^2 loses digits that PyTorch keeps
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=partitioned(nn.initializers.ones, (axis,)),
        bias_init=partitioned(nn.initializers.zeros, (axis,)),
        name=name,
    )


def rms_norm(cfg: Any, name: str, axis: str = "embed") -> nn.RMSNorm:
    """RMSNorm as T5 / EVA-CLIP-18B / InternViT write it: x * rsqrt(mean(x^2) + eps) * scale, no mean, no bias."""
    return nn.RMSNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=partitioned(nn.initializers.ones, (axis,)),
        name=name,
    )


def activation(kind: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """gelu (exact erf form, as torch), gelu_tanh (the tanh approximation: SigLIP), quick_gelu (OpenAI CLIP) or
    silu."""
    if kind in ("gelu", "gelu_tanh"):
        return functools.partial(jax.nn.gelu, approximate=kind == "gelu_tanh")
    if kind == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.silu


# A model's init as a function of the rng alone, returning boxed (logically partitioned) params.
Init = Callable[[jax.Array], Any]


def init_tree(init: Callable[[Any, jax.Array], Any], cfg: Any, rng: jax.Array | int = 0) -> dict[str, Any]:
    """Randomly initialized params of `init(cfg, rng)` as plain arrays, from one program compiled per config (run op
    by op, each initializer op compiles on its own: about twice as slow); an int rng is a PRNGKey seed."""
    rng = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    return nn.unbox(_compiled_init(init)(cfg, rng))


@functools.cache
def _compiled_init(init: Callable[[Any, jax.Array], Any]) -> Callable[[Any, jax.Array], Any]:
    """`init` jitted with its (hashable) config static."""
    return jax.jit(init, static_argnums=0)


def shape_tree(init: Init) -> dict[str, Any]:
    """The param tree as jax.ShapeDtypeStruct leaves, built without allocating (jax.eval_shape)."""
    return nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))


def axes_tree(init: Init) -> dict[str, Any]:
    """The param tree of logical axis-name PartitionSpecs, mapped to mesh axes by dgmr_jax.core.parallel rules."""
    return nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0)))
