"""Bad training input fails before any long work, says what to change, and loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgmr_jax.cli import main

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
    return main(["distill", "--config", CONFIG, "--workdir", str(workdir), *overrides])


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


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _distill(tmp_path / "run", f"--config.data.path={tmp_path / 'empty'}") == 2
    assert "no image files found under" in capsys.readouterr().err


def test_corrupt_files_are_counted_not_fatal(images, tmp_path):
    assert _distill(tmp_path / "run", f"--config.data.path={images}", "--config.optim.total_steps=4") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_files"] > 0
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _distill(workdir, f"--config.data.path={images}", "--config.optim.total_steps=8") == 0
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    # same run extended with an absurd learning rate: the loss blows up after step 8
    code = _distill(
        workdir,
        f"--config.data.path={images}",
        "--config.optim.total_steps=16",
        "--config.optim.base_lr=1e30",
        "--config.optim.warmup_steps=0",
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "stopped without saving" in err and "The last good checkpoint (step 8) is kept" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("recipe", sorted(p.name for p in Path(CONFIG).parent.glob("*.py") if p.name != "common.py"))
def test_every_recipe_loads_with_known_fields(recipe):
    from dgmr_jax import config_file
    from dgmr_jax.distill.trainer import optim_config

    config = config_file.load(str(Path(CONFIG).parent / recipe))
    opt = optim_config(config)
    assert 0 <= opt.warmup_steps < opt.total_steps and config.global_batch > 0
    assert config.distill.tap in ("output", "raw")
