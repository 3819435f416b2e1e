"""A model directory: config.json (ModelConfig + provenance) and params/, one Orbax PyTree checkpoint per
block (params/blocks_<i>) plus one for everything else (params/rest), so a huge model is written and read
one layer at a time (Orbax copies what it writes: saving a whole 4B-parameter tree at once doubles memory),
and COMPLETE.json, written last: the size of every other file.

Writes go to a temporary sibling first and are renamed into place. A local rename is atomic; on gs:// it
copies object by object, so an interrupted write can leave part of a directory. Every read therefore goes
through `check_complete`: a directory without COMPLETE.json, or with a listed file missing or of another
size, is refused in one line, and a writer replaces such a directory instead of calling it taken. Sizes,
not checksums: the fault is a missing or short object (Cloud Storage checks each upload's own checksum),
and hashing a 35 GB model would mean reading it all back. Paths may be local or gs://. Sharded jax.Arrays
are written by every process holding shards (call `save_model` on all processes of a multi-host run).

Arrays are stored in chunks of at most CHUNK_BYTES (Orbax splits the largest dimensions first), so a read
laid out by shardings (`load_params(..., shardings=)`) fetches only the chunks its process's devices need:
each host of a pod reads about its share of the model. Other reads return numpy.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dgmr_jax.core.parallel import sync_processes
from dgmr_jax.core.paths import PathLike, as_path, check_writable
from dgmr_jax.io.checkpoint_io import CheckpointError
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params, flatten, unflatten

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
COMPLETE_FILE = "COMPLETE.json"  # written last: {"files": {relative path: size in bytes}} of every other file
_REST = "rest"
_SCANNED = "blocks"  # the scanned stack's top-level key (models.vit: nn.scan named "blocks")
_RERUN = "rerun the command that wrote it (it replaces an incomplete directory)"
CHUNK_BYTES = 1 << 20  # the stored chunk: a sharded read fetches whole chunks (Orbax warns below 1 MiB)


def _group_of(key: str) -> str:
    return key if key.startswith("blocks_") else _REST


def _groups(params: Params) -> Iterator[tuple[str, Params]]:
    """Top-level params split into one group per block and one for the rest; a scanned stack is sliced into its
    blocks one at a time (a model directory is always written per layer, whatever layout the run used)."""
    rest = {k: v for k, v in params.items() if k != _SCANNED}
    for key, value in rest.items():
        if key.startswith("blocks_"):
            yield key, {key: value}
    if _SCANNED in params:
        stack = params[_SCANNED]["block"]
        for i in range(jax.tree_util.tree_leaves(stack)[0].shape[0]):
            yield f"blocks_{i}", {f"blocks_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stack)}
    yield _REST, {k: v for k, v in rest.items() if not k.startswith("blocks_")}


def check_new_dir(directory: PathLike) -> epath.Path:
    """Fail early (before any long work) if `directory` already holds something (unless it is an incomplete
    model directory, an interrupted write, which `save_model` replaces) or cannot be written."""
    path = as_path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not _replaceable(path):
        raise FileExistsError(f"{path} already exists and is not empty; choose another output or remove it first")
    check_writable(path)
    return path


def _replaceable(path: epath.Path) -> bool:
    """Whether `path` holds only a model directory's entries and is incomplete: what an interrupted write leaves."""
    names = {p.name for p in path.iterdir()}
    return names <= {CONFIG_FILE, PARAMS_DIR, COMPLETE_FILE} and incomplete(path) is not None


def _file_sizes(path: epath.Path) -> dict[str, int]:
    """Relative path -> size of every file under `path` but the marker: one listing per folder, local or gs://."""
    sizes: dict[str, int] = {}
    top = None
    for root, _, files in path.walk():  # on gs:// the roots come without the gs:// prefix: relative to the first
        top = top if top is not None else os.fspath(root)
        rel = posixpath.relpath(os.fspath(root), top)
        for name in files:
            key = name if rel == "." else f"{rel}/{name}"
            if key != COMPLETE_FILE:
                sizes[key] = (path / key).stat().length
    return sizes


def _write_marker(path: epath.Path) -> None:
    """Record the size of every file under `path` in its COMPLETE_FILE, the last file a model directory gets."""
    (path / COMPLETE_FILE).write_text(json.dumps({"files": _file_sizes(path)}, indent=1, sort_keys=True))


def incomplete(directory: PathLike) -> str | None:
    """Why `directory` is not a complete model directory (missing marker, missing or short file), or None."""
    path = as_path(directory)
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        return (
            f"it has no {COMPLETE_FILE}, the marker a model directory gets once every file is written (its writer "
            "was interrupted, or it predates the marker)"
        )
    try:
        listed = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its {COMPLETE_FILE} is unreadable"
    sizes = _file_sizes(path)
    for name, size in sorted(listed.items()):
        if name not in sizes:
            return f"{name} is missing ({COMPLETE_FILE} lists {len(listed)} files)"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, {COMPLETE_FILE} says {size}"
    return None


def check_complete(directory: PathLike) -> epath.Path:
    """The one check every model-directory read goes through: refuse a missing or incomplete directory in one line."""
    path = as_path(directory)
    if not any((path / name).exists() for name in (CONFIG_FILE, PARAMS_DIR, COMPLETE_FILE)):
        raise FileNotFoundError(
            f"{directory} is not a model directory: {CONFIG_FILE} is missing{_workdir_hint(directory)}"
        )
    problem = incomplete(path)
    if problem is not None:
        raise CheckpointError(f"model directory {directory} is incomplete: {problem}; {_RERUN}")
    return path


def _host_or_global(value: Any) -> Any:
    """Leaves as Orbax should write them: a jax.Array as is (each process writes its own shards), else numpy."""
    return value if isinstance(value, jax.Array) else np.asarray(value)


def save_model(directory: PathLike, cfg: ModelConfig, params: Params, **meta: Any) -> epath.Path:
    """Write cfg and params to a new directory; `meta` (e.g. family, source) goes into config.json. Scanned params
    are written per layer with scan_layers=False: each run stacks them as it chooses (models.tree.in_layout)."""
    path = check_new_dir(directory)
    tmp = path.with_name(f".{path.name}.partial")
    primary = jax.process_index() == 0
    if primary:
        if tmp.exists():  # left by an interrupted write
            tmp.rmtree()
        tmp.mkdir(parents=True)
    sync_processes(f"dgmr_jax.save_model:{tmp}:start")
    with ocp.PyTreeCheckpointer() as ckpt:
        for group, subtree in _groups(params):
            leaves = unflatten({k: _host_or_global(v) for k, v in flatten(subtree).items()})
            chunked = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), leaves)
            ckpt.save(tmp / PARAMS_DIR / group, leaves, save_args=chunked)
    if primary:  # Orbax's save returns once every process has written its shards
        config = {"config": json.loads(cfg.replace(scan_layers=False).to_json()), "meta": meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        _write_marker(tmp)
        if path.exists():  # empty, or an incomplete model directory (checked above)
            if any(path.iterdir()):
                print(f"replacing the incomplete model directory {path}: {incomplete(path)}")
            path.rmtree()
        tmp.rename(path)
    sync_processes(f"dgmr_jax.save_model:{tmp}:done")
    return path


def load_config(directory: PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, meta) of a complete model directory."""
    data = json.loads((check_complete(directory) / CONFIG_FILE).read_text())
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


def load_params(
    directory: PathLike, only: Params | None = None, shardings: Params | None = None, dtype: Any = None
) -> Params:
    """Params of a model directory as numpy; `only` (top-level keys of the param tree, e.g. {"blocks_3": ...})
    restores just those groups, which keeps memory at one layer when pruning huge models layer by layer.
    `shardings` (a per-layer param tree of NamedShardings, or part of one, as `only`) restores those groups
    instead as global jax.Arrays in `dtype` laid out by them: each process reads only the chunks its devices hold."""
    root = check_complete(directory) / PARAMS_DIR
    only = shardings if shardings is not None else only
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if only is not None:
        names = sorted({_group_of(key) for key in only})
    params: Params = {}
    for name in names:
        group = restore_numpy(root / name) if shardings is None else _restore_sharded(root / name, shardings, dtype)
        params.update({k: v for k, v in group.items() if only is None or k in only})
    return params


def _restore_sharded(path: epath.Path, shardings: Params, dtype: Any) -> Params:
    """The entries of one group checkpoint that `shardings` names, as global arrays laid out by them."""
    with ocp.PyTreeCheckpointer() as ckpt:
        saved = ckpt.metadata(path).item_metadata.tree
        tree = {k: saved[k] for k in shardings if k in saved}
        args = jax.tree_util.tree_map(
            lambda meta, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=tuple(meta.shape), dtype=dtype),
            tree,
            {k: shardings[k] for k in tree},
        )
        restore = ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=len(tree) < len(saved))
        return ckpt.restore(path, args=restore)


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
