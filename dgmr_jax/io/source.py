"""Layer sources: a model read block by block (`top()`, `block(i)`, `load()`), with its config and meta.

Every opener returns one (dgmr_jax.io.open.open_model); streaming stages (prune) read one block at a time, so a
model larger than host memory is never held whole.
"""

from __future__ import annotations

from typing import Any

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params, is_scanned, stack_blocks, unstack_blocks


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


class InMemorySource(LayerSource):
    """Params already in host memory (scanned or per-layer), served block by block."""

    def __init__(self, cfg: ModelConfig, params: Params, meta: dict[str, Any] | None = None):
        self.cfg, self.meta = cfg, dict(meta or {})
        self._params = unstack_blocks(params) if is_scanned(params) else params

    def top(self) -> Params:
        return {k: v for k, v in self._params.items() if not k.startswith("blocks_")}

    def block(self, i: int) -> Params:
        return self._params[f"blocks_{i}"]
