"""Recipe files load without touching sys.path: each folder's siblings are its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dgmr_jax.core import config_file
from dgmr_jax.core.errors import UserError

RECIPE = """
import ml_collections
from .common import VALUE


def get_config(arg="0"):
    return ml_collections.ConfigDict(dict(value=VALUE, arg=int(arg)))
"""


def _folder(root, name, value):
    folder = root / name
    folder.mkdir()
    (folder / "common.py").write_text(f"VALUE = {value}\n")
    (folder / "recipe.py").write_text(RECIPE)
    return folder


def test_two_recipe_folders_each_import_their_own_common(tmp_path):
    first, second = _folder(tmp_path, "a", 1), _folder(tmp_path, "b", 2)
    path_before = list(sys.path)
    assert config_file.load(str(first / "recipe.py")).value == 1
    assert config_file.load(str(second / "recipe.py")).value == 2
    assert config_file.load(f"{first / 'recipe.py'}:7").to_dict() == {"value": 1, "arg": 7}
    assert sys.path == path_before
    assert "common" not in sys.modules


def test_a_recipe_importing_a_sibling_absolutely_is_told_how(tmp_path):
    folder = _folder(tmp_path, "c", 3)
    (folder / "absolute.py").write_text("from common import VALUE\n\ndef get_config():\n    return VALUE\n")
    with pytest.raises(UserError, match=r"imports files beside it relatively \(`from \.common import"):
        config_file.load(str(folder / "absolute.py"))


def test_shipped_recipes_load_by_name_or_path_from_any_directory(tmp_path, monkeypatch):
    root = config_file.__file__.rsplit("/dgmr_jax/", 1)[0]
    monkeypatch.chdir(tmp_path)
    prune2 = config_file.load("eva02_clip_e_prune2")  # imports its sibling prune1 relatively
    assert prune2.student.model_dir == "/ckpt/eva_e_prune2" and prune2.student.mlp_ratio == 2.0
    assert prune2.global_batch == config_file.load("eva02_clip_e_prune1").global_batch == 40 * 64
    assert prune2.to_dict() == config_file.load(f"{root}/configs/eva02_clip_e_prune2.py").to_dict()
    assert config_file.recipe_folder() == Path(root) / "configs"  # a checkout: the repository's folder


def test_every_shipped_recipe_loads_and_has_a_one_line_description():
    """What --help lists: each file in configs/ with a get_config(), described by its docstring's first line."""
    recipes = config_file.shipped()
    files = sorted(p.stem for p in config_file.recipe_folder().glob("*.py"))
    assert list(recipes) == files and "cpu_tiny" in recipes and "eva02_clip_e_prune1" in recipes
    for name, line in recipes.items():
        assert 20 < len(line) <= 100 and line.endswith("."), (name, line)
        assert config_file.load(name).to_dict()


def test_published_distillation_recipes_name_their_preset_and_prune():
    """`plan` builds these models from the recipe alone: the teacher's preset, the prune of the student."""
    archs = {
        "eva02_clip_e_prune1": ("eva02_enormous_patch14_clip_224", 1.0),
        "eva02_clip_e_prune2": ("eva02_enormous_patch14_clip_224", 2.0),
        "openclip_vit_g14_prune1": ("ViT-g-14", 1.0),
        "dinov2_g_prune1": ("vit_giant_patch14_dinov2", 1.0),
        "eva_clip_8b_prune1": ("EVA-CLIP-8B", 1.0),
        "eva_clip_18b_prune1": ("EVA-CLIP-18B", 1.0),
        "internvit_6b_prune1": ("InternViT-6B-448px-V2_5", 1.0),
        "uvc_deit_small_50": ("deit_small_patch16_224", 1.0),
        "uvc_eva_e_diversity": ("eva02_enormous_patch14_clip_224", 1.0),
        "uvc_vit_g14_diversity": ("ViT-g-14", 1.0),
    }
    for name, (arch, mlp_ratio) in archs.items():
        config = config_file.load(name)
        assert (config.teacher.arch, config.student.method, config.student.mlp_ratio) == (
            arch,
            "diversity",
            mlp_ratio,
        ), name


def _cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`dgmr-jax ARGV` in a fresh process started in `cwd` (away from the checkout)."""
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_an_unknown_recipe_name_lists_the_shipped_ones_in_one_line(tmp_path):
    run = _cli(tmp_path, "distill", "--config", "eva_e_prune1", "--workdir", "w")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "dgmr-jax distill: error: unknown recipe 'eva_e_prune1': the shipped recipes are "
        + ", ".join(config_file.shipped())
        + " (or give a recipe file, path.py)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_path_that_is_not_there_names_the_recipe_of_that_name(tmp_path, monkeypatch, capsys):
    from dgmr_jax.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--config", "configs/cpu_tiny.py", "--devices", "1"]) == 2
    assert capsys.readouterr().err == (
        "dgmr-jax plan: error: config file configs/cpu_tiny.py does not exist "
        "(the shipped recipe of that name is --config cpu_tiny)\n"
    )
    assert main(["plan", "--config", "mine.py", "--devices", "1"]) == 2
    assert capsys.readouterr().err == "dgmr-jax plan: error: config file mine.py does not exist\n"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["distill", "uvc", "finetune-text", "plan"])
def test_help_explains_overrides_and_lists_the_shipped_recipes(tmp_path, command):
    run = _cli(tmp_path, command, "--help")
    assert run.returncode == 0
    out = run.stdout
    assert "recipe overrides: after the flags, --config.FIELD=VALUE sets one field of the recipe" in out
    assert (
        f"\n  dgmr-jax {command} --config " in out and " --config.global_batch=64 --config.optim.base_lr=1e-4\n" in out
    )
    listed = out.split("shipped recipes (--config NAME; or --config path/to/recipe.py", 1)[1].splitlines()[1:]
    assert [line.split(None, 1) for line in listed] == [[name, line] for name, line in config_file.shipped().items()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.global_batch=abc", "--config.global_batch=abc: global_batch is an integer (e.g. 8), got 'abc'"),
        ("--config.global_batch=8.5", "--config.global_batch=8.5: global_batch is an integer (e.g. 8), got '8.5'"),
        ("--config.student.remat=maybe", "remat is true or false (e.g. False), got 'maybe'"),
        ("--config.data.scale=abc", "scale is a list (e.g. (0.9, 1.0)), got 'abc'"),
    ],
)
def test_a_wrong_type_override_is_one_line_naming_field_type_and_value(tmp_path, override, message):
    root = config_file.__file__.rsplit("/dgmr_jax/", 1)[0]
    argv = ["distill", "--config", f"{root}/configs/cpu_tiny.py", "--workdir", str(tmp_path / "w"), override]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.startswith("dgmr-jax")]
    assert len(lines) == 1 and lines[0].startswith("dgmr-jax distill: error: --config.") and lines[0].endswith(message)
    assert "Traceback" not in run.stderr and not (tmp_path / "w").exists()
