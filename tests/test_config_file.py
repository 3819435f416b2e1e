"""Recipe files load without touching sys.path: each folder's siblings are its own."""

from __future__ import annotations

import subprocess
import sys

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


def test_shipped_recipes_load_from_any_directory(tmp_path, monkeypatch):
    root = config_file.__file__.rsplit("/dgmr_jax/", 1)[0]
    monkeypatch.chdir(tmp_path)
    prune2 = config_file.load(f"{root}/configs/eva02_clip_e_prune2.py")  # imports its sibling prune1 relatively
    assert prune2.student.model_dir == "/ckpt/eva_e_prune2"
    assert prune2.global_batch == config_file.load(f"{root}/configs/eva02_clip_e_prune1.py").global_batch


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
