"""`dgmr-jax uvc`: the search in the sharded trainer, resume, extraction onto the budget, errors, post-training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.model_dir import load_config, load_model, save_model
from dgmr_jax.models.tree import flatten

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")

# the module fixture writes a model and images (~5 s) and most tests run search stages
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init 2-layer ViT-Ti model directory at 32 px and a folder of 16 noise images."""
    root = tmp_path_factory.mktemp("uvc")
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    save_model(root / "model", cfg, jax.device_get(dj.models.init_params(cfg, 0)), family="timm")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(16):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    return root, cfg


def _uvc(root, workdir, out, *extra, budget="0.5", steps="12"):
    argv = ["uvc", "--config", CONFIG, "--model", str(root / "model"), "--flops-budget", budget]
    argv += ["--train", str(root / "imgs"), "--steps", steps, "--workdir", str(workdir), "--out", str(out)]
    return main([*argv, "--config.uvc.warmup_steps=2", "--config.uvc.count_lr=0.05", *extra])


def _same(a, b) -> bool:
    a, b = flatten(a), flatten(b)
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_search_extracts_onto_the_budget_and_post_trains(setup, tmp_path, capsys):
    root, cfg = setup
    assert _uvc(root, tmp_path / "w", tmp_path / "slim") == 0
    slim_cfg, slim = load_model(tmp_path / "slim")
    meta = load_config(tmp_path / "slim")[1]
    ratio = dj.prune.count_flops(slim_cfg) / dj.prune.count_flops(cfg)
    assert 0.48 <= ratio <= 0.5 and meta["uvc"]["ratio"] == pytest.approx(ratio, abs=1e-12)
    assert 0.47 <= meta["uvc"]["ratio_searched"] <= 0.5  # the search's own plan landed (gate_freeze, land)
    assert meta["uvc"]["budget"] == 0.5 and meta["uvc"]["search"]["step"] == 12
    assert meta["preprocess"]["mean"] == [0.5] * 3  # the published settings travel on
    report = json.loads((tmp_path / "slim" / "prune_report.json").read_text())
    search = json.loads((tmp_path / "slim" / "uvc_report.json").read_text())
    assert len(report["layers"]) == 2 and search["ratio"] == meta["uvc"]["ratio"]
    assert (tmp_path / "slim" / "uvc_curves.png").stat().st_size > 0
    assert (tmp_path / "w" / "curves.png").stat().st_size > 0  # the search's loss, drawn by the train loop
    metrics = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert {"ratio", "ratio_hard", "z"} <= set(metrics[-1]) and metrics[-1]["z"] > metrics[0]["z"]
    out = capsys.readouterr().out
    assert "FLOPs ratio" in out and "searched ->" in out
    assert not (tmp_path / "w" / "model").exists()  # the search's product is the extraction

    # post-training: the slim model directory is a distill student as is
    argv = ["distill", "--config", CONFIG, "--workdir", str(tmp_path / "post"), f"--config.data.path={root / 'imgs'}"]
    argv += [f"--config.teacher.model_dir={root / 'model'}", f"--config.student.model_dir={tmp_path / 'slim'}"]
    assert main([*argv, "--config.optim.total_steps=4"]) == 0
    post_cfg, post = load_model(tmp_path / "post" / "model")
    assert post_cfg == slim_cfg and not _same(post, slim)


def test_resume_continues_the_search_exactly(setup, tmp_path):
    """A search that lost its last checkpoint (a crash after step 4) resumes from step 4, counts, gate logits,
    duals and optimizer states included, and ends bit-identical to the uninterrupted search."""
    root, _ = setup
    assert _uvc(root, tmp_path / "once", tmp_path / "a", steps="8") == 0  # checkpoints at 4 and 8 (cpu_tiny)
    shutil.copytree(tmp_path / "once", tmp_path / "crashed")
    shutil.rmtree(tmp_path / "crashed" / "checkpoints" / "8")
    assert _uvc(root, tmp_path / "crashed", tmp_path / "b", steps="8") == 0
    assert load_config(tmp_path / "a")[0] == load_config(tmp_path / "b")[0]
    assert _same(load_model(tmp_path / "a")[1], load_model(tmp_path / "b")[1])


@pytest.mark.parametrize(
    "extra,budget,message",
    [
        ((), "0", "budget must be a FLOPs ratio strictly between 0 and 1"),
        ((), "1.2", "budget must be a FLOPs ratio strictly between 0 and 1"),
        (("--select", "best"), "0.5", "--select must be one of uvc, diversity, l2, random, taylor"),
    ],
)
def test_bad_input_fails_before_work(setup, tmp_path, capsys, extra, budget, message):
    root, _ = setup
    assert _uvc(root, tmp_path / "w", tmp_path / "slim", *extra, budget=budget) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "slim").exists()


def test_one_head_model_asked_to_drop_heads(setup, tmp_path, capsys):
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32, num_heads=1)
    save_model(tmp_path / "model", cfg, jax.device_get(dj.models.init_params(cfg, 0)), family="timm")
    (tmp_path / "imgs").symlink_to(setup[0] / "imgs")
    assert _uvc(tmp_path, tmp_path / "w", tmp_path / "slim", "--config.uvc.search_heads=true") == 2
    assert "has a single head, which UVC always keeps" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "slim").exists()


def test_resume_with_another_budget_is_refused_and_keeps_the_workdir(setup, tmp_path, capsys):
    root, _ = setup
    assert _uvc(root, tmp_path / "w", tmp_path / "a", steps="4") == 0
    before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
    assert _uvc(root, tmp_path / "w", tmp_path / "b", budget="0.6", steps="8") == 2
    assert "holds a run with other inputs (uvc:" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "w").rglob("*")) == before and not (tmp_path / "b").exists()


def test_logit_distillation_option(setup, tmp_path, capsys):
    """kd_coef adds the paper's logit distillation for towers with a head (ViT-Ti: 1000 classes); a headless
    tower is refused before any work."""
    root, _ = setup
    assert _uvc(root, tmp_path / "w", tmp_path / "slim", "--config.uvc.kd_coef=1.0", steps="4") == 0
    metrics = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss_kd"] > 0 for m in metrics) and all(m["distill"] > m["loss_kd"] for m in metrics)
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=0)
    save_model(tmp_path / "model", cfg, jax.device_get(dj.models.init_params(cfg, 0)), family="timm")
    (tmp_path / "imgs").symlink_to(root / "imgs")
    assert _uvc(tmp_path, tmp_path / "w2", tmp_path / "slim2", "--config.uvc.kd_coef=1.0") == 2
    assert "kd_coef > 0 (logit distillation) needs a classification head" in capsys.readouterr().err
