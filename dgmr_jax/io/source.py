"""Layer sources: a model read block by block (`top()`, `block(i)`, `load()`), with its config and meta.

Every opener returns one (dgmr_jax.io.open.open_model); streaming stages (prune) read one block at a time, so a
model larger than host memory is never held whole.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dgmr_jax.core.parallel import place
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params, flatten, is_scanned, stack_blocks, unflatten, unstack_blocks


class LayerSource:
    """A model read block by block; subclasses set cfg and meta and implement top() and block(i)."""

    cfg: ModelConfig
    meta: dict[str, Any]

    def top(self) -> Params:
        raise NotImplementedError

    def block(self, i: int) -> Params:
        raise NotImplementedError

    def load(self) -> Params:
        """Every param, in the config's layout (stacked when cfg.scan_layers)."""
        params = self.top()
        for i in range(self.cfg.depth):
            params[f"blocks_{i}"] = self.block(i)
        return stack_blocks(params) if self.cfg.scan_layers else params

    def top_on(self, shardings: Params, dtype: Any = None) -> Params:
        """`top()` as global arrays laid out by `shardings` (its tree), in `dtype`."""
        return place(self.top(), shardings, dtype)

    def block_on(self, i: int, shardings: Params, dtype: Any = None) -> Params:
        """`block(i)` as global arrays laid out by `shardings` (its tree), in `dtype`."""
        return place(self.block(i), shardings, dtype)

    def place(self, shardings: Params, dtype: Any = None) -> Params:
        """Every param on the mesh in `dtype`, laid out by `shardings` and in their layout (stacked when they have
        the scanned "blocks" subtree, whatever the source's), read one block at a time: each device receives only
        its shards, and a model directory's hosts read only theirs."""
        scanned = is_scanned(shardings)
        params = self.top_on({k: v for k, v in shardings.items() if not k.startswith("blocks")}, dtype)
        stacked = shardings["blocks"]["block"] if scanned else None
        per_layer = jax.tree_util.tree_map(_layer_sharding, stacked) if scanned else None
        blocks = [self.block_on(i, per_layer or shardings[f"blocks_{i}"], dtype) for i in range(self.cfg.depth)]
        if scanned:
            return {**params, "blocks": {"block": _stack_on(blocks, stacked)}}
        return {**params, **{f"blocks_{i}": block for i, block in enumerate(blocks)}}


def _layer_sharding(stacked: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked param: the stack's without its leading layer axis."""
    return NamedSharding(stacked.mesh, PartitionSpec(*stacked.spec[1:]))


def _stack(*layers: jax.Array) -> jax.Array:
    return jnp.stack(layers)


def _stack_on(blocks: list[Params], shardings: Params) -> Params:
    """Per-layer global arrays stacked on a leading layer axis, laid out by `shardings`, one param at a time (its
    layers are freed once stacked, so the stack never needs twice the model's memory)."""
    flat = [flatten(block) for block in blocks]
    out = {}
    for key, sharding in flatten(shardings).items():
        layers = [layer.pop(key) for layer in flat]
        out[key] = jax.jit(_stack, out_shardings=sharding)(*layers)
        for layer in layers:
            layer.delete()
    return unflatten(out)


class InMemorySource(LayerSource):
    """Params already in host memory (scanned or per-layer), served block by block."""

    def __init__(self, cfg: ModelConfig, params: Params, meta: dict[str, Any] | None = None):
        self.cfg, self.meta = cfg, dict(meta or {})
        self._params = unstack_blocks(params) if is_scanned(params) else params

    def top(self) -> Params:
        return {k: v for k, v in self._params.items() if not k.startswith("blocks_")}

    def block(self, i: int) -> Params:
        return self._params[f"blocks_{i}"]
