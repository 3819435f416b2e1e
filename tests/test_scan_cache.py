"""Time to first step: scanned teacher and student stacks from the recipe or the command line (same training as
unrolled blocks, model directories per layer either way), plan's FLOPs under scan, the persistent compile cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import random_png_folder

from dgmr_jax import plan as planner
from dgmr_jax.cli import main
from dgmr_jax.core import config_file
from dgmr_jax.model_dir import load_config, load_model, save_model
from dgmr_jax.models import init_params, preset
from dgmr_jax.models.tree import flatten, is_scanned, stack_blocks
from dgmr_jax.train.defaults import loop_defaults

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")
TEACHER = dict(depth=3, img_size=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = random_png_folder(tmp_path_factory.mktemp("imgs"))
    return root


def _argv(workdir: Path, images: Path, *overrides: str) -> list[str]:
    """A 3-step tiny distillation (3-layer teacher) with the given overrides."""
    return [
        "distill",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        f"--config.data.path={images}",
        "--config.teacher.arch_overrides.depth=3",
        "--config.optim.total_steps=3",
        "--config.checkpoint_every=3",
        *overrides,
    ]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_a_scanned_run_from_unscanned_model_directories_trains_as_the_unrolled_one(images, tmp_path):
    """The same 3 steps, unrolled (preset teacher) and scanned (that teacher as an unscanned model directory): the
    exported students agree to float rounding and both are written per layer with scan_layers=False."""
    teacher_cfg = preset("vit_tiny_patch16_224", **TEACHER)
    save_model(tmp_path / "teacher", teacher_cfg, jax.device_get(init_params(teacher_cfg, 0)), family="timm")
    assert main(_argv(tmp_path / "plain", images, "--config.teacher.random_init=true")) == 0
    scanned = ["--config.teacher.scan_layers=true", "--config.student.scan_layers=true"]
    assert main(_argv(tmp_path / "scan", images, f"--config.teacher.model_dir={tmp_path / 'teacher'}", *scanned)) == 0
    want_cfg, want = load_model(tmp_path / "plain" / "model")
    cfg, got = load_model(tmp_path / "scan" / "model")
    assert cfg == want_cfg and not cfg.scan_layers and not is_scanned(got)
    assert sorted(p.name for p in (tmp_path / "scan" / "model" / "params").iterdir()) == [
        "blocks_0",
        "blocks_1",
        "blocks_2",
        "rest",
    ]
    want, got = flatten(want), flatten(got)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, rtol=1e-5, err_msg=key)


def test_a_scanned_model_is_written_per_layer_and_loads_back(tmp_path):
    cfg = preset("vit_tiny_patch16_224", depth=2, img_size=32, scan_layers=True)
    params = jax.device_get(init_params(cfg.replace(scan_layers=False), 0))
    save_model(tmp_path / "m", cfg, stack_blocks(params))
    loaded_cfg, loaded = load_model(tmp_path / "m")
    assert loaded_cfg == cfg.replace(scan_layers=False) and not is_scanned(loaded)
    assert {p.name for p in (tmp_path / "m" / "params").iterdir()} == {"blocks_0", "blocks_1", "rest"}
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded)[key], value)


@pytest.mark.slow
def test_scanning_a_student_with_per_layer_widths_is_refused_in_one_line(images, tmp_path):
    cfg = preset("vit_tiny_patch16_224", depth=2, img_size=32, mlp_hidden=(96, 192))
    save_model(tmp_path / "student", cfg, jax.device_get(init_params(cfg, 0)))
    argv = _argv(tmp_path / "run", images, "--config.teacher.random_init=true")
    run = _cli(*argv, f"--config.student.model_dir={tmp_path / 'student'}", "--config.student.scan_layers=true")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: --config.student.scan_layers=true needs the same heads, value widths and MLP width "
        "in every layer, and the student (vit_tiny_patch16_224) has per-layer widths: set "
        "--config.student.scan_layers=false"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_uvc_search_refuses_a_scanned_student(tmp_path, capsys):
    cfg = preset("vit_tiny_patch16_224", depth=2, img_size=32)
    save_model(tmp_path / "m", cfg, jax.device_get(init_params(cfg, 0)))
    argv = ["uvc", "--config", CONFIG, "--model", str(tmp_path / "m"), "--flops-budget", "0.5", "--train", "mnist5k"]
    argv += ["--steps", "2", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--config.student.scan_layers=true"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dgmr-jax uvc: error: a UVC search masks each layer's units of its student, which runs unscanned: drop "
        "--config.student.scan_layers (--config.teacher.scan_layers=true still scans the teacher)"
    )
    assert not (tmp_path / "out").exists()


def test_hlo_matmul_flops_count_each_loop_trip():
    """Six 4x32 @ 32x32 matmuls in a scan: 6 x 2*4*32*32 FLOPs per trip count, one trip's worth once."""

    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    compiled = jax.jit(f).lower(jnp.ones((6, 32, 32)), jnp.ones((4, 32))).compile()
    assert planner.hlo_matmul_flops(compiled.as_text()) == (6 * 2 * 4 * 32 * 32, 2 * 4 * 32 * 32)


# TPU's optimized HLO writes matmuls as convolutions: a batched matmul over lhs-dilated spatial dims (one tap of
# each window meets the input), a windowed matmul loop stepping its counter by 2 whose padded window of 2 computes
# one weight chunk per output position, and a plain patch-embedding convolution
TPU_HLO = """HloModule tpu_forms

%cond (p: (u32[], bf16[16,8,1], bf16[8,2,4])) -> pred[] {
  %p = (u32[], bf16[16,8,1], bf16[8,2,4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %n = u32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (u32[], bf16[16,8,1], bf16[8,2,4])) -> (u32[], bf16[16,8,1], bf16[8,2,4]) {
  %p = (u32[], bf16[16,8,1], bf16[8,2,4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = bf16[16,8,1] get-tuple-element(%p), index=1
  %w = bf16[8,2,4] get-tuple-element(%p), index=2
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  %y = bf16[16,2,4] convolution(%x, %w), window={size=2 pad=1_1 rhs_reversal=1}, dim_labels=bf0_i0o->b0f
  ROOT %t = (u32[], bf16[16,8,1], bf16[8,2,4]) tuple(%next, %x, %w)
}

ENTRY %main (q: bf16[4,3,5,6], k: bf16[4,3,5,6], img: bf16[2,28,28,3], pw: bf16[14,14,3,8]) -> bf16[4,3,5,5] {
  %q = bf16[4,3,5,6] parameter(0)
  %k = bf16[4,3,5,6] parameter(1)
  %qk = bf16[4,3,5,5] convolution(%q, %k), window={size=4x3 stride=3x2 lhs_dilate=4x3}, dim_labels=01bf_01oi->01bf
  %img = bf16[2,28,28,3] parameter(2)
  %pw = bf16[14,14,3,8] parameter(3)
  %patches = bf16[2,2,2,8] convolution(%img, %pw), window={size=14x14 stride=14x14}, dim_labels=b01f_01io->b01f
  %init = (u32[], bf16[16,8,1], bf16[8,2,4]) parameter(4)
  %loop = (u32[], bf16[16,8,1], bf16[8,2,4]) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[4,3,5,5] copy(%qk)
}
"""


def test_hlo_matmul_flops_read_tpu_convolutions_and_windowed_loops():
    """q.k of 4 x 3 heads (5 x 6 @ 6 x 5) is 2*4*3*5*5*6 FLOPs, not that times the 4x3 window; the patch embedding
    2*(2*2*2*8)*(14*14*3); the windowed loop runs ceil(4 / 2) = 2 trips of two 16 x 8 @ 8 x 4 chunks."""
    once = 2 * 4 * 3 * 5 * 5 * 6 + 2 * (2 * 2 * 2 * 8) * (14 * 14 * 3)
    chunks = 2 * (2 * 16 * 8 * 4)
    assert planner.hlo_matmul_flops(TPU_HLO) == (once + 2 * chunks, once + chunks)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_plan_flops_under_scan_are_within_a_quarter_of_analytic(remat):
    """XLA's cost analysis counts a scanned stack's body once (a quarter of the 6-layer step here); plan's figure
    counts every trip."""
    config = config_file.load(CONFIG)
    config.teacher.arch_overrides = dict(depth=6, img_size=32)
    config.teacher.scan_layers = config.student.scan_layers = True
    config.student.remat = remat
    row = planner.plan_step(config, planner.cpu_target(1))
    assert 0.75 <= row["flops_compiled"] / row["flops_analytic"] <= 1.25
    assert row["flops_xla"] < 0.4 * row["flops_analytic"]


@pytest.mark.slow
def test_the_compile_cache_fills_on_the_first_run_and_serves_the_next(images, tmp_path):
    """A run writes its compiled programs to --config.compile_cache; a new run with that cache loads its train step
    from it (JAX logs the hit) and adds nothing."""
    cache = tmp_path / "cache"
    overrides = ["--config.teacher.random_init=true", f"--config.compile_cache={cache}"]
    overrides.append("--config.compile_cache_min_s=0")
    first = _cli(*_argv(tmp_path / "a", images, *overrides))
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and "Persistent compilation cache hit for 'jit_step'" not in first.stderr
    second = _cli(*_argv(tmp_path / "b", images, *overrides))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Persistent compilation cache hit for 'jit_step'" in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert not (tmp_path / "a" / "compile_cache").exists()


@pytest.mark.slow
def test_the_compile_cache_defaults_to_the_workdir_and_can_be_turned_off(images, tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # conftest shares one cache across the session's tests
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    base = _argv(tmp_path / "on", images, "--config.teacher.random_init=true", "--config.optim.total_steps=1")
    assert main(base) == 0
    assert any((tmp_path / "on" / "compile_cache").iterdir())
    off = _argv(tmp_path / "off", images, "--config.teacher.random_init=true", "--config.optim.total_steps=1")
    assert main([*off, "--config.compile_cache="]) == 0
    assert not (tmp_path / "off" / "compile_cache").exists()
    assert load_config(tmp_path / "off" / "model")[0].depth == 3


def test_jaxs_own_cache_variables_are_the_defaults(monkeypatch):
    """A user who set JAX's cache variables gets that cache in every run, unless the run names its own."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/jax-cache")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    loop = loop_defaults()
    assert (loop.compile_cache, loop.compile_cache_min_s) == ("/shared/jax-cache", 0.5)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    loop = loop_defaults()
    assert (loop.compile_cache, loop.compile_cache_min_s) == ("{workdir}/compile_cache", 1.0)
