"""A model directory: config.json (ModelConfig + provenance) and params/, one Orbax PyTree checkpoint per
block (params/blocks_<i>) plus one for everything else (params/rest), so a huge model is written and read
one layer at a time (Orbax copies what it writes: saving a whole 4B-parameter tree at once doubles memory).

Writes go to a temporary sibling first and are renamed into place, so an interrupted write never
leaves a half-written model where a later stage would read it, and nothing existing is overwritten.
Paths may be local or gs://. Sharded jax.Arrays are written by every process holding shards (call
`save_model` on all processes of a multi-host run); reads always return numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dgmr_jax.core.parallel import sync_processes
from dgmr_jax.core.paths import PathLike, as_path, check_writable
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params, flatten, unflatten

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
_REST = "rest"


def _group_of(key: str) -> str:
    return key if key.startswith("blocks_") else _REST


def _groups(params: Params) -> dict[str, Params]:
    """Top-level params split into one group per unscanned block and one for the rest."""
    groups: dict[str, Params] = {}
    for key, value in params.items():
        groups.setdefault(_group_of(key), {})[key] = value
    return groups


def check_new_dir(directory: PathLike) -> epath.Path:
    """Fail early (before any long work) if `directory` already holds something or cannot be written."""
    path = as_path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or remove it first")
    check_writable(path)
    return path


def _host_or_global(value: Any) -> Any:
    """Leaves as Orbax should write them: a jax.Array as is (each process writes its own shards), else numpy."""
    return value if isinstance(value, jax.Array) else np.asarray(value)


def save_model(directory: PathLike, cfg: ModelConfig, params: Params, **meta: Any) -> epath.Path:
    """Write cfg and params to a new directory; `meta` (e.g. family, source) goes into config.json."""
    path = check_new_dir(directory)
    tmp = path.with_name(f".{path.name}.partial")
    primary = jax.process_index() == 0
    if primary:
        if tmp.exists():  # left by an interrupted write
            tmp.rmtree()
        tmp.mkdir(parents=True)
    sync_processes(f"dgmr_jax.save_model:{tmp}:start")
    with ocp.PyTreeCheckpointer() as ckpt:
        for group, subtree in _groups(params).items():
            leaves = unflatten({k: _host_or_global(v) for k, v in flatten(subtree).items()})
            ckpt.save(tmp / PARAMS_DIR / group, leaves)
    if primary:
        config = {"config": json.loads(cfg.to_json()), "meta": meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if path.exists():
            path.rmdir()  # empty (checked above)
        tmp.rename(path)
    sync_processes(f"dgmr_jax.save_model:{tmp}:done")
    return path


def load_config(directory: PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, meta) of a model directory."""
    path = as_path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a model directory: {CONFIG_FILE} is missing{_workdir_hint(directory)}"
        )
    data = json.loads(path.read_text())
    return ModelConfig.from_dict(data["config"]), data.get("meta", {})


def _workdir_hint(directory: PathLike) -> str:
    """Where the model is, when `directory` is a distillation workdir or one of its checkpoints."""
    path = as_path(directory)
    workdir = path.parent.parent if path.parent.name == "checkpoints" else path
    if not (workdir / "checkpoints").is_dir():
        return ""
    return (
        f"; {workdir} is a `dgmr-jax distill` workdir: its student is the model directory {workdir / 'model'} "
        f"(written at the end of the run), or write one from any saved step with "
        f"`dgmr-jax distill --workdir {workdir} --from-checkpoint STEP`"
    )


def load_params(directory: PathLike, only: Params | None = None) -> Params:
    """Params of a model directory as numpy; `only` (top-level keys of the param tree, e.g. {"blocks_3": ...})
    restores just those groups, which keeps memory at one layer when pruning huge models layer by layer."""
    root = as_path(directory) / PARAMS_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"{directory} is not a model directory: {PARAMS_DIR}/ is missing")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if only is not None:
        names = sorted({_group_of(key) for key in only})
    params: Params = {}
    for name in names:
        group = restore_numpy(root / name)
        params.update({k: v for k, v in group.items() if only is None or k in only})
    return params


def restore_numpy(path: PathLike, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """An Orbax PyTree checkpoint as numpy arrays on this host, whatever sharding it was saved with; `keys`
    restores only those top-level entries (entries saved empty, e.g. a missing EMA, are left out)."""
    path = as_path(path)
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.metadata(path).item_metadata.tree
        if keys is not None:
            tree = {k: tree[k] for k in keys if tree.get(k)}
            if not tree:
                return {}
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restore = ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy, partial_restore=keys is not None)
        return ckpt.restore(path, args=restore)


def load_model(directory: PathLike) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params as numpy) of a model directory."""
    cfg, _ = load_config(directory)
    return cfg, load_params(directory)
