"""Recipe files load without touching sys.path: each folder's siblings are its own."""

from __future__ import annotations

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
