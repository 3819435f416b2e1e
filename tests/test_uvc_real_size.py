"""UVC at real sizes: the FLOPs counts of real models (above 2**31) meet JAX arrays without overflowing.

Every shipped UVC recipe's search step is traced at its model's real size with abstract params (jax.eval_shape:
nothing is allocated), and the FLOPs ratio is checked at the numbers where int32 used to overflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dgmr_jax.core import config_file
from dgmr_jax.model_dir import load_config, save_model
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.presets import preset
from dgmr_jax.models.slim import UnitPlan
from dgmr_jax.models.vit import init_params, param_shapes
from dgmr_jax.uvc.flops import flops_ratio, plan_ratio
from dgmr_jax.uvc.stage import SearchTask

ROOT = Path(__file__).resolve().parents[1]
# each shipped UVC recipe and the model its docstring searches
RECIPES = {
    "uvc_deit_small_50": ("deit_small_patch16_224", 0.5),
    "uvc_eva_e_diversity": ("eva02_enormous_patch14_clip_224", 0.29),
    "uvc_vit_g14_diversity": ("ViT-g-14", 0.487),
}


def test_the_flops_ratio_of_real_models_is_exact_above_int32():
    cfg = preset("deit_small_patch16_224")
    assert count_flops(cfg) > 2**31  # 9.2 GFLOPs
    depth = cfg.depth
    full = flops_ratio(cfg, jnp.full(depth, 6.0), jnp.full(depth, 384.0), jnp.full(depth, 1536.0), jnp.ones(depth))
    assert float(full) == pytest.approx(1.0, abs=1e-6)
    half = flops_ratio(cfg, jnp.full(depth, 3.0), jnp.full(depth, 192.0), jnp.full(depth, 768.0), jnp.ones(depth))
    # the same plan counted exactly in Python ints
    unit = UnitPlan(keep_block=True, heads=(0, 1, 2), dims=(tuple(range(64)),) * 3, neurons=tuple(range(768)))
    assert float(half) == pytest.approx(plan_ratio(cfg, (unit,) * depth), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_search_step_of_every_shipped_recipe_traces_at_real_size(recipe):
    arch, budget = RECIPES[recipe]
    config = config_file.load(str(ROOT / "configs" / f"{recipe}.py"))
    config.uvc.budget = budget
    cfg = preset(arch)
    assert count_flops(cfg) > 2**31, "a real-size model"
    task = SearchTask()
    student_cfg = cfg.replace(dtype=config.student.dtype, param_dtype=config.student.param_dtype)
    teacher_cfg = cfg.replace(dtype=config.teacher.dtype)
    made = task.make_step(config, teacher_cfg, student_cfg)

    def shapes(c, dtype):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), param_shapes(c))

    state = jax.eval_shape(made.init, shapes(student_cfg, config.student.param_dtype))
    images = jax.ShapeDtypeStruct((2, cfg.img_size, cfg.img_size, 3), np.float32)
    new_state, metrics = jax.eval_shape(made.step, state, shapes(teacher_cfg, config.teacher.dtype), images)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert {"loss", "ratio", "ratio_hard", "z"} <= set(metrics)
    assert all(m.shape == () for m in metrics.values())


@pytest.mark.slow
def test_uvc_cli_runs_deit_small_at_224px(tmp_path):
    """`dgmr-jax uvc` on DeiT-S at its real 224 px (9.2 GFLOPs): a few search steps, then an extraction onto
    the budget, through the command line in a process of its own (one CPU device)."""
    cfg = preset("deit_small_patch16_224")
    save_model(tmp_path / "deit_s", cfg, jax.device_get(init_params(cfg, 0)), family="timm")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((240, 240, 3)) * 255).astype("uint8")).save(tmp_path / "imgs" / f"{i}.png")
    argv = ["uvc", "--model", str(tmp_path / "deit_s"), "--flops-budget", "0.5", "--train", str(tmp_path / "imgs")]
    argv += ["--steps", "3", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "slim")]
    argv += ["--config.global_batch=2", "--config.uvc.warmup_steps=1", "--config.checkpoint_every=3"]
    argv += ["--config.teacher.dtype=float32", "--config.student.dtype=float32"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    slim_cfg, meta = load_config(tmp_path / "slim")
    assert meta["uvc"]["search"]["step"] == 3
    assert count_flops(slim_cfg) / count_flops(cfg) == pytest.approx(meta["uvc"]["ratio"], abs=1e-12)
    assert meta["uvc"]["ratio"] <= 0.5
