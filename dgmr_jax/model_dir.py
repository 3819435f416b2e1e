"""A model directory: config.json (ModelConfig + provenance) and params/, one Orbax PyTree checkpoint per
block (params/blocks_<i>) plus one for everything else (params/rest), so a huge model is written and read
one layer at a time (Orbax copies what it writes: saving a whole 4B-parameter tree at once doubles memory).

Writes go to a temporary sibling first and are renamed into place, so an interrupted write never
leaves a half-written model where a later stage would read it, and nothing existing is overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import flatten, unflatten

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
Params = dict[str, Any]
_REST = "rest"


def _group_of(key: str) -> str:
    return key if key.startswith("blocks_") else _REST


def _groups(params: Params) -> dict[str, Params]:
    """Top-level params split into one group per unscanned block and one for the rest."""
    groups: dict[str, Params] = {}
    for key, value in params.items():
        groups.setdefault(_group_of(key), {})[key] = value
    return groups


def check_new_dir(directory: str | os.PathLike) -> Path:
    """Fail early (before any long work) if `directory` already holds something."""
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or remove it first")
    return path


def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: Params, **meta: Any) -> Path:
    """Write cfg and params to a new directory; `meta` (e.g. family, source) goes into config.json."""
    path = check_new_dir(directory)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as ckpt:
        for group, subtree in _groups(params).items():
            host = unflatten({k: np.asarray(v) for k, v in flatten(subtree).items()})
            ckpt.save(tmp.resolve() / PARAMS_DIR / group, host)
    (tmp / CONFIG_FILE).write_text(json.dumps({"config": json.loads(cfg.to_json()), "meta": meta}, indent=2))
    if path.exists():
        path.rmdir()  # empty (checked above)
    tmp.rename(path)
    return path


def load_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, meta) of a model directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    data = json.loads(path.read_text())
    return ModelConfig.from_dict(data["config"]), data.get("meta", {})


def load_params(directory: str | os.PathLike, only: Params | None = None) -> Params:
    """Params of a model directory as numpy; `only` (top-level keys of the param tree, e.g. {"blocks_3": ...})
    restores just those groups, which keeps memory at one layer when pruning huge models layer by layer."""
    root = (Path(directory) / PARAMS_DIR).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{directory} is not a model directory: {PARAMS_DIR}/ is missing")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if only is not None:
        names = sorted({_group_of(key) for key in only})
    params: Params = {}
    with ocp.PyTreeCheckpointer() as ckpt:
        for name in names:
            group = ckpt.restore(root / name)
            params.update({k: v for k, v in group.items() if only is None or k in only})
    return params


def load_model(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    cfg, _ = load_config(directory)
    return cfg, load_params(directory)
