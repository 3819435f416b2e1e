"""Bad training input fails before any long work, says what to change, and loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from dgmr_jax.cli import main
from dgmr_jax.io.model_dir import restore_numpy
from dgmr_jax.model_dir import load_config, load_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    for name in ("broken1.jpg", "broken2.jpg"):
        (root / name).write_bytes(b"\xff\xd8 truncated")
    (root / "labels.csv").write_text("a,b\n")
    return root


def _distill(workdir, *overrides):
    """The tests' recipe against a random-init teacher (asked for explicitly, as a run must)."""
    argv = ["distill", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.random_init=true"]
    return main([*argv, *overrides])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--config.global_batch=6"], "global batch 6 does not divide the data-parallel size data*fsdp=8"),
        (["--config.mesh.data=4", "--config.mesh.fsdp=4"], "needs 16 devices but 8 are available"),
        (["--config.optim.nope=1"], "unknown config field 'config.optim.nope'"),
        (["--config.data.kind=csv"], "unknown data.kind 'csv'"),
    ],
)
def test_bad_settings_fail_early(images, tmp_path, capsys, overrides, message):
    assert _distill(tmp_path / "run", f"--config.data.path={images}", *overrides) == 2
    assert message in capsys.readouterr().err


def test_a_forgotten_teacher_is_an_error_not_a_random_teacher(images, tmp_path):
    """The tests' recipe names no teacher weights: without --config.teacher.random_init=true the command says what
    to set, in one line, before anything is written."""
    argv = ["distill", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"--config.data.path={images}"]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: config.teacher has no weights: set --config.teacher.model_dir=DIR (a `dgmr-jax "
        "convert` output), or --config.teacher.random_init=true to distill from a random init of "
        "vit_tiny_patch16_224 (tests, benchmarks)"
    )
    assert not (tmp_path / "run").exists()


def test_data_path_is_required(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # never an implicit current directory, even one full of images
    assert _distill(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "data.path is empty: set --config.data.path= to an image folder (data.kind=folder)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_with_other_inputs_fails_in_one_line_and_keeps_the_workdir(images, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _distill(workdir, f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(other / f"{i}.png")
    assert _distill(workdir, f"--config.data.path={other}", "--config.teacher.seed=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 600, err
    assert f"workdir {workdir} holds a run with other inputs (teacher: " in err
    assert 'seed 0" -> ' in err and f"data: \"ImageFolderSource(root='{images}', num_images=18)\" -> " in err
    assert "to start fresh use a new --workdir" in err
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@pytest.mark.slow
def test_student_model_directories(images, tmp_path, capsys):
    """The end of a run, --export-every and --from-checkpoint all write model directories of the same
    student; --ema exports the EMA weights, and asking for EMA without one fails before training."""
    workdir = tmp_path / "run"
    args = [f"--config.data.path={images}", "--config.optim.total_steps=8", "--config.optim.ema_decay=0.5"]
    assert _distill(workdir, *args, "--export-every", "4", "--ema") == 0
    out = capsys.readouterr().out
    assert "distill done at step 8 (loss " in out and f"model directory {workdir / 'model'}, metrics " in out
    cfg, final = load_model(workdir / "model")
    meta = load_config(workdir / "model")[1]
    assert meta["distilled"] == {"workdir": str(workdir), "step": 8, "weights": "ema"}
    assert meta["preprocess"]["img_size"] == 32 and meta["pruned"]["method"] == "diversity"
    assert load_config(workdir / "models" / "step_4")[1]["distilled"]["step"] == 4

    for ema in (True, False):
        target = tmp_path / f"from8_{ema}"
        argv = ["distill", "--workdir", str(workdir), "--from-checkpoint", "8", "--out", str(target)]
        assert main(argv + (["--ema"] if ema else [])) == 0
        cfg8, params8 = load_model(target)
        assert cfg8 == cfg
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(final), strict=True))
        assert same == ema  # the EMA export equals the end-of-run model; the raw weights differ from it
    assert main(["distill", "--workdir", str(workdir), "--from-checkpoint", "5"]) == 2
    assert "--from-checkpoint 5: " in capsys.readouterr().err
    assert main(["distill", "--workdir", str(workdir), "--from-checkpoint", "4"]) == 2  # models/step_4 exists
    assert "already exists" in capsys.readouterr().err

    assert _distill(tmp_path / "run2", f"--config.data.path={images}", "--ema") == 2
    assert "needs an EMA: set --config.optim.ema_decay" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_export_and_eval_point_from_a_workdir_to_its_model(images, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _distill(workdir, f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    for target in (workdir, workdir / "checkpoints" / "4"):
        assert main(["export", "--model", str(target), "--out", str(tmp_path / "x.safetensors")]) == 2
        assert f"its student is the model directory {workdir / 'model'}" in capsys.readouterr().err
    assert main(["export", "--model", str(workdir / "model"), "--out", str(tmp_path / "x.safetensors")]) == 0


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _distill(tmp_path / "run", f"--config.data.path={tmp_path / 'empty'}") == 2
    assert "no image files found under" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_files_are_counted_not_fatal(images, tmp_path):
    assert _distill(tmp_path / "run", f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_files"] > 0
    assert (tmp_path / "run" / "tensorboard").is_dir()


def _cli(workdir: Path, images: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The tests' recipe run as a user runs it: `dgmr-jax distill` in a fresh process."""
    argv = ["distill", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.random_init=true"]
    argv += [f"--config.data.path={images}", *overrides]
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, timeout=600)


def _saved(workdir: Path) -> dict[int, dict]:
    """Step -> params of every checkpoint left in the workdir."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return {s: restore_numpy(workdir / "checkpoints" / str(s) / "state", ["params"])["params"] for s in steps}


def _sane(params: dict) -> bool:
    return all(np.isfinite(x).all() and np.abs(x).max() < 100 for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_diverged_state_is_never_kept_and_the_advice_works(images, tmp_path):
    """A step whose own params give a NaN loss is deleted, not kept as "the last good checkpoint"; the message
    names the step a rerun starts from, and the rerun it advises (a lower lr, or clipping) works."""
    workdir = tmp_path / "run"
    # a fresh run also saves step 1 (Orbax's first save): its params are already 1e33 here
    run = _cli(
        workdir, images, "--config.optim.total_steps=8", "--config.optim.base_lr=1e35", "--config.optim.warmup_steps=0"
    )
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: loss is nan at step 2 (the loss of the params saved at step 1: that checkpoint "
        "is deleted); stopped, no checkpoint is left. Lower optim.base_lr (or set optim.clip_norm) and rerun with "
        "the same --workdir: it starts from step 0"
    )
    assert _saved(workdir) == {}

    run = _cli(workdir, images, "--config.optim.total_steps=8")  # the recipe's lr
    assert run.returncode == 0 and "resuming" not in run.stdout
    assert list(_saved(workdir)) == [1, 4, 8]

    # extended with an absurd lr and a save every step: step 9 is saved, and its params' loss is read at step 10
    lr = ["--config.optim.base_lr=1e30", "--config.optim.warmup_steps=0", "--config.checkpoint_every=1"]
    run = _cli(workdir, images, "--config.optim.total_steps=16", *lr)
    assert run.returncode == 3
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: loss is nan at step 10 (the loss of the params saved at step 9: that checkpoint "
        "is deleted); stopped, the last good checkpoint is step 8. Lower optim.base_lr (or set optim.clip_norm) "
        "and rerun with the same --workdir: it resumes from step 8"
    )
    saved = _saved(workdir)
    assert list(saved) == [4, 8] and all(_sane(params) for params in saved.values())  # 1 went to keep=3

    run = _cli(workdir, images, "--config.optim.total_steps=16", "--config.optim.clip_norm=1.0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "distill: resuming from step 8 of 16" in run.stdout
    saved = _saved(workdir)
    assert list(saved) == [8, 12, 16] and all(_sane(params) for params in saved.values())
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 17, 2))


DISTILL_RECIPES = sorted(p.name for p in Path(CONFIG).parent.glob("*.py") if not p.name.startswith("text_"))


@pytest.mark.parametrize("recipe", DISTILL_RECIPES)
def test_every_recipe_loads_with_known_fields(recipe):
    from dgmr_jax.core import config_file
    from dgmr_jax.train.run import optim_config

    config = config_file.load(str(Path(CONFIG).parent / recipe))
    opt = optim_config(config)
    assert 0 <= opt.warmup_steps < opt.total_steps and config.global_batch > 0
    assert config.distill.tap in ("output", "raw")
