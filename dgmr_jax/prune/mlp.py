"""MLP pruning: (config, params) -> (slimmer config, params), one layer at a time, in memory or streamed to disk.

Gated MLPs (SwiGLU, EVA02's split fc1_g/fc1_x and DINOv2-g's packed fc1): hidden neuron i owns a
gate vector g_i and a value vector x_i, so selection runs on the concatenation [g_i; x_i] in R^{2D}
and the gate, value, hidden LayerNorm and fc2 rows are sliced together. This is our choice: the
official code handles plain GELU MLPs only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike
from dgmr_jax.io.model_dir import check_new_dir, save_model
from dgmr_jax.io.open import InMemorySource, LayerSource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import slice_mlp
from dgmr_jax.models.tree import Params, stack_blocks
from dgmr_jax.prune.select import METHODS, diversity_select, select_neurons


@dataclasses.dataclass
class LayerReport:
    """What pruning did to one block: widths and, for diversity, the residual norm of each pick."""

    layer: int
    hidden_before: int
    hidden_after: int
    residual_norms: np.ndarray | None = None


def target_widths(
    cfg: ModelConfig,
    mlp_ratio: float | None = None,
    hidden: int | Sequence[int] | None = None,
    round_to: int = 1,
) -> tuple[int, ...]:
    """Per-layer kept widths from exactly one of mlp_ratio (K = int(ratio * D)) or hidden (int or list).

    Widths are rounded up to a multiple of round_to (e.g. 128 so TPU shards divide evenly), capped at
    the current width. Raises ValueError before any work for impossible targets, and for targets that
    keep every neuron (nothing to prune); messages name the `dgmr-jax prune` flags.
    """
    if (mlp_ratio is None) == (hidden is None):
        raise UserError("give exactly one of --mlp-ratio or --hidden (mlp_ratio= or hidden= in Python)")
    if round_to < 1:
        raise UserError(f"--round-to must be >= 1, got {round_to}")
    if mlp_ratio is not None:
        if not (math.isfinite(mlp_ratio) and mlp_ratio > 0):
            raise UserError(f"--mlp-ratio must be a finite number > 0, got {mlp_ratio}")
        widths = [int(mlp_ratio * cfg.width)] * cfg.depth
    elif isinstance(hidden, (int, np.integer)):
        widths = [int(hidden)] * cfg.depth
    else:
        widths = [int(h) for h in hidden]
        if len(widths) != cfg.depth:
            raise UserError(f"--hidden lists {len(widths)} widths but the model has {cfg.depth} layers")
    for i, (w, cur) in enumerate(zip(widths, cfg.mlp_hidden, strict=True)):
        if w <= 0:
            raise UserError(f"layer {i}: target width {w} must be > 0 (raise --mlp-ratio / --hidden)")
        if w > cur:
            raise UserError(
                f"layer {i}: target width {w} exceeds the current width {cur}; pruning cannot grow "
                "(lower --mlp-ratio / --hidden)"
            )
    widths = [min(-(-w // round_to) * round_to, cur) for w, cur in zip(widths, cfg.mlp_hidden, strict=True)]
    if widths == list(cfg.mlp_hidden):
        target = f"--mlp-ratio {mlp_ratio}" if mlp_ratio is not None else f"--hidden {hidden}"
        raise UserError(
            f"nothing to prune: {target} keeps every neuron (MLP widths {sorted(set(widths))} of width "
            f"{cfg.width}); choose a smaller --mlp-ratio or --hidden"
        )
    return tuple(widths)


def selection_matrix(cfg: ModelConfig, mlp: Params) -> np.ndarray:
    """(D or 2D, H) matrix whose columns are the neuron vectors selection looks at."""
    if cfg.gated:
        return np.concatenate([np.asarray(mlp["fc1_g"]["kernel"]), np.asarray(mlp["fc1_x"]["kernel"])], axis=0)
    return np.asarray(mlp["fc1"]["kernel"])


def prune_layer(
    cfg: ModelConfig, mlp: Params, width: int, method: str, seed: int = 0, scores: Any = None
) -> tuple[Params, np.ndarray, np.ndarray | None]:
    """Prune one block's MLP to `width` neurons: (sliced mlp params, kept indices, residual norms)."""
    matrix = selection_matrix(cfg, mlp)
    if method == "diversity":
        idx, norms = diversity_select(matrix, width)
    else:
        idx, norms = select_neurons(matrix, width, method, seed=seed, scores=scores), None
    return slice_mlp(mlp, np.sort(idx)), idx, norms


def _check_method(method: str, scores: Sequence[Any] | None, depth: int) -> None:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "taylor" and (scores is None or len(scores) != depth):
        raise UserError(f"method='taylor' needs scores=: one importance array per layer ({depth})")


def prune_source(
    source: LayerSource,
    method: str = "diversity",
    mlp_ratio: float | None = None,
    hidden: int | Sequence[int] | None = None,
    round_to: int = 1,
    seed: int = 0,
    scores: Sequence[Any] | None = None,
    progress: bool = False,
) -> tuple[ModelConfig, Params, list[LayerReport]]:
    """The per-layer prune loop: read each block of `source`, slim its MLP, keep it; (new config, unscanned
    params, one LayerReport per layer). Targets are checked before the first block is read, so host memory
    holds one source block plus the slimmed output."""
    cfg = source.cfg
    _check_method(method, scores, cfg.depth)
    widths = target_widths(cfg, mlp_ratio, hidden, round_to)
    params = source.top()
    reports = []
    for i in tqdm(range(cfg.depth), desc=f"pruning ({method})", unit="layer", disable=not progress):
        block = dict(source.block(i))
        layer_scores = None if scores is None else scores[i]
        block["mlp"], _, norms = prune_layer(cfg, block["mlp"], widths[i], method, seed + i, layer_scores)
        params[f"blocks_{i}"] = block
        reports.append(LayerReport(i, cfg.mlp_hidden[i], widths[i], norms))
    return cfg.replace(mlp_hidden=widths, scan_layers=False), params, reports


def prune_mlp(
    cfg: ModelConfig,
    params: Params,
    method: str = "diversity",
    mlp_ratio: float | None = None,
    hidden: int | Sequence[int] | None = None,
    round_to: int = 1,
    seed: int = 0,
    scores: Sequence[Any] | None = None,
    report: list[LayerReport] | None = None,
) -> tuple[ModelConfig, Params]:
    """Slim every block's MLP to the target widths with `method`; returns (new config, new params).

    Exact surgery: the pruned model equals the original with the dropped neurons' fc2 rows zeroed.
    Kept neurons stay in their original order. Works on scanned and per-layer stacks; non-uniform
    widths come back unscanned. Pass a list as `report` to receive one LayerReport per layer.
    `scores` (one (H,) array per layer) feeds method="taylor".
    """
    new_cfg, layers, reports = prune_source(
        InMemorySource(cfg, params), method, mlp_ratio, hidden, round_to, seed, scores
    )
    if report is not None:
        report.extend(reports)
    new_cfg = new_cfg.replace(scan_layers=cfg.scan_layers and len(set(new_cfg.mlp_hidden)) == 1)
    return new_cfg, stack_blocks(layers) if new_cfg.scan_layers else layers


def prune_to_dir(
    source: LayerSource,
    out: PathLike,
    method: str = "diversity",
    mlp_ratio: float | None = None,
    hidden: int | Sequence[int] | None = None,
    round_to: int = 1,
    seed: int = 0,
    progress: bool = True,
    scores: Sequence[Any] | None = None,
) -> tuple[ModelConfig, list[LayerReport]]:
    """Prune `source` (e.g. a PyTorch checkpoint opened with open_model) into the new model directory `out`,
    one layer at a time, so a model larger than host memory is never held whole (EVA-CLIP-E: 17 GB)."""
    check_new_dir(out)
    new_cfg, params, reports = prune_source(source, method, mlp_ratio, hidden, round_to, seed, scores, progress)
    save_model(out, new_cfg, params, **source.meta, pruned={"method": method, "seed": seed})
    return new_cfg, reports
