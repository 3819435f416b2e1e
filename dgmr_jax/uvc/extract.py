"""From a finished search to a Plan: deterministic gates and counts, the units to keep, a greedy budget repair.

Deterministic: a block is kept when its keep logit is at least its skip logit (no_skip: every block is kept);
each count is rounded as in the search, k = min(ceil(s), n - 1), and the k weakest units by the searched weights'
norms go (masks.py), so the plan is the search's hard-masked model.

The search lands near the budget, not on it (the official code misses it by several points), so a greedy repair
moves single value dims and neurons until the exact FLOPs ratio lies in [budget - tolerance, budget]: above the
budget it removes the unit of least squared norm per FLOP, below the window it restores the removed unit of most
norm per FLOP that still fits. Block gates and head choices are left as searched. A budget the kept blocks and
heads cannot reach (every kept head at one dim and every kept MLP at one neuron is still above it, or everything
restored is still below the window) is an error.

Neurons: `select` names how the kept neurons are chosen once their number is fixed: "uvc" (the searched weights'
fc2 row norms, what the search masked), or a DGMR method of dgmr_jax.prune.select on the TEACHER's fc1
(selection_matrix, so gated MLPs use [gate; value] columns): "diversity", "l2", "random" (seeded per layer),
"taylor" (per-layer scores given).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.slim import Plan, UnitPlan
from dgmr_jax.models.tree import Params
from dgmr_jax.prune.mlp import selection_matrix
from dgmr_jax.prune.select import select_neurons
from dgmr_jax.uvc.config import check_model
from dgmr_jax.uvc.flops import fixed_flops, layer_flops
from dgmr_jax.uvc.masks import group_norms
from dgmr_jax.uvc.state import SearchVars

SELECT = ("uvc", "diversity", "l2", "random", "taylor")


@dataclasses.dataclass(frozen=True)
class Extraction:
    """A Plan and how it was reached: ratios before and after the repair, and the repair's unit moves."""

    plan: Plan
    budget: float
    ratio_searched: float  # exact FLOPs ratio of the rounded search result (argmax gates), before the repair
    ratio: float  # exact FLOPs ratio of `plan`
    removed: int  # value dims and neurons the repair removed
    restored: int  # value dims and neurons the repair restored
    blocks_moved: int = 0  # skipped blocks restored (or kept blocks skipped) so the widths could reach the window
    heads_moved: int = 0  # removed heads restored (or kept heads removed), likewise

    def summary(self) -> str:
        kept = sum(u.keep_block for u in self.plan)
        return (
            f"UVC plan: {kept}/{len(self.plan)} blocks kept; FLOPs ratio {self.ratio_searched:.4f} searched -> "
            f"{self.ratio:.4f} after repair (budget {self.budget}; {self.removed} units removed, "
            f"{self.restored} restored; {self.blocks_moved} blocks and {self.heads_moved} heads moved)"
        )


@dataclasses.dataclass
class _Widths:
    """Mutable integer widths during the repair: dims removed (L, H) and neurons removed (L,)."""

    keep_block: np.ndarray
    head_keep: np.ndarray
    dims: np.ndarray
    neurons: np.ndarray


def _rank(norms: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 0 = weakest, ties to the lower index (as masks.ranks)."""
    order = np.argsort(norms, axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable")


def _rounded(counts: Any, n: int) -> np.ndarray:
    return np.minimum(np.ceil(np.asarray(counts)), n - 1).astype(np.int64)


def _flops(cfg: ModelConfig, w: _Widths) -> int:
    d, m = cfg.attn_head_dim, cfg.mlp_hidden[0]
    total = fixed_flops(cfg)
    for layer in np.flatnonzero(w.keep_block):
        hk = w.head_keep[layer]
        value = int(np.sum(hk * (d - w.dims[layer])))
        total += layer_flops(cfg, int(hk.sum()), value, int(m - w.neurons[layer]))
    return int(total)


def repair_bounds(cfg: ModelConfig, keep_block: np.ndarray, head_keep: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) FLOPs ratio the repair can reach with these blocks and heads kept."""
    n, h = head_keep.shape
    low = _Widths(keep_block, head_keep, np.full((n, h), cfg.attn_head_dim - 1), np.full(n, cfg.mlp_hidden[0] - 1))
    high = _Widths(keep_block, head_keep, np.zeros((n, h), np.int64), np.zeros(n, np.int64))
    total = count_flops(cfg)
    return _flops(cfg, low) / total, _flops(cfg, high) / total


def _fit_structure(
    cfg: ModelConfig, w: _Widths, margins: np.ndarray, head_norms: np.ndarray, budget: float, tolerance: float
) -> tuple[int, int]:
    """Restore (or remove) whole blocks, then heads, until the width repair can reach the window: a search that
    skipped too much gets back the skipped blocks it was least sure of (highest keep - skip logit margin), then the
    strongest removed heads; one that kept too much loses the least sure blocks, then the weakest heads (>= 1 head
    per kept block). Returns (blocks, heads) moved."""
    blocks = heads = 0
    while repair_bounds(cfg, w.keep_block, w.head_keep)[1] < budget - tolerance:
        skipped = np.flatnonzero(~w.keep_block)
        if len(skipped):
            w.keep_block[skipped[np.argmax(margins[skipped])]] = True
            blocks += 1
            continue
        removed = np.argwhere(w.head_keep == 0)
        if not len(removed):
            break
        layer, h = removed[np.argmax([head_norms[i, j] for i, j in removed])]
        w.head_keep[layer, h] = 1
        heads += 1
    while repair_bounds(cfg, w.keep_block, w.head_keep)[0] > budget:
        kept = np.flatnonzero(w.keep_block)
        spare = [(i, j) for i in kept for j in np.flatnonzero(w.head_keep[i]) if w.head_keep[i].sum() > 1]
        if spare:
            layer, h = spare[int(np.argmin([head_norms[i, j] for i, j in spare]))]
            w.head_keep[layer, h] = 0
            heads += 1
        elif len(kept) > 1:
            w.keep_block[kept[np.argmin(margins[kept])]] = False
            blocks += 1
        else:
            break
    return blocks, heads


def _repair(
    cfg: ModelConfig, w: _Widths, dim_norms: np.ndarray, neuron_norms: np.ndarray, budget: float, tolerance: float
) -> tuple[int, int]:
    """Move single dims / neurons until the ratio is in [budget - tolerance, budget]; (removed, restored)."""
    total = count_flops(cfg)
    low, high = repair_bounds(cfg, w.keep_block, w.head_keep)
    if low > budget:
        raise UserError(
            f"budget {budget} is out of reach for the searched blocks and heads: with one value dim per kept head "
            f"and one neuron per kept MLP the FLOPs ratio is still {low:.4f}; raise the budget or search longer "
            "(more heads or blocks removed)"
        )
    if high < budget - tolerance:
        raise UserError(
            f"budget window [{budget - tolerance:.4f}, {budget}] is out of reach for the searched blocks and heads: "
            f"with every dim and neuron restored the FLOPs ratio is {high:.4f}; lower the budget, pass no_skip=True "
            "or search with a milder budget"
        )
    units = _Units(cfg, w, dim_norms, neuron_norms)
    flops, removed = _remove_units(units, _flops(cfg, w), budget * total)
    restored = _restore_units(units, flops, total, budget, tolerance)
    return removed, restored


class _Units:
    """The single value dims (of kept heads) and neurons (of kept MLPs) that _repair moves, as heap entries
    (norm per FLOP, key); key ("n", layer) or ("d", layer, head). Moving one changes the widths `w` in place."""

    def __init__(self, cfg: ModelConfig, w: _Widths, dim_norms: np.ndarray, neuron_norms: np.ndarray):
        self.w = w
        self.d, self.m = cfg.attn_head_dim, cfg.mlp_hidden[0]
        self.dim_cost, self.neuron_cost = int(layer_flops(cfg, 0, 1, 0)), int(layer_flops(cfg, 0, 0, 1))
        self.dsort, self.nsort = np.sort(dim_norms, axis=-1), np.sort(neuron_norms, axis=-1)
        layers = np.flatnonzero(w.keep_block)
        heads = [(int(layer), int(h)) for layer in layers for h in np.flatnonzero(w.head_keep[layer])]
        self.keys = [("n", int(layer)) for layer in layers] + [("d", layer, h) for layer, h in heads]

    def cost(self, key: tuple) -> int:
        return self.neuron_cost if key[0] == "n" else self.dim_cost

    def down(self, key: tuple) -> tuple | None:
        """The least norm per FLOP among the next units to go."""
        if key[0] == "n":
            k = self.w.neurons[key[1]]
            return (self.nsort[key[1], k] / self.neuron_cost, key) if k < self.m - 1 else None
        k = self.w.dims[key[1], key[2]]
        return (self.dsort[key[1], key[2], k] / self.dim_cost, key) if k < self.d - 1 else None

    def up(self, key: tuple) -> tuple | None:
        """The most norm per FLOP (negated) among the last units gone."""
        if key[0] == "n":
            k = self.w.neurons[key[1]]
            return (-self.nsort[key[1], k - 1] / self.neuron_cost, key) if k > 0 else None
        k = self.w.dims[key[1], key[2]]
        return (-self.dsort[key[1], key[2], k - 1] / self.dim_cost, key) if k > 0 else None

    def heap(self, entry: Callable[[tuple], tuple | None]) -> list[tuple]:
        heap = [c for c in (entry(key) for key in self.keys) if c]
        heapq.heapify(heap)
        return heap

    def move(self, key: tuple, removed: int) -> None:
        """Remove (removed=1) or restore (removed=-1) one unit."""
        if key[0] == "n":
            self.w.neurons[key[1]] += removed
        else:
            self.w.dims[key[1], key[2]] += removed


def _remove_units(units: _Units, flops: int, limit: float) -> tuple[int, int]:
    """Pop the least norm per FLOP among the next units to go while over `limit` FLOPs; (FLOPs, units removed)."""
    removed = 0
    if flops > limit:
        heap = units.heap(units.down)
        while flops > limit:
            _, key = heapq.heappop(heap)
            units.move(key, 1)
            flops -= units.cost(key)
            removed += 1
            nxt = units.down(key)
            if nxt:
                heapq.heappush(heap, nxt)
    return flops, removed


def _restore_units(units: _Units, flops: int, total: int, budget: float, tolerance: float) -> int:
    """Restore the most norm per FLOP among the last units gone, while they fit under the budget, until the
    ratio reaches budget - tolerance; the units restored."""
    restored = 0
    if flops < (budget - tolerance) * total:
        heap = units.heap(units.up)
        while flops < (budget - tolerance) * total:
            if not heap:
                raise UserError(
                    f"the repair cannot land in [{budget - tolerance:.4f}, {budget}]: single units cost more than "
                    f"the window ({units.dim_cost / total:.4f} per dim, {units.neuron_cost / total:.4f} per "
                    "neuron); widen the tolerance"
                )
            _, key = heapq.heappop(heap)
            cost = units.cost(key)
            if flops + cost > budget * total:
                continue  # this kind no longer fits; units of the other kind may
            units.move(key, -1)
            flops += cost
            restored += 1
            nxt = units.up(key)
            if nxt:
                heapq.heappush(heap, nxt)
    return restored


def _layer_mlp(params: Params, layer: int) -> Params:
    if "blocks" in params:
        return jax.tree_util.tree_map(lambda a: a[layer], params["blocks"]["block"]["mlp"])
    return params[f"blocks_{layer}"]["mlp"]


def _check(
    cfg: ModelConfig, svars: SearchVars, budget: float, select: str, teacher_params: Any, scores: Any, tolerance: float
):
    check_model(cfg)
    n, h = cfg.depth, cfg.num_heads
    want = {"counts.heads": (n,), "counts.dims": (n, h), "counts.neurons": (n,), "gate_logits": (n, 2)}
    got = {
        "counts.heads": np.shape(svars.counts.heads),
        "counts.dims": np.shape(svars.counts.dims),
        "counts.neurons": np.shape(svars.counts.neurons),
        "gate_logits": np.shape(svars.gate_logits),
    }
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise UserError(f"search vars do not fit {cfg.name!r}: {name} has shape {got[name]}, expected {shape}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget < 1):
        raise UserError(f"budget must be a FLOPs ratio strictly between 0 and 1, got {budget!r}")
    if not (math.isfinite(tolerance) and 0 < tolerance < budget):
        raise UserError(f"tolerance must be in (0, budget), got {tolerance}")
    if select not in SELECT:
        raise UserError(f"select must be one of {SELECT}, got {select!r}")
    if select in ("diversity", "l2") and teacher_params is None:
        raise UserError(f"select={select!r} runs on the teacher's fc1 kernels: pass teacher_params")
    if select == "taylor" and (scores is None or len(scores) != cfg.depth):
        raise UserError(f"select='taylor' needs scores: one (M,) importance array per layer ({cfg.depth})")


def extract(
    cfg: ModelConfig,
    params: Params,
    svars: SearchVars,
    budget: float,
    *,
    select: str = "uvc",
    teacher_params: Params | None = None,
    scores: Sequence[Any] | None = None,
    seed: int = 0,
    no_skip: bool = False,
    repair: bool = True,
    tolerance: float = 0.02,
) -> Extraction:
    """The Plan (one UnitPlan per original layer) of a searched model; see the module docstring.

    params: the searched weights (full shapes); svars: the search's counts and gate logits. With repair=False the
    plan is the rounded search result as is (ratio == ratio_searched).
    """
    _check(cfg, svars, budget, select, teacher_params, scores, tolerance)
    n, h, d, m = cfg.depth, cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    norms = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), group_norms(cfg, params))
    logits = np.asarray(svars.gate_logits)
    keep_block = np.ones(n, bool) if no_skip else logits[:, 1] >= logits[:, 0]
    head_keep = _rank(norms.heads) >= _rounded(svars.counts.heads, h)[:, None]
    widths = _Widths(
        keep_block, head_keep.astype(np.int64), _rounded(svars.counts.dims, d), _rounded(svars.counts.neurons, m)
    )
    total = count_flops(cfg)
    ratio_searched = _flops(cfg, widths) / total
    removed = restored = 0
    structure = (0, 0)
    if repair:
        structure = _fit_structure(cfg, widths, logits[:, 1] - logits[:, 0], norms.heads, budget, tolerance)
        removed, restored = _repair(cfg, widths, norms.dims, norms.neurons, budget, tolerance)
    keep_block, head_keep = widths.keep_block, widths.head_keep.astype(bool)

    dim_rank, neuron_rank = _rank(norms.dims), _rank(norms.neurons)
    plan = []
    for layer in range(n):
        if not keep_block[layer]:
            plan.append(UnitPlan(keep_block=False, heads=(), dims=(), neurons=()))
            continue
        heads = tuple(int(i) for i in np.flatnonzero(head_keep[layer]))
        dims = tuple(tuple(int(j) for j in np.flatnonzero(dim_rank[layer, i] >= widths.dims[layer, i])) for i in heads)
        k = int(m - widths.neurons[layer])
        if select == "uvc":
            kept = np.flatnonzero(neuron_rank[layer] >= widths.neurons[layer])
        else:
            matrix = selection_matrix(cfg, _layer_mlp(teacher_params if teacher_params is not None else params, layer))
            layer_scores = None if scores is None else scores[layer]
            kept = select_neurons(matrix, k, select, seed=seed + layer, scores=layer_scores)
        plan.append(UnitPlan(keep_block=True, heads=heads, dims=dims, neurons=tuple(int(i) for i in np.sort(kept))))
    plan = tuple(plan)
    return Extraction(plan, float(budget), ratio_searched, _flops(cfg, widths) / total, removed, restored, *structure)
