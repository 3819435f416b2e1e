"""Prune report: per-layer kept widths, cost before/after, and the diversity curve as a PNG."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from etils import epath

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.paths import PathLike, as_path
from dgmr_jax.prune.cost import count_flops, count_params
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    png = io.BytesIO()  # through a buffer: the path may be gs://
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path = as_path(path)
    path.write_bytes(png.getvalue())
    return path


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
        f"params {info['params_before'] / 1e6:.2f}M -> {info['params_after'] / 1e6:.2f}M "
        f"(-{info['params_saved_pct']}%), GFLOPs {info['gflops_before']} -> {info['gflops_after']} "
        f"(-{info['flops_saved_pct']}%)",
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
