"""Sharded start-up: teacher and student go from their model directories onto the mesh shard by shard (each
process reads about its share of the files) and the fresh state is made on the mesh by a jitted init, with
exactly the values and steps of the host path it replaces (whole models on the host, init on one device)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from distill_runs import _env
from reference import random_png_folder

from dgmr_jax import plan as planner
from dgmr_jax.cli import main
from dgmr_jax.core import config_file
from dgmr_jax.core.parallel import batch_sharding
from dgmr_jax.distill.trainer import DistillTask
from dgmr_jax.io.model_dir import load_params, save_model
from dgmr_jax.io.open import open_model
from dgmr_jax.models.tree import in_layout
from dgmr_jax.prune.mlp import prune_mlp
from dgmr_jax.train.run import build_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cpu_tiny.py")


def _model_dirs(root: Path, arch: str, prune: bool, **overrides: int) -> tuple[Path, Path]:
    """A 2-layer random-init teacher of `arch` at 32 px as a model directory, and its student (the teacher pruned
    to prune1, or the teacher's directory itself)."""
    teacher = open_model(f"preset:{arch}", depth=2, img_size=32, **overrides)
    params = teacher.load()
    save_model(root / "teacher", teacher.cfg, params, **teacher.meta)
    if not prune:
        return root / "teacher", root / "teacher"
    cfg, student = prune_mlp(teacher.cfg, params, mlp_ratio=1.0)
    save_model(root / "student", cfg, student, **teacher.meta)
    return root / "teacher", root / "student"


def _config(teacher: Path, student: Path, images: Path):
    config = config_file.load(CONFIG)
    config.teacher.model_dir, config.student.model_dir = str(teacher), str(student)
    config.data.path = str(images)
    config.teacher.dtype = "bfloat16"  # the cast on restore must round as numpy's astype did
    return config


def _host_path(config, step, teacher: Path, student: Path) -> tuple:
    """(state, teacher) as the run built them before: whole numpy models, init on the default device, device_put."""
    made = DistillTask().make_step(config, step.teacher_cfg, step.student_cfg)
    params = in_layout(load_params(student), step.student_cfg.scan_layers)
    params = jax.tree_util.tree_map(lambda p: p.astype(config.student.param_dtype), params)
    teacher_params = in_layout(load_params(teacher), step.teacher_cfg.scan_layers)
    teacher_params = jax.tree_util.tree_map(lambda p: p.astype(config.teacher.dtype), teacher_params)
    return jax.device_put(made.init(params), step.state_sh), jax.device_put(teacher_params, step.teacher_sh)


def _assert_identical(a, b) -> None:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_sharded_start_is_the_host_path_bit_for_bit_after_init_and_steps(tmp_path, scan):
    """8 devices as (data 2, fsdp 4): model directories (written per layer) placed in either layout, the jitted init
    and three steps from there equal the host path's state, teacher and steps exactly."""
    teacher, student = _model_dirs(tmp_path, "vit_tiny_patch16_224", prune=True)
    config = _config(teacher, student, _images(tmp_path))
    config.mesh.update(data=2, fsdp=4, tensor=1)
    config.teacher.scan_layers = config.student.scan_layers = scan
    run = build_run(DistillTask(), config, tmp_path / "work")
    step = run.step
    state, teacher_params = _host_path(config, step, teacher, student)
    _assert_identical(run.teacher, teacher_params)
    _assert_identical(run.state, state)
    images = jax.device_put(np.random.default_rng(0).random((8, 32, 32, 3), np.float32), batch_sharding(run.mesh))
    sharded = run.state
    for _ in range(3):
        sharded, _ = step.fn(sharded, run.teacher, images)
        state, _ = step.fn(state, teacher_params, images)
    assert int(state.step) == 3
    _assert_identical(sharded, state)


def _images(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir()
    return random_png_folder(folder, n=8)


# one process of the 2-process start-up: build the run, then say what it read and whether it matches the host path
_DRIVER = r"""
import json, sys
import jax, numpy as np, tensorstore as ts
from dgmr_jax.core import config_file
from dgmr_jax.core.parallel import to_host
from dgmr_jax.distill.trainer import DistillTask
from dgmr_jax.io.model_dir import load_params
from dgmr_jax.models.tree import in_layout
from dgmr_jax.train.run import build_run

def bytes_read():
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(value["value"] for metric in metrics for value in metric["values"])

args = json.loads(sys.argv[1])
config = config_file.load(args["config"])
config.update_from_flattened_dict(args["overrides"])
before = bytes_read()
run = build_run(DistillTask(), config, args["workdir"])
read = bytes_read() - before
init = run.step.init.lower(run.step.abstract_student()).compile().memory_analysis()
state, teacher = to_host(run.state), to_host(run.teacher)
made = DistillTask().make_step(config, run.step.teacher_cfg, run.step.student_cfg)
expected = jax.device_get(made.init(in_layout(load_params(args["student"]), False)))
expected_teacher = in_layout(load_params(args["teacher"]), True)
same = lambda a, b: all(
    np.array_equal(x, np.asarray(y).astype(x.dtype))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
)
print(json.dumps({
    "read": read,
    "init_peak": init.argument_size_in_bytes + init.output_size_in_bytes - init.alias_size_in_bytes
    + init.temp_size_in_bytes,
    "state_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(state)),
    "same_state": same(state, expected),
    "same_teacher": same(teacher, expected_teacher),
}))
"""


@pytest.mark.multiprocess
def test_two_processes_read_half_the_model_each_and_start_as_the_host_path(tmp_path):
    """2 processes of 1 device, mesh fsdp=2: each process reads half of the model directories' bytes (TensorStore's
    own count) for a scanned teacher and a per-layer student of the same directory; the gathered state and teacher
    equal the host path's; the init's compiled per-device peak is half the state. (With several devices per
    process, Orbax may read a chunk once per local shard it holds: docs/pod.md, Sharded start-up.)"""
    # 1024 wide, so Orbax's 1 MiB chunks (its divisors of each dimension) split the rows at the 2 processes' halves
    teacher, student = _model_dirs(tmp_path, "vit_large_patch16_224", prune=False, hidden=1024)
    on_disk = sum(f.stat().st_size for f in (teacher / "params").rglob("*") if f.is_file())
    overrides = {
        "teacher.model_dir": str(teacher),
        "student.model_dir": str(student),
        "teacher.scan_layers": True,
        "data.path": str(_images(tmp_path)),
        "mesh.data": 1,
        "mesh.fsdp": 2,
        "global_batch": 2,
    }
    args = {"config": CONFIG, "overrides": overrides, "workdir": str(tmp_path / "work"), "teacher": str(teacher)}
    args["student"] = str(student)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _env(1, DGMR_COORDINATOR=f"localhost:{port}", DGMR_NUM_PROCESSES="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DRIVER, json.dumps(args)],
            env={**env, "DGMR_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["same_state"] and report["same_teacher"]
        assert 0.45 < report["read"] / (2 * on_disk) < 0.55  # teacher and student: the same directory, read twice
        assert report["state_bytes"] / 2 <= report["init_peak"] < 1.05 * report["state_bytes"] / 2


@pytest.mark.slow
def test_plan_reports_the_inits_peak_per_chip(tmp_path, capsys):
    """`dgmr-jax plan` compiles the start-up's init too: over fsdp=8 its per-chip peak is the chip's share of the
    fresh state (params, moments: exact from the shardings), an eighth of the whole state, not all of it."""
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", CONFIG, "--devices", "8", "--config.mesh.data=1", "--config.mesh.fsdp=8"]
    assert main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    share = row["params"] + row["optimizer"] + row["ema"]
    assert share <= row["init"] <= 1.05 * share
    assert 7.5 < row["state_all_chips"] / row["init"] <= 8
    text = capsys.readouterr().out
    assert (
        f"  start-up init (the fresh state made on the mesh), GiB: peak {planner.gib(row['init'])} per chip, of a "
        f"{planner.gib(row['state_all_chips'])} state over all chips"
    ) in text
