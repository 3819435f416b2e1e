"""Bad training input fails before any long work, says what to change, and loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from reference import random_png_folder

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.io.model_dir import restore_numpy
from dgmr_jax.model_dir import load_config, load_model, save_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = random_png_folder(tmp_path_factory.mktemp("imgs"))
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


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """`dgmr-jax ARGV` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True)


def test_a_forgotten_teacher_is_an_error_not_a_random_teacher(images, tmp_path):
    """The tests' recipe names no teacher weights: without --config.teacher.random_init=true the command says what
    to set, in one line, before anything is written."""
    run = _cli("distill", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"--config.data.path={images}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: config.teacher has no weights: set --config.teacher.model_dir=DIR (a `dgmr-jax "
        "convert` output), or --config.teacher.random_init=true to distill from a random init of "
        "vit_tiny_patch16_224 (tests, benchmarks)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "arch, overrides, differs",
    [
        ("vit_small_patch16_224", {}, "token width 192 vs 384, pooled width 192 vs 384"),
        ("vit_tiny_patch16_224", dict(patch_size=8), "patch size 16 vs 8"),
    ],
)
def test_a_student_of_another_model_is_refused_before_anything_is_written(images, tmp_path, arch, overrides, differs):
    """A student that is not a pruned copy of the teacher (another width or patch grid) stops in one line naming both
    models and what differs, and leaves no workdir behind to refuse the corrected rerun."""
    cfg = dj.models.preset(arch, depth=2, img_size=32, **overrides)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), dj.models.param_shapes(cfg))  # no init to compile
    save_model(tmp_path / "student", cfg, zeros, family="timm")
    workdir = tmp_path / "run"
    argv = [f"--config.data.path={images}", f"--config.student.model_dir={tmp_path}/student"]
    run = _cli("distill", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.random_init=true", *argv)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr == (
        f"dgmr-jax distill: error: teacher vit_tiny_patch16_224 (random init) and student {arch} ({tmp_path}/student) "
        f"do not fit one distillation loss (tap 'output'): {differs}; the loss compares their tokens as they are, so "
        "distil a student pruned from this teacher (`dgmr-jax prune --model TEACHER`, or leave "
        "config.student.model_dir empty to prune at start) or a teacher of the student's patch size and widths\n"
    )
    assert not workdir.exists()


def test_an_image_size_off_the_patch_grid_is_refused_before_anything_is_written(images, tmp_path, capsys):
    assert _distill(tmp_path / "run", f"--config.data.path={images}", "--config.data.img_size=40") == 2
    assert capsys.readouterr().err == (
        "dgmr-jax distill: error: data.img_size 40 is not a multiple of the teacher's patch size 16 "
        "(vit_tiny_patch16_224): set --config.data.img_size to a multiple of it (0: the student's 32)\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "few, override, message",
    [
        (
            False,
            "--config.data.max_image_pixels=-1",
            "max_image_pixels must be >= 0 (0: $DGMR_MAX_IMAGE_PIXELS or the default), got -1",
        ),
        (
            True,
            "--config.data.seed=0",
            "each of the 1 shards holds 3 of the 3 records, fewer than one batch of 8: "
            "lower batch_size or shard_count, or add images",
        ),
    ],
)
def test_bad_loader_settings_are_refused_before_anything_is_written(images, tmp_path, capsys, few, override, message):
    """What the loader refuses (settings, too few images for a batch) stops the run before run.json is written, so
    the corrected rerun starts in the same workdir."""
    path = images
    if few:
        path = tmp_path / "few"
        path.mkdir()
        for i in range(3):
            Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(path / f"{i}.png")
    assert _distill(tmp_path / "run", f"--config.data.path={path}", override) == 2
    assert capsys.readouterr().err == f"dgmr-jax distill: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_data_path_is_required(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # never an implicit current directory, even one full of images
    assert _distill(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "data.path is empty: set --config.data.path= to an image folder (data.kind=folder)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_image_over_the_pixel_limit_is_named_once_counted_once_and_read_once_the_limit_is_raised(tmp_path):
    """A 100x100 image over a lowered limit (DGMR_MAX_IMAGE_PIXELS=5000; the default is Pillow's 178,956,970) is
    sampled twice in 5 steps: one warning, one skipped file. Resumed with --config.data.max_image_pixels raised, it
    is read."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    Image.fromarray((rng.random((100, 100, 3)) * 255).astype("uint8")).save(root / "huge.png")  # record 16
    workdir = tmp_path / "run"
    argv = ["distill", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.random_init=true"]
    argv += [f"--config.data.path={root}", "--config.log_indices=true"]
    env = {**os.environ, "DGMR_MAX_IMAGE_PIXELS": "5000"}
    run = subprocess.run(
        [sys.executable, "-m", "dgmr_jax.cli", *argv, "--config.optim.total_steps=5"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    warning = (
        f"skipping unreadable image {root / 'huge.png'} of ImageFolderSource(root='{root}', num_images=17): 100x100 "
        "is 10,000 pixels, over the limit of 5,000: raise it with DGMR_MAX_IMAGE_PIXELS=N (or a recipe's "
        "config.data.max_image_pixels) to read this image\n"
    )
    assert run.stderr.count(warning) == 1 and run.stderr.count("skipping") == 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    seen = [i for line in (workdir / "seen.jsonl").read_text().splitlines() for i in json.loads(line)["index"]]
    assert seen.count(16) >= 2 and rows[-1]["step"] == 5 and rows[-1]["skipped_files"] == 1

    raised = [*argv, "--config.optim.total_steps=8", "--config.data.max_image_pixels=10000"]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *raised], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "skipping" not in run.stderr, run.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    seen = [json.loads(line) for line in (workdir / "seen.jsonl").read_text().splitlines()]
    assert 16 in [i for row in seen if row["step"] > 5 for i in row["index"]]
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_files"] == 1  # counted before the resume; read after it


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


def test_a_truncated_array_record_shard_is_named_before_anything_is_written(tmp_path, capsys):
    from dgmr_jax.data import write_array_record

    for part in range(2):
        write_array_record(tmp_path / f"part-{part}.array_record", [b"x" * 1000] * 20)
    short = tmp_path / "part-1.array_record"
    with short.open("r+b") as f:
        f.truncate(70000)  # an interrupted copy: the footer is gone
    shards = f"--config.data.path={tmp_path / 'part-*.array_record'}"
    assert _distill(tmp_path / "run", "--config.data.kind=array_record", shards) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dgmr-jax distill: error: ArrayRecord file {short} is truncated or damaged (70000 bytes: ")
    assert err.endswith("); write or copy it again\n") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_corrupt_files_are_counted_not_fatal(images, tmp_path):
    assert _distill(tmp_path / "run", f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_files"] > 0
    assert (tmp_path / "run" / "tensorboard").is_dir()


def _tiny_run(workdir: Path, images: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The tests' recipe run as a user runs it (`_cli`), against a random-init teacher."""
    return _cli(
        "distill",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--config.teacher.random_init=true",
        f"--config.data.path={images}",
        *overrides,
    )


def _saved(workdir: Path) -> dict[int, dict]:
    """Step -> params of every checkpoint left in the workdir."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return {s: restore_numpy(workdir / "checkpoints" / str(s) / "state", ["params"])["params"] for s in steps}


def _sane(params: dict) -> bool:
    return all(np.isfinite(x).all() and np.abs(x).max() < 100 for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_run_draws_its_curves_and_a_finished_rerun_draws_nothing_new(images, tmp_path):
    """WORKDIR/curves.png (loss per logged step) is a PNG at the end of a run; rerunning the finished workdir
    steps nowhere and draws nothing."""
    workdir = tmp_path / "run"
    assert _distill(workdir, f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    with Image.open(workdir / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 500
    (workdir / "curves.png").unlink()
    assert _distill(workdir, f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    assert not (workdir / "curves.png").exists()


@pytest.mark.slow
def test_a_diverged_state_is_never_kept_and_the_advice_works(images, tmp_path):
    """A step whose own params give a NaN loss is deleted, not kept as "the last good checkpoint"; the message
    names the step a rerun starts from, and the rerun it advises (a lower lr, or clipping) works."""
    workdir = tmp_path / "run"
    # a fresh run also saves step 1 (Orbax's first save): its params are already 1e33 here
    run = _tiny_run(
        workdir, images, "--config.optim.total_steps=8", "--config.optim.base_lr=1e35", "--config.optim.warmup_steps=0"
    )
    assert run.returncode == 3 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: loss is nan at step 2 (the loss of the params saved at step 1: that checkpoint "
        "is deleted); stopped, no checkpoint is left. Lower optim.base_lr (or set optim.clip_norm) and rerun with "
        "the same --workdir: it starts from step 0"
    )
    assert _saved(workdir) == {}

    run = _tiny_run(workdir, images, "--config.optim.total_steps=8")  # the recipe's lr
    assert run.returncode == 0 and "resuming" not in run.stdout
    assert list(_saved(workdir)) == [1, 4, 8]

    # extended with an absurd lr and a save every step: step 9 is saved, and its params' loss is read at step 10
    lr = ["--config.optim.base_lr=1e30", "--config.optim.warmup_steps=0", "--config.checkpoint_every=1"]
    run = _tiny_run(workdir, images, "--config.optim.total_steps=16", *lr)
    assert run.returncode == 3
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: loss is nan at step 10 (the loss of the params saved at step 9: that checkpoint "
        "is deleted); stopped, the last good checkpoint is step 8. Lower optim.base_lr (or set optim.clip_norm) "
        "and rerun with the same --workdir: it resumes from step 8"
    )
    saved = _saved(workdir)
    assert list(saved) == [4, 8] and all(_sane(params) for params in saved.values())  # 1 went to keep=3

    run = _tiny_run(workdir, images, "--config.optim.total_steps=16", "--config.optim.clip_norm=1.0")
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
