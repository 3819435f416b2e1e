"""ml_collections recipe files: `path.py[:arg]` with get_config(), or a shipped recipe by NAME[:arg], plus
`--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dgmr_jax.core.errors import UserError


def _folder_package(folder: Path) -> str:
    """A package named for one recipe folder (made once), so recipes import their siblings relatively
    (`from .common import x`) and two folders' `common.py` never resolve to one module; sys.path is untouched."""
    name = "dgmr_recipes_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    if name not in sys.modules:
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, is_package=True))
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    return name


def recipe_folder() -> Path:
    """The shipped recipes: dgmr_jax/recipes in an installed wheel (pyproject maps configs/ there), the
    repository's configs/ beside the package in a checkout (an editable install, or PYTHONPATH)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped() -> dict[str, str]:
    """The shipped recipes, NAME -> the first line of its docstring, read without running them (for --help)."""
    recipes = {}
    for file in sorted(recipe_folder().glob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        if any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
            recipes[file.stem] = (ast.get_docstring(tree) or "").split("\n", 1)[0]
    return recipes


def recipe_file(name: str) -> Path:
    """The file of `--config NAME`: a path (anything with a `/` or ending in .py) or a shipped recipe's name."""
    if "/" in name or name.endswith(".py"):
        file = Path(name)
        if not file.is_file():
            hint = f" (the shipped recipe of that name is --config {file.stem})" if file.stem in shipped() else ""
            raise FileNotFoundError(f"config file {name} does not exist{hint}")
        return file
    recipes = shipped()
    if name not in recipes:
        raise UserError(
            f"unknown recipe {name!r}: the shipped recipes are {', '.join(recipes)} (or give a recipe file, path.py)"
        )
    return recipe_folder() / f"{name}.py"


def load(spec: str) -> ml_collections.ConfigDict:
    """Import a recipe (`path.py[:arg]`, or a shipped recipe's `NAME[:arg]`) and call its get_config([arg])."""
    path, _, arg = spec.partition(":")
    file = recipe_file(path)
    package = _folder_package(file.parent.resolve())
    module_spec = importlib.util.spec_from_file_location(f"{package}.{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        raise UserError(
            f"{path}: {err}; a recipe imports files beside it relatively (`from .{err.name} import ...`)"
        ) from err
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config() function")
    return module.get_config(arg) if arg else module.get_config()


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", tuple: "a list", list: "a list"}


def _parse(text: str, like: Any) -> Any:
    """`text` as a value of the kind `like` has (the field's current value); UserError when it is not one."""
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise UserError(text)
        return text.lower() in ("true", "1")
    if isinstance(like, str):
        return text
    if like is None and text.lower() in ("true", "false", "none"):  # an optional switch (None: automatic)
        return {"true": True, "false": False, "none": None}[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: only a text field takes it
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(like, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(like)(value)
    if like is not None and not isinstance(like, ml_collections.ConfigDict) and type(value) is not type(like):
        raise UserError(text)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `config.a.b=value` items (the `--` already stripped); values parse like the field they replace."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.startswith("config."):
            raise UserError(f"override {item!r} must look like --config.field=value")
        *parents, leaf = key[len("config.") :].split(".")
        node = config
        for name in parents:
            if name not in node:
                raise UserError(f"unknown config field {key!r}")
            node = node[name]
        if leaf not in node:
            raise UserError(f"unknown config field {key!r}; known here: {sorted(node.keys())}")
        like = node[leaf]
        try:
            node[leaf] = _parse(text, like)
        except UserError:
            kind = _KINDS.get(type(like), type(like).__name__)
            raise UserError(f"--{key}={text}: {leaf} is {kind} (e.g. {like!r}), got {text!r}") from None
    return config
