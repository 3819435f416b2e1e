"""A model directory: config.json (ModelConfig + provenance) and params/ (an Orbax PyTree checkpoint).

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
    host = {k: np.asarray(v) for k, v in flatten(params).items()}
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(tmp.resolve() / PARAMS_DIR, unflatten(host))
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
    """Params of a model directory as numpy; `only` (a subtree of the param structure) restores just
    those leaves, which keeps memory at one layer when pruning huge models layer by layer."""
    path = (Path(directory) / PARAMS_DIR).resolve()
    with ocp.PyTreeCheckpointer() as ckpt:
        if only is None:
            return ckpt.restore(path)
        restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in flatten(only)}
        args = ocp.args.PyTreeRestore(item=only, restore_args=unflatten(restore_args), partial_restore=True)
        return ckpt.restore(path, args=args)


def load_model(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    cfg, _ = load_config(directory)
    return cfg, load_params(directory)
