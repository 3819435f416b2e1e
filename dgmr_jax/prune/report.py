"""Prune report: per-layer kept widths, cost before/after, and the diversity curve as a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike, as_path
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops, count_params
from dgmr_jax.prune.mlp import LayerReport


def summary(before: ModelConfig, after: ModelConfig) -> dict[str, Any]:
    """Params and GFLOPs (per image) of both configs and the relative savings in percent."""
    p0, p1 = count_params(before), count_params(after)
    f0, f1 = count_flops(before), count_flops(after)
    return {
        "params_before": p0,
        "params_after": p1,
        "params_saved_pct": round(100 * (1 - p1 / p0), 2),
        "gflops_before": round(f0 / 1e9, 3),
        "gflops_after": round(f1 / 1e9, 3),
        "flops_saved_pct": round(100 * (1 - f1 / f0), 2),
    }


def plot_curves(reports: list[LayerReport], path: PathLike) -> epath.Path | None:
    """Residual norm of each greedy pick divided by the first pick's, one line per layer.

    A curve that falls to ~0 well before the kept width says the layer's neurons span few
    directions and can be pruned harder; a flat curve says every kept neuron still adds something.
    """
    curves = [r for r in reports if r.residual_norms is not None and len(r.residual_norms)]
    if not curves:
        return None
    from dgmr_jax.core.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for r in curves:
        norms = np.asarray(r.residual_norms, np.float64)
        ax.plot(norms / max(norms[0], 1e-30), color=cmap(r.layer / max(len(reports) - 1, 1)), lw=1)
    ax.set_xlabel("pick (kept neuron, in selection order)")
    ax.set_ylabel("residual norm / first pick's")
    ax.set_title("Diversity curve per layer (dark: first layer, light: last)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def _cost_line(info: dict[str, Any]) -> str:
    """The report's cost sentence: params and GFLOPs before -> after, with the savings."""
    return (
        f"params {info['params_before'] / 1e6:.2f}M -> {info['params_after'] / 1e6:.2f}M "
        f"(-{info['params_saved_pct']}%), GFLOPs {info['gflops_before']} -> {info['gflops_after']} "
        f"(-{info['flops_saved_pct']}%)"
    )


def write_report(
    directory: PathLike, before: ModelConfig, after: ModelConfig, reports: list[LayerReport], method: str
) -> dict[str, Any]:
    """Write prune_report.json, prune_report.md and (diversity) prune_curves.png; return the summary."""
    directory = as_path(directory)
    info = {"method": method, **summary(before, after)}
    layers = [
        {
            "layer": r.layer,
            "hidden_before": r.hidden_before,
            "hidden_after": r.hidden_after,
            "last_residual_ratio": None
            if r.residual_norms is None
            else float(r.residual_norms[-1] / max(r.residual_norms[0], 1e-30)),
        }
        for r in reports
    ]
    (directory / "prune_report.json").write_text(json.dumps({**info, "layers": layers}, indent=2))
    lines = [
        f"# Prune report ({method})",
        "",
        _cost_line(info),
        "",
        "| layer | hidden before | hidden after | last residual / first |",
        "|---|---|---|---|",
    ]
    for row in layers:
        ratio = "" if row["last_residual_ratio"] is None else f"{row['last_residual_ratio']:.3g}"
        lines.append(f"| {row['layer']} | {row['hidden_before']} | {row['hidden_after']} | {ratio} |")
    (directory / "prune_report.md").write_text("\n".join(lines) + "\n")
    plot_curves(reports, directory / "prune_curves.png")
    return info


def unit_rows(before: ModelConfig, after: ModelConfig, kept_blocks: Sequence[int]) -> list[dict[str, Any]]:
    """One row per ORIGINAL layer of a UVC slim model (after) against its original (before): whether the block is
    kept, heads, value width (sum over heads; per-head widths in "value_dims") and MLP width before and after."""
    if len(kept_blocks) != after.depth:
        raise UserError(f"kept_blocks lists {len(kept_blocks)} blocks but the slim model has depth {after.depth}")
    slim_layer = {old: new for new, old in enumerate(kept_blocks)}
    rows = []
    for i in range(before.depth):
        j = slim_layer.get(i)
        rows.append(
            {
                "layer": i,
                "kept": j is not None,
                "heads_before": before.heads(i),
                "heads_after": 0 if j is None else after.heads(j),
                "value_width_before": sum(before.vdims(i)),
                "value_width_after": 0 if j is None else sum(after.vdims(j)),
                "value_dims": [] if j is None else list(after.vdims(j)),
                "hidden_before": before.mlp_hidden[i],
                "hidden_after": 0 if j is None else after.mlp_hidden[j],
            }
        )
    return rows


def write_unit_report(
    directory: PathLike,
    before: ModelConfig,
    after: ModelConfig,
    kept_blocks: Sequence[int],
    method: str = "uvc",
) -> dict[str, Any]:
    """prune_report.json and prune_report.md of a UVC slim model: the cost summary, then per original layer its
    heads, value widths and MLP width before -> after, removed blocks marked; return the summary."""
    directory = as_path(directory)
    rows = unit_rows(before, after, kept_blocks)
    info = {"method": method, **summary(before, after), "removed_blocks": [r["layer"] for r in rows if not r["kept"]]}
    (directory / "prune_report.json").write_text(json.dumps({**info, "layers": rows}, indent=2))
    lines = [
        f"# Prune report ({method})",
        "",
        f"{_cost_line(info)}; removed blocks: {info['removed_blocks'] or 'none'}",
        "",
        "| layer | heads | value width (per head) | MLP hidden |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if not r["kept"]:
            lines.append(f"| {r['layer']} | removed | removed | removed |")
            continue
        widths = ", ".join(map(str, r["value_dims"]))
        lines.append(
            f"| {r['layer']} | {r['heads_before']} -> {r['heads_after']} | {r['value_width_before']} -> "
            f"{r['value_width_after']} ({widths}) | {r['hidden_before']} -> {r['hidden_after']} |"
        )
    (directory / "prune_report.md").write_text("\n".join(lines) + "\n")
    return info
