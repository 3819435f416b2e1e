"""The wheel ships the recipes: configs/ lands in it as dgmr_jax/recipes, and every dgmr_jax package is in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_names_every_package_and_maps_the_recipes():
    """A mapped folder needs a package list: one left out of it would be missing from the wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == sorted(
        [*find_packages(str(ROOT), include=["dgmr_jax*"]), "dgmr_jax.recipes"]
    )
    assert setuptools["package-dir"] == {"dgmr_jax.recipes": "configs"}


@pytest.mark.slow
def test_the_wheel_holds_the_recipes_and_finds_them_by_name(tmp_path):
    """Build the wheel from a copy of the checkout (nothing written into it), unpack it as site-packages would
    hold it, and load a recipe by name from elsewhere: the wheel's own copy, its sibling import included."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("dgmr_jax", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dgmr_jax-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for recipe in (ROOT / "configs").glob("*.py"):
            assert zf.read(f"dgmr_jax/recipes/{recipe.name}") == recipe.read_bytes()
        zf.extractall(tmp_path / "site")
    code = (
        "from dgmr_jax.core import config_file as c; print(c.recipe_folder()); "
        "print(c.load('eva02_clip_e_prune2').student.mlp_ratio)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(tmp_path / "site" / "dgmr_jax" / "recipes"), "2.0"]
