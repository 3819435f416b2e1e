"""`dgmr-jax plan`: the distill step compiled for a target without weights; exact sharded bytes, fit checks,
search, and remat memory that follows its policy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dgmr_jax import plan as planner
from dgmr_jax.cli import main
from dgmr_jax.core import config_file
from dgmr_jax.models.cost import count_params
from dgmr_jax.models.presets import preset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cpu_tiny.py")


def _plan(tmp_path: Path, *argv: str) -> list[dict]:
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    assert main(["plan", "--config", CONFIG, *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.tpu_compile
def test_tpu_plan_bytes_are_exact_and_compiled_by_the_tpu_compiler(tmp_path, capsys):
    """On a v5p:2x2x1 topology (libtpu, no TPU) with the batch over 4 chips, every chip holds whole copies:
    params and teacher at 4 bytes each, AdamW's two moments twice the params (+ its step counters)."""
    (row,) = _plan(tmp_path, "--topology", "v5p:2x2x1", "--config.mesh.data=4")
    config = config_file.load(CONFIG)
    teacher = preset(config.teacher.arch, **dict(config.teacher.arch_overrides))
    student = teacher.replace(mlp_hidden=(192,) * teacher.depth)
    assert row["chips"] == 4 and row["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert row["params"] == 4 * count_params(student)
    assert row["teacher"] == 4 * count_params(teacher)
    assert 8 * count_params(student) <= row["optimizer"] <= 8 * count_params(student) + 64
    assert row["ema"] == 0 and row["memory_source"] == "TPU compiler" and row["hbm"] == 95 * 2**30
    assert row["arguments"] >= row["params"] + row["optimizer"] + row["teacher"]
    assert row["temp"] > 0 and row["flops_compiled"] >= row["flops_analytic"] > 0
    out = capsys.readouterr().out
    assert "v5p:2x2x1 (4 chips), mesh data=4 fsdp=1 tensor=1, 2 images/chip, remat off" in out
    assert "TPU compiler, GiB: arguments" in out and "of 95 HBM" in out
    assert row["mfu"] == 0.4
    assert f"step time at MFU 0.4 (an assumption; set it with --mfu): {row['step_s']:.3g} s" in out

    (sharded,) = _plan(tmp_path, "--topology", "v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=4")
    assert sharded["params"] < row["params"] and sharded["teacher"] < row["teacher"]


@pytest.mark.tpu_compile
def test_a_plan_over_hbm_fails_in_one_line(capsys):
    argv = ["plan", "--config", CONFIG, "--topology", "v5e:2x2", "--hbm-gib", "0.001"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dgmr-jax plan: error: does not fit: ") and "GiB HBM on v5e:2x2; try --search" in err


@pytest.mark.tpu_compile
def test_tpu_flops_of_a_scanned_fsdp_step_are_within_a_quarter_of_analytic(tmp_path):
    """EVA-E prune1 cut to 4 layers of width 512, scanned with remat, 8 images/chip over fsdp 8 on v5e:2x4. TPU's
    HLO writes matmuls as convolutions (attention over dilated batch and head dims, fsdp matmuls as windowed loops
    of two chunks a trip); counted per trip they are 1.0-1.25x the analytic 3 x student + teacher (remat
    recomputes the student's forward). Each chip attends over its own 8 images: with the block inputs left
    unconstrained it computed all 64 images' attention and the ratio was about 2."""
    argv = ["plan", "--config", "eva02_clip_e_prune1", "--topology", "v5e:2x4", "--config.global_batch=64"]
    argv += ["--config.teacher.arch_overrides={'depth': 4, 'width': 512, 'hidden': 2048, 'num_heads': 8}"]
    argv += ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "plan.json").read_text())
    assert 1.0 <= row["flops_compiled"] / row["flops_analytic"] <= 1.25, row


@pytest.mark.slow
def test_cpu_plan_is_labelled_an_estimate_and_search_picks_the_largest_batch(tmp_path, capsys):
    """The default search space of 4 chips: the recipe's per-chip batch and its halves, every fsdp split, remat off
    and on. Compiled here without fsdp 2 (one compile in three fewer; test_search_can_be_narrowed narrows more)."""
    space = planner.search_space(config_file.load(CONFIG), 4)
    assert [(c.global_batch, c.mesh.fsdp, c.student.remat) for c in space] == [
        (4 * b, f, m) for b in (2, 1) for f in (1, 2, 4) for m in (False, True)
    ]
    rows = _plan(tmp_path, "--devices", "4", "--search", "--search-fsdp", "1,4")
    assert {r["memory_source"] for r in rows} == {"CPU compiler estimate (not a TPU figure)"}
    assert {(r["batch_per_chip"], r["mesh"]["fsdp"], r["remat"]) for r in rows} == {
        (b, f, m) for b in (2, 1) for f in (1, 4) for m in (False, True)
    }
    out = capsys.readouterr().out
    assert "| images/chip | mesh (data, fsdp, tensor) | remat | temp GiB | total GiB | init GiB | fits |" in out
    assert "search picks: --config.global_batch=8 --config.mesh.data=4 --config.mesh.fsdp=1" in out


@pytest.mark.slow
def test_search_can_be_narrowed(tmp_path, capsys):
    rows = _plan(tmp_path, "--devices", "4", "--search", "--search-batches", "2", "--search-fsdp", "1,4")
    assert [(r["batch_per_chip"], r["mesh"]["fsdp"], r["remat"]) for r in rows] == [
        (2, 1, False),
        (2, 1, True),
        (2, 4, False),
        (2, 4, True),
    ]
    rows = _plan(tmp_path, "--devices", "4", "--search", "--search-batches", "1", "--search-remat", "on")
    assert {r["remat"] for r in rows} == {True} and len(rows) == 3
    assert main(["plan", "--config", CONFIG, "--devices", "4", "--search-fsdp", "2"]) == 2
    assert "narrow --search: add --search" in capsys.readouterr().err
    assert main(["plan", "--config", CONFIG, "--devices", "4", "--search", "--search-fsdp", "3"]) == 2
    assert "--search-fsdp must divide the 4 chips" in capsys.readouterr().err


def test_bad_targets(monkeypatch, capsys):
    assert main(["plan", "--config", CONFIG]) == 2
    assert "give exactly one target" in capsys.readouterr().err
    assert main(["plan", "--config", CONFIG, "--topology", "v9:2x2"]) == 2
    assert "expected GENERATION:SHAPE with GENERATION in v4, v5e, v5p, v6e" in capsys.readouterr().err
    assert main(["plan", "--config", CONFIG, "--devices", "64"]) == 2
    assert "this process has 8 CPU devices" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if the tpu-plan extra were not installed
    assert main(["plan", "--config", CONFIG, "--topology", "v5p:2x2x1"]) == 2
    assert "pip install 'dgmr-jax[tpu-plan]'" in capsys.readouterr().err


@pytest.mark.slow
def test_remat_memory_per_layer_follows_the_policy(tmp_path):
    """Temp bytes over depth (2 -> 6 layers, 16 images/chip of 65 tokens, width 192, float32): with remat the
    slope is one saved block input per layer; without it, several times more. Fresh processes: the CLI sets
    the XLA:CPU flags that keep remat's barriers."""
    slopes = {}
    for remat in (False, True):
        temps = []
        for depth in (2, 6):
            out = tmp_path / f"{remat}_{depth}.json"
            argv = [sys.executable, "-m", "dgmr_jax.cli", "plan", "--config", CONFIG, "--devices", "4"]
            argv += [f"--config.teacher.arch_overrides={{'depth': {depth}, 'img_size': 128}}"]
            argv += [f"--config.student.remat={remat}", "--config.global_batch=64", "--out", str(out)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            temps.append(json.loads(out.read_text())[0]["temp"])
        slopes[remat] = (temps[1] - temps[0]) / 4
    predicted = 16 * 65 * 192 * 4
    assert 0.8 * predicted <= slopes[True] <= 1.5 * predicted, slopes
    assert slopes[False] >= 8 * slopes[True], slopes


def test_a_recipe_plans_from_its_preset_before_its_model_directories_exist(tmp_path):
    """eva02_clip_e_prune2 as shipped names /ckpt/eva_e and /ckpt/eva_e_prune2, not there yet: the teacher is its
    preset, the student that preset pruned at the recipe's mlp_ratio 2; directories that exist are kept."""
    from dgmr_jax.distill.trainer import model_configs

    config, said = planner.with_presets(config_file.load("eva02_clip_e_prune2"))
    assert said == (
        "plan: not converted yet, planned from the recipe: teacher /ckpt/eva_e -> the preset "
        "eva02_enormous_patch14_clip_224 (config.teacher.arch); student /ckpt/eva_e_prune2 -> the teacher pruned "
        "to mlp_ratio 2.0 (config.student)"
    )
    teacher, student = model_configs(config)
    assert teacher == preset("eva02_enormous_patch14_clip_224")
    assert student == teacher.replace(mlp_hidden=(2 * 1792,) * 64)

    (tmp_path / "teacher").mkdir()
    shipped = config_file.load("eva02_clip_e_prune2")
    shipped.teacher.model_dir = str(tmp_path / "teacher")
    config, said = planner.with_presets(shipped)
    assert config.teacher.model_dir == str(tmp_path / "teacher") and config.student.model_dir == ""
    assert said.endswith(": student /ckpt/eva_e_prune2 -> the teacher pruned to mlp_ratio 2.0 (config.student)")
    shipped.student.model_dir = str(tmp_path)
    assert planner.with_presets(shipped) == (shipped, None)


@pytest.mark.slow
def test_a_giant_recipe_by_name_plans_as_shipped_from_any_directory(tmp_path):
    """`dgmr-jax plan --config eva02_clip_e_prune1`, in a fresh process away from the checkout, before anything is
    converted: one line says the preset it used, and the sizes are the preset's and its prune1's (cut to 2
    layers at 28 px here, to compile in seconds; every chip holds whole bf16 copies at data=8)."""
    argv = ["plan", "--config", "eva02_clip_e_prune1", "--devices", "8", "--config.global_batch=8"]
    argv += ["--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.teacher.arch_overrides={'depth': 2}"]
    argv += ["--config.data.img_size=28", "--out", "plan.json"]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0] == (
        "plan: not converted yet, planned from the recipe: teacher /ckpt/eva_e -> the preset "
        "eva02_enormous_patch14_clip_224 (config.teacher.arch); student /ckpt/eva_e_prune1 -> the teacher pruned "
        "to mlp_ratio 1.0 (config.student)"
    )
    (row,) = json.loads((tmp_path / "plan.json").read_text())
    teacher = preset("eva02_enormous_patch14_clip_224", depth=2)
    assert row["teacher"] == 2 * count_params(teacher)
    assert row["params"] == 2 * count_params(teacher.replace(mlp_hidden=(1792, 1792)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# the giant distillation recipes, each scanning teacher and student, and the preset of its teacher
GIANTS = {
    "eva02_clip_e_prune1": "eva02_enormous_patch14_clip_224",
    "eva02_clip_e_prune2": "eva02_enormous_patch14_clip_224",
    "openclip_vit_g14_prune1": "ViT-g-14",
    "dinov2_g_prune1": "vit_giant_patch14_dinov2",
    "eva_clip_8b_prune1": "EVA-CLIP-8B",
    "eva_clip_18b_prune1": "EVA-CLIP-18B",
    "internvit_6b_prune1": "InternViT-6B-448px-V2_5",
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(GIANTS))
def test_a_giant_recipe_lowers_at_real_size_with_both_stacks_scanned(recipe):
    """What `plan --topology` compiles, lowered at the real size on one CPU device (abstract params, one image at
    the model's own size): the teacher is the recipe's preset and the student it pruned to the recipe's ratio,
    both stacked on a layer axis (scan_layers) with every parameter accounted for."""
    from dgmr_jax.core.parallel import make_mesh
    from dgmr_jax.distill.trainer import build_step, model_configs

    config, _ = planner.with_presets(config_file.load(recipe))
    config.mesh.update(data=1, fsdp=1, tensor=1)
    teacher, student = model_configs(config)
    assert teacher == preset(GIANTS[recipe])
    assert student == teacher.replace(mlp_hidden=(int(config.student.mlp_ratio * teacher.width),) * teacher.depth)
    mesh = make_mesh(**dict(config.mesh), devices=jax.devices("cpu")[:1])
    step = build_step(config, mesh, teacher, student)
    for params, cfg in ((step.state_shapes.params, student), (step.teacher_shapes, teacher)):
        assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)) == count_params(cfg)
        assert {p.shape[0] for p in jax.tree_util.tree_leaves(params["blocks"])} == {cfg.depth}
    lowered = step.fn.lower(*step.abstract_inputs(mesh, 1, config.data.img_size or teacher.img_size)).as_text()
    assert lowered.count("stablehlo.while") >= 3  # teacher forward, student forward and backward: one loop each
