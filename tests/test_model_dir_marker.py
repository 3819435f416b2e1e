"""A model directory is complete only with its COMPLETE.json, written last: every reader refuses one without it
(or with a listed file missing or short) in one line, and every writer replaces such a directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from gcs_emulator import gcs_emulator, gcs_objects
from PIL import Image

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.io.checkpoint_io import CheckpointError
from dgmr_jax.model_dir import check_new_dir, load_config, load_model, load_params, save_model
from dgmr_jax.models.tree import flatten

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")
NO_MARKER = (
    "it has no COMPLETE.json, the marker a model directory gets once every file is written (its writer was "
    "interrupted, or it predates the marker)"
)
RERUN = "rerun the command that wrote it (it replaces an incomplete directory)"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A complete 2-block model directory, copied by each test before it damages it."""
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    params = jax.device_get(dj.models.init_params(cfg, 0))
    return save_model(tmp_path_factory.mktemp("saved") / "m", cfg, params, family="timm"), cfg, params


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _no_marker(d: Path) -> str:
    (d / "COMPLETE.json").unlink()
    return NO_MARKER


def _listed(d) -> int:
    return len(json.loads((d / "COMPLETE.json").read_text())["files"])


def _block_missing(d: Path) -> str:  # a third of the arrays: what an interrupted gs:// copy leaves
    shutil.rmtree(d / "params" / "blocks_1")
    return f"params/blocks_1/_CHECKPOINT_METADATA is missing (COMPLETE.json lists {_listed(d)} files)"


def _short_file(d: Path) -> str:
    big = _largest(d / "params" / "blocks_0")
    size = big.stat().st_size
    with big.open("r+b") as f:
        f.truncate(size // 2)
    return f"{big.relative_to(d).as_posix()} has {size // 2} bytes, COMPLETE.json says {size}"


DAMAGE = {"no marker": _no_marker, "block missing": _block_missing, "short file": _short_file}


@pytest.fixture(params=list(DAMAGE))
def damaged(request, saved, tmp_path):
    """(directory, the reason its error gives) for each kind of damage."""
    directory = tmp_path / "m"
    shutil.copytree(saved[0], directory)
    return directory, DAMAGE[request.param](directory)


def test_a_saved_directory_lists_every_file_with_its_size(saved):
    directory = Path(saved[0])
    listed = json.loads((directory / "COMPLETE.json").read_text())["files"]
    on_disk = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    assert listed == {k: v for k, v in on_disk.items() if k != "COMPLETE.json"}
    assert "config.json" in listed and "params/blocks_1/_METADATA" in listed
    assert not (directory.parent / ".m.partial").exists()


def test_every_reader_refuses_an_incomplete_directory(damaged):
    directory, reason = damaged
    message = f"model directory {directory} is incomplete: {reason}"
    readers = [
        lambda: load_config(directory),
        lambda: load_params(directory),
        lambda: load_params(directory, {"blocks_0": None}),
        lambda: load_model(directory),
        lambda: dj.open_model(directory),
        lambda: dj.open_model(str(directory)).load(),
    ]
    for read in readers:
        with pytest.raises(CheckpointError) as err:
            read()
        assert str(err.value) == f"{message}; {RERUN}"


def test_a_directory_damaged_after_opening_is_refused_block_by_block(saved, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(saved[0], directory)
    source = dj.open_model(directory)
    shutil.rmtree(directory / "params" / "blocks_1")
    with pytest.raises(CheckpointError, match="params/blocks_1/_CHECKPOINT_METADATA is missing"):
        source.block(1)


def test_commands_refuse_an_incomplete_model_in_one_line(saved, tmp_path, capsys):
    directory = tmp_path / "m"
    shutil.copytree(saved[0], directory)
    reason = _block_missing(directory)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(images / "0.png")
    first = f"error: model directory {directory} is incomplete: {reason}; {RERUN}"
    commands = {
        "export": ["export", "--model", str(directory), "--out", str(tmp_path / "x.safetensors")],
        "eval": ["eval", "--model", str(directory), "--train", "mnist5k", "--test", "mnist5k"],
        "prune": ["prune", "--model", str(directory), "--out", str(tmp_path / "slim"), "--mlp-ratio", "1"],
        "distill": [
            "distill",
            "--config",
            CONFIG,
            "--workdir",
            str(tmp_path / "run"),
            f"--config.teacher.model_dir={directory}",
            f"--config.data.path={images}",
        ],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert capsys.readouterr().err == f"dgmr-jax {name}: {first}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "m"]  # nothing written


def test_the_command_line_refuses_a_directory_without_marker(saved, tmp_path):
    """As a user meets it: `dgmr-jax export` of a directory whose writer never got to the marker."""
    directory = tmp_path / "m"
    shutil.copytree(saved[0], directory)
    (directory / "COMPLETE.json").unlink()
    argv = ["export", "--model", str(directory), "--out", str(tmp_path / "x.safetensors")]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"dgmr-jax export: error: model directory {directory} is incomplete: it has no COMPLETE.json, the marker a "
        "model directory gets once every file is written (its writer was interrupted, or it predates the marker); "
        "rerun the command that wrote it (it replaces an incomplete directory)"
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_a_missing_directory_is_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model directory: config.json is missing"):
        load_config(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a model directory: config.json is missing"):
        load_params(tmp_path / "other")


def test_a_writer_replaces_an_incomplete_directory_and_keeps_anything_else(damaged, saved, capsys):
    directory, reason = damaged
    _, cfg, params = saved
    assert check_new_dir(directory) == dj.core.paths.as_path(directory)  # no "already exists": it gets replaced
    save_model(directory, cfg, params, family="timm")
    assert capsys.readouterr().out == f"replacing the incomplete model directory {directory}: {reason}\n"
    loaded_cfg, loaded = load_model(directory)
    assert loaded_cfg == cfg
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded)[key], value)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):  # complete now: kept
        save_model(directory, cfg, params)
    (directory / "COMPLETE.json").unlink()
    (directory / "notes.txt").write_text("mine")  # not only a model directory's entries: never removed
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        check_new_dir(directory)


@pytest.mark.slow
def test_a_finished_run_re_exports_a_damaged_model(tmp_path, capsys):
    """A rerun of a finished distillation writes WORKDIR/model again when it is incomplete (and only then)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 256, (36, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    workdir = tmp_path / "run"
    argv = ["distill", "--config", CONFIG, "--workdir", str(workdir), "--config.teacher.random_init=true"]
    argv += [f"--config.data.path={images}", "--config.optim.total_steps=4"]
    assert main(argv) == 0
    model = workdir / "model"
    _, before = load_model(model)
    shutil.rmtree(model / "params" / "blocks_1")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"replacing the incomplete model directory {model}: params/blocks_1/_CHECKPOINT_METADATA is missing" in out
    assert load_config(model)[1]["distilled"]["step"] == 4
    _, after = load_model(model)
    for key, value in flatten(before).items():
        np.testing.assert_array_equal(flatten(after)[key], value)
    marker = (model / "COMPLETE.json").read_text()
    assert main(argv) == 0  # complete: left as it is
    assert "replacing" not in capsys.readouterr().out and (model / "COMPLETE.json").read_text() == marker


@pytest.mark.emulator
def test_on_cloud_storage_a_partly_published_directory_is_refused_and_replaced(saved):
    """gs:// renames object by object: a directory missing a third of its arrays is refused, then rewritten."""
    _, cfg, params = saved
    with gcs_emulator("dgmr-marker") as env:
        directory = "gs://dgmr-marker/m"
        save_model(directory, cfg, params, family="timm")
        path = dj.core.paths.as_path(directory)
        listed = json.loads((path / "COMPLETE.json").read_text())["files"]
        stored = gcs_objects(env, "dgmr-marker", "m/")
        assert {f"m/{k}": v for k, v in listed.items()} == {k: v for k, v in stored.items() if k != "m/COMPLETE.json"}
        assert not gcs_objects(env, "dgmr-marker", ".m.partial/")
        (path / "params" / "blocks_1").rmtree()
        reason = f"params/blocks_1/_CHECKPOINT_METADATA is missing (COMPLETE.json lists {len(listed)} files)"
        with pytest.raises(CheckpointError) as err:
            dj.open_model(directory)
        assert str(err.value) == f"model directory {directory} is incomplete: {reason}; {RERUN}"
        save_model(directory, cfg, params, family="timm")
        assert load_model(directory)[0] == cfg
