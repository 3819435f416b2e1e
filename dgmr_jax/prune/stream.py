"""Prune a checkpoint layer by layer, from disk to a model directory, so that peak host memory is one
layer plus the (pruned) output, never the whole source model (EVA-CLIP-E is 17 GB in float32)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from dgmr_jax.convert.checkpoint_io import open_state_dict
from dgmr_jax.convert.core import (
    VisionEntries,
    check_keys,
    checkpoint_image_size,
    convert_rules,
    listing,
    mismatch_error,
    resolve_config,
)
from dgmr_jax.convert.keymaps import rules
from dgmr_jax.model_dir import check_new_dir, load_config, load_params, save_model
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import flatten, unflatten
from dgmr_jax.models.vit import param_shapes
from dgmr_jax.prune.mlp import LayerReport, prune_layer, target_widths

Params = dict[str, Any]
_BLOCK = re.compile(r"^blocks_(\d+)/")


class TorchLayerSource:
    """Reads one block at a time from a PyTorch-layout checkpoint (.safetensors read lazily)."""

    def __init__(self, path: str | os.PathLike, family: str, arch: str | ModelConfig):
        self.meta = {"family": family, "source": os.fspath(path)}
        raw = open_state_dict(path)
        self._sd = VisionEntries(raw, family)
        self.cfg = checkpoint_image_size(self._sd, resolve_config(arch, family), family)
        self._shapes = flatten(param_shapes(self.cfg.replace(scan_layers=False)))
        self._rules: dict[int | None, list] = {}
        for rule in rules(self.cfg, family):
            m = _BLOCK.match(rule.flax[0])
            self._rules.setdefault(int(m.group(1)) if m else None, []).append(rule)
        problems = check_keys(self._sd, [r for group in self._rules.values() for r in group])
        if problems:  # names only: nothing has been read yet
            raise mismatch_error(problems, family, arch, self.cfg, raw)
        self._family, self._arch, self._raw = family, arch, raw

    def _read(self, key: int | None) -> Params:
        flat, misshaped = convert_rules(self._sd, self._rules[key], self._shapes)
        if misshaped:
            raise mismatch_error([listing("mis-shaped keys", misshaped)], self._family, self._arch, self.cfg, self._raw)
        return unflatten(flat)

    def top(self) -> Params:
        return self._read(None)

    def block(self, i: int) -> Params:
        return self._read(i)[f"blocks_{i}"]


class ModelDirLayerSource:
    """Reads one block at a time from a model directory (Orbax partial restore)."""

    def __init__(self, directory: str | os.PathLike):
        self.cfg, meta = load_config(directory)
        if self.cfg.scan_layers:
            raise ValueError(
                f"{directory} holds a scanned layer stack, which cannot be read one layer at a time; "
                "prune it in memory with dgmr_jax.prune.prune_mlp, or save it unscanned"
            )
        self.meta = {**meta, "source": os.fspath(directory)}
        self._dir = directory
        self._shapes = param_shapes(self.cfg)

    def top(self) -> Params:
        return load_params(self._dir, {k: v for k, v in self._shapes.items() if not _BLOCK.match(k + "/")})

    def block(self, i: int) -> Params:
        name = f"blocks_{i}"
        return load_params(self._dir, {name: self._shapes[name]})[name]


def prune_to_dir(
    source: TorchLayerSource | ModelDirLayerSource,
    out: str | os.PathLike,
    method: str = "diversity",
    mlp_ratio: float | None = None,
    hidden: int | Sequence[int] | None = None,
    round_to: int = 1,
    seed: int = 0,
    progress: bool = True,
    scores: Sequence[Any] | None = None,
) -> tuple[ModelConfig, list[LayerReport]]:
    """Prune every MLP of `source` and write the slim model to the new directory `out`.

    `scores`: one importance array per layer, for method "taylor" (see load_all and prune.taylor).
    Targets and the output path are checked before the first layer is read.
    """
    check_new_dir(out)
    cfg = source.cfg
    widths = target_widths(cfg, mlp_ratio, hidden, round_to)
    params = source.top()
    reports = []
    for i in tqdm(range(cfg.depth), desc=f"pruning ({method})", unit="layer", disable=not progress):
        block = source.block(i)
        layer_scores = None if scores is None else scores[i]
        block["mlp"], _, norms = prune_layer(cfg, block["mlp"], widths[i], method, seed + i, layer_scores)
        params[f"blocks_{i}"] = block
        reports.append(LayerReport(i, cfg.mlp_hidden[i], widths[i], norms))
    new_cfg = cfg.replace(mlp_hidden=widths, scan_layers=False)
    save_model(out, new_cfg, params, **source.meta, pruned={"method": method, "seed": seed})
    return new_cfg, reports


def load_all(source: TorchLayerSource | ModelDirLayerSource) -> Params:
    """Every param of `source` in host memory: Taylor scores need whole forward and backward passes."""
    params = source.top()
    for i in range(source.cfg.depth):
        params[f"blocks_{i}"] = source.block(i)
    return params
