"""Running `dgmr-jax distill` again on a workdir: a finished run writes nothing, a run that never saved a step
pins nothing, and the same inputs typed another way from another folder resume."""

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

import dgmr_jax as dj
from dgmr_jax.core.paths import canonical
from dgmr_jax.model_dir import save_model
from dgmr_jax.train.workdir import same_input

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")


def _images(root: Path, count: int, seed: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """work/vit_tiny: a random-init 2-layer ViT-Ti model directory at 32 px (the teacher); work/imgs, other: images."""
    root = tmp_path_factory.mktemp("reruns")
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    save_model(root / "work" / "vit_tiny", cfg, jax.device_get(dj.models.init_params(cfg, 0)), family="timm")
    _images(root / "work" / "imgs", 16, 0)
    _images(root / "other", 8, 1)
    return root


def _distill(workdir: Path, *overrides: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The distill command in a process of its own (one CPU device), from `cwd`."""
    argv = [sys.executable, "-m", "dgmr_jax.cli", "distill", "--config", CONFIG, "--workdir", str(workdir)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([*argv, *overrides], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _listing(workdir: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(workdir)), p.stat().st_size) for p in workdir.rglob("*"))


@pytest.mark.slow  # runs the distill command two or three times
def test_rerun_of_a_finished_run_writes_nothing(root, tmp_path):
    workdir = tmp_path / "run"
    argv = [f"--config.data.path={root / 'work' / 'imgs'}", "--config.teacher.random_init=true"]
    assert _distill(workdir, *argv, "--config.optim.total_steps=4").returncode == 0
    before = _listing(workdir)
    again = _distill(workdir, *argv, "--config.optim.total_steps=4")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"distill: already finished: step 4 of 4 is saved in {workdir}\n" in again.stdout
    assert f"distill done at step 4: model directory {workdir / 'model'}" in again.stdout
    assert _listing(workdir) == before  # no TensorBoard file, no log row, no checkpoint


@pytest.mark.slow  # runs the distill command two or three times
def test_run_json_of_a_run_that_never_saved_a_step_pins_nothing(root, tmp_path):
    """A run that fails after writing run.json but before its first saved step (here: an eval set that does not
    exist) leaves the workdir open to a corrected rerun with other inputs, which records those."""
    workdir = tmp_path / "run"
    failed = _distill(
        workdir,
        f"--config.data.path={root / 'work' / 'imgs'}",
        "--config.teacher.random_init=true",
        f"--config.evals=['knn:{tmp_path / 'no_such_set'}']",
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    # run.json, and the compile cache of the step it compiled (a cache, not a record of the run)
    assert {p.name for p in workdir.iterdir()} - {"compile_cache"} == {"run.json"}
    fixed = _distill(
        workdir,
        f"--config.data.path={root / 'other'}",
        f"--config.teacher.model_dir={root / 'work' / 'vit_tiny'}",
        "--config.optim.total_steps=2",
    )
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    signature = json.loads((workdir / "run.json").read_text())["signature"]
    assert signature["teacher"] == str(root / "work" / "vit_tiny")
    assert signature["data"] == f"ImageFolderSource(root='{root / 'other'}', num_images=8)"


@pytest.mark.slow  # runs the distill command two or three times
def test_same_inputs_typed_from_another_folder_resume(root, tmp_path):
    """`vit_tiny` typed in work/ and `work/vit_tiny/` typed in its parent are one teacher: the run started from
    work/ resumes from the parent (run.json records resolved paths)."""
    workdir = tmp_path / "run"
    first = _distill(
        workdir,
        "--config.data.path=imgs",
        "--config.teacher.model_dir=vit_tiny",
        "--config.optim.total_steps=2",
        cwd=root / "work",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((workdir / "run.json").read_text())["signature"]["teacher"] == str(root / "work" / "vit_tiny")
    more = [
        "--config.data.path=work/imgs/",
        "--config.teacher.model_dir=work/vit_tiny/",
        "--config.optim.total_steps=4",
    ]
    resumed = _distill(workdir, *more, cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"distill: resuming from step 2 of 4 ({workdir})" in resumed.stdout
    assert "distill done at step 4" in resumed.stdout


@pytest.mark.slow  # runs the distill command two or three times
def test_run_json_of_an_older_version_with_a_relative_path(root, tmp_path):
    """A run.json written before paths were resolved holds `vit_tiny` as typed: a resume typed the same way from
    the folder it started in still matches; from elsewhere the record cannot say what it meant, and the resume
    is refused in one line."""
    workdir = tmp_path / "run"
    argv = ["--config.data.path=imgs", "--config.teacher.model_dir=vit_tiny"]
    assert _distill(workdir, *argv, "--config.optim.total_steps=2", cwd=root / "work").returncode == 0
    record = json.loads((workdir / "run.json").read_text())
    record["signature"]["teacher"] = "vit_tiny"  # as the older version recorded it
    (workdir / "run.json").write_text(json.dumps(record))
    elsewhere = ["--config.data.path=work/imgs", "--config.teacher.model_dir=work/vit_tiny"]
    refused = _distill(workdir, *elsewhere, "--config.optim.total_steps=4", cwd=root)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert f"holds a run with other inputs (teacher: 'vit_tiny' -> '{root / 'work' / 'vit_tiny'}')" in refused.stderr
    resumed = _distill(workdir, *argv, "--config.optim.total_steps=4", cwd=root / "work")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"distill: resuming from step 2 of 4 ({workdir})" in resumed.stdout


def test_older_records_of_relative_paths_match_from_the_folder_they_were_typed_in(tmp_path, monkeypatch):
    """A relative path an older run.json holds, alone or in a data source's description, names what it names
    from the current folder; anything else recorded still has to be equal."""
    monkeypatch.chdir(tmp_path)
    shards = f"ArrayRecordSource(paths=['{tmp_path}/d/a.array_record', '{tmp_path}/d/b.array_record'], num_records=9)"
    assert same_input("ArrayRecordSource(paths=['d/a.array_record', 'd/b.array_record'], num_records=9)", shards)
    assert not same_input("ArrayRecordSource(paths=['d/a.array_record', 'd/b.array_record'], num_records=8)", shards)
    assert not same_input("ArrayRecordSource(paths=['a.array_record', 'd/b.array_record'], num_records=9)", shards)
    assert same_input("vit_tiny", canonical("vit_tiny")) and canonical("vit_tiny") == str(tmp_path / "vit_tiny")
    assert same_input("gs://bucket/model/", canonical("gs://bucket/model")) and canonical("preset:vit") == "preset:vit"
    assert not same_input("vit_small", canonical("vit_tiny")) and not same_input(8, 16)
