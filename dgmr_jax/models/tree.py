"""Plain-dict param tree helpers: '/'-joined paths, and scanned <-> per-layer block stacks."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

Params = dict[str, Any]
_BLOCK = re.compile(r"^blocks_(\d+)/(.*)$")
_SCANNED = "blocks/block/"


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def is_scanned(params: Params) -> bool:
    return "blocks" in params


def stack_blocks(params: Params) -> Params:
    """Per-layer blocks_i subtrees -> one scanned 'blocks/block' subtree with a leading layer axis."""
    flat = flatten(params)
    per_layer: dict[str, dict[int, Any]] = {}
    out = {}
    for path, value in flat.items():
        m = _BLOCK.match(path)
        if m:
            per_layer.setdefault(m.group(2), {})[int(m.group(1))] = value
        else:
            out[path] = value
    for rest, layers in per_layer.items():
        xs = [layers[i] for i in sorted(layers)]
        shapes = {x.shape for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"cannot scan layers with different shapes for {rest}: {sorted(shapes)}")
        out[_SCANNED + rest] = np.stack([np.asarray(x) for x in xs])
    return unflatten(out)


def unstack_blocks(params: Params) -> Params:
    """Scanned 'blocks/block' subtree -> per-layer blocks_i subtrees."""
    out = {}
    for path, value in flatten(params).items():
        if path.startswith(_SCANNED):
            for i in range(value.shape[0]):
                out[f"blocks_{i}/{path[len(_SCANNED) :]}"] = value[i]
        else:
            out[path] = value
    return unflatten(out)


def in_layout(params: Params, scanned: bool) -> Params:
    """`params` stacked for a scanned model (scanned=True) or per layer, whichever layout they arrive in: a model
    file's layout is independent of the run that reads it."""
    if scanned and not is_scanned(params):
        return stack_blocks(params)
    if not scanned and is_scanned(params):
        return unstack_blocks(params)
    return params
