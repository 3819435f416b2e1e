"""The figures: a run's curves.png draws exactly its metrics.jsonl, UVC's curves show the budget, the demo's
legend covers no bar, and a figure that cannot be drawn is one warning line, never the end of a run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dgmr_jax.core.paths import as_path
from dgmr_jax.demo.run import demo_figure
from dgmr_jax.train.logs import CURVES_FILE, curves_figure, read_rows, write_curves
from dgmr_jax.uvc.stage import search_curves_figure

TRAIN = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "ratio": 0.9, "ratio_hard": 0.8, "z": s / 10} for s in (2, 4, 6)]
EVALS = [
    {"step": 3, "eval/knn/knn@10": 0.5, "eval/knn/knn@20": 0.55},
    {"step": 6, "eval/knn/knn@10": 0.7, "eval/knn/knn@20": 0.75, "eval/probe/top1": 0.6},
]


def _write_metrics(workdir, rows) -> None:
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lines(ax) -> dict[str, tuple[list, list]]:
    """Each labelled line of `ax` as (x, y) lists."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_a_run_draws_exactly_the_rows_of_its_metrics(tmp_path):
    rows = [TRAIN[0], EVALS[0], TRAIN[1], TRAIN[2], EVALS[1]]  # in the order the loop logs them
    _write_metrics(tmp_path, rows)
    write_curves(as_path(tmp_path), "distill")
    with Image.open(tmp_path / CURVES_FILE) as png:
        assert png.format == "PNG" and png.size[0] > 500

    fig = curves_figure(read_rows(tmp_path / "metrics.jsonl"))
    loss, evals = fig.axes
    assert [line.get_xdata().tolist() for line in loss.get_lines()] == [[2, 4, 6]]
    assert [line.get_ydata().tolist() for line in loss.get_lines()] == [[1.0 / 2, 1.0 / 4, 1.0 / 6]]
    assert loss.get_yscale() == "log"
    assert _lines(evals) == {
        "knn/knn@10": ([3, 6], [0.5, 0.7]),
        "knn/knn@20": ([3, 6], [0.55, 0.75]),
        "probe/top1": ([6], [0.6]),  # only where it was measured
    }
    assert [t.get_text() for t in evals.get_legend().get_texts()] == ["knn/knn@10", "knn/knn@20", "probe/top1"]
    fig.canvas.draw()
    legend = evals.get_legend().get_window_extent()
    assert evals.get_window_extent().x1 < legend.x0 and legend.x1 <= fig.bbox.x1  # beside the lines, in the picture


def test_a_run_without_evaluations_has_one_panel_and_a_negative_loss_a_linear_axis():
    rows = [{"step": 1, "loss": -0.5}, {"step": 2, "loss": 0.25}]
    fig = curves_figure(rows)
    assert len(fig.axes) == 1 and fig.axes[0].get_yscale() == "linear"
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == [-0.5, 0.25]


def test_a_figure_that_cannot_be_drawn_is_one_warning_line(tmp_path, capsys):
    write_curves(as_path(tmp_path), "distill")  # no metrics.jsonl yet (stopped before the first log): nothing
    assert not (tmp_path / CURVES_FILE).exists() and capsys.readouterr().err == ""

    (tmp_path / "metrics.jsonl").write_text(json.dumps(TRAIN[0]) + '\n{"step": 4, "lo')  # a torn last row
    write_curves(as_path(tmp_path), "distill")
    err = capsys.readouterr().err
    assert err.startswith("distill: warning: curves.png not drawn (JSONDecodeError: ") and err.count("\n") == 1
    assert not (tmp_path / CURVES_FILE).exists()


def test_uvc_curves_draw_the_budget_on_the_ratio_panel():
    fig = search_curves_figure([*TRAIN, EVALS[1]], 0.35)  # evaluation rows hold no ratio: left out
    ratio, z = fig.axes
    lines = _lines(ratio)
    assert lines["budget 0.35"][1] == [0.35, 0.35]  # a horizontal line at the budget
    assert lines["R (argmax gates, rounded counts)"] == ([2, 4, 6], [0.8, 0.8, 0.8])
    assert "budget 0.35" in [t.get_text() for t in ratio.get_legend().get_texts()]
    fig.canvas.draw()
    legend = ratio.get_legend().get_window_extent()
    assert legend.y1 < ratio.get_window_extent().y0 and legend.y0 >= 0  # below the panel: it hides no line
    assert z.get_lines()[0].get_ydata().tolist() == [0.2, 0.4, 0.6]


@pytest.mark.parametrize("methods", [("diversity", "l2"), ("diversity", "l2", "random", "uvc", "uvc+diversity")])
def test_the_demo_legend_covers_no_bar(methods):
    curves = {m: [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)] for m in methods}
    rows = [{"model": "teacher", "knn@20": 0.95}]
    for i, method in enumerate(methods):  # tall bars: where a legend inside the axes would sit
        rows += [{"model": f"{method} (pruned)", "knn@20": 0.9 - 0.01 * i}, {"model": method, "knn@20": 0.94}]
    fig = demo_figure(curves, rows)
    fig.canvas.draw()
    acc = fig.axes[1]
    legend = acc.get_legend().get_window_extent()
    bars = [bar.get_window_extent() for bar in acc.patches]
    assert len(bars) == 2 * len(methods)
    assert not any(legend.overlaps(bar) for bar in bars)
    labels = [label.get_window_extent() for label in acc.get_xticklabels()]
    assert not any(legend.overlaps(label) for label in labels)  # below the method names, inside the picture
    assert legend.y1 < min(label.y0 for label in labels) and legend.y0 >= 0
