"""In-loop evaluation (config.evals): on 8 fake devices it equals `dgmr-jax eval` of the exported students, it is
logged with its best step, and bad settings fail before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgmr_jax.cli import main
from dgmr_jax.core import config_file
from dgmr_jax.distill.trainer import train
from dgmr_jax.train.run import run_task
from dgmr_jax.uvc.config import with_search
from dgmr_jax.uvc.stage import SearchTask

RECIPE = str(Path(__file__).parents[1] / "configs" / "cpu_tiny.py")


def _config(**changes):
    config = config_file.load(RECIPE)
    config.teacher.random_init = True
    config.data.update(kind="mnist5k")
    config.update(changes)
    return config


def _offline(model_dir: Path, out: Path) -> dict:
    args = ["eval", "--model", str(model_dir), "--train", "mnist5k", "--test", "mnist5k", "--img-size", "32"]
    assert main([*args, "--batch", "64", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_in_loop_knn_and_probe_equal_offline_eval_of_the_exported_students(tmp_path):
    evals = ["knn:mnist5k", {"kind": "linear_probe", "train": "mnist5k", "name": "probe"}]
    summary = train(_config(evals=evals, eval_every=6, export_every=6), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in rows if "eval/knn/knn@20" in r}
    assert sorted(evaluated) == [6, 12]
    for step, model_dir in ((6, tmp_path / "run" / "models" / "step_6"), (12, summary["model_dir"])):
        offline = _offline(model_dir, tmp_path / f"offline_{step}.json")
        in_loop = {k: v for k, v in evaluated[step].items() if k.startswith("eval/knn/")}
        assert in_loop == {f"eval/knn/knn@{k}": v for k, v in offline["knn"].items()}
        assert evaluated[step]["eval/probe/top1"] == offline["linear_probe"]["top1"]
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    scores = {step: r["eval/knn/knn@20"] for step, r in evaluated.items()}
    assert best == {"metric": "eval/knn/knn@20", "value": max(scores.values()), "step": max(scores, key=scores.get)}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"evals": ["knn"]}, 'write "KIND:DATA"'),
        ({"evals": ["nearest:mnist5k"]}, "kind must be one of knn, linear_probe, zeroshot, retrieval"),
        ({"evals": [{"kind": "knn", "data": "mnist5k"}]}, "unknown keys ['data']"),
        ({"evals": [{"kind": "zeroshot", "test": "mnist5k"}]}, "set clip_text="),
        ({"evals": ["knn:mnist5k"], "eval_best": "eval/probe/top1"}, "names no eval"),
        ({"eval_every": 5}, "need evaluations"),
        ({"evals": ["knn:mnist5k"], "eval_every": -1}, "must be >= 0"),
    ],
)
def test_bad_eval_settings_fail_before_anything_loads(tmp_path, changes, message):
    with pytest.raises(ValueError, match=None) as err:
        train(_config(**changes), tmp_path / "run")
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_uvc_search_refuses_in_loop_evals(tmp_path):
    config = with_search(_config(evals=["knn:mnist5k"]))
    config.uvc.budget = 0.5
    with pytest.raises(ValueError, match="no student to evaluate in the loop"):
        run_task(SearchTask(), config, tmp_path / "run")


def test_a_missing_eval_set_fails_before_the_first_step(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(_config(evals=[f"knn:{tmp_path / 'nowhere'}"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
