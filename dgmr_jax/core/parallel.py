"""One mesh code path: a (data, fsdp, tensor) Mesh, logical-axis rules, and shardings for params and batches.

The same functions serve 1 CPU, 8 fake CPU devices, a GPU node and a multi-host TPU pod; only the mesh
shape (from config) changes.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dgmr_jax.core.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the global batch is split over both data-parallel axes

# logical axis name (on params, see models/vit.py) -> mesh axis
RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("classes", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise UserError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh axis sizes must be positive (or one -1), got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(
                f"{len(devices)} devices cannot be split into fsdp*tensor*data with the fixed sizes {sizes}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {math.prod(sizes)} devices but "
            f"{len(devices)} are available; make the product equal the device count or set one axis to -1"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def spec_for(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, path: str, notes: list[str]) -> PartitionSpec:
    """Mesh PartitionSpec for one param; dims that a mesh axis does not divide stay replicated (noted)."""
    rules = dict(RULES)
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical)), strict=True):
        axis = rules.get(name) if name else None
        if axis is not None and dim % mesh.shape[axis]:
            notes.append(f"{path} dim {dim} ({name}) not divisible by mesh axis {axis}={mesh.shape[axis]}")
            axis = None
        out.append(axis)
    return PartitionSpec(*out)


def tree_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh, what: str = "params") -> Any:
    """NamedShardings for a param-shaped tree; warns once listing params replicated for divisibility."""
    notes: list[str] = []
    flat_logical = jax.tree_util.tree_leaves_with_path(logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves(shapes_tree)
    specs = [
        spec_for(spec, tuple(shape.shape), mesh, jax.tree_util.keystr(path), notes)
        for (path, spec), shape in zip(flat_logical, flat_shapes, strict=True)
    ]
    if notes:
        warnings.warn(f"{what}: {len(notes)} dims replicated instead of sharded: " + "; ".join(notes[:8]), stacklevel=2)
    treedef = jax.tree_util.tree_structure(shapes_tree)
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def place(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Host arrays (the same on every process) as global arrays laid out by `shardings` (same tree), cast to `dtype`
    one device's slice at a time: each device receives only its shard, and no cast copy of a whole array is made."""

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index].astype(dtype or x.dtype))

    return jax.tree_util.tree_map(one, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """Fail early when the global batch cannot be split evenly over the data-parallel axes or hosts."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise UserError(
            f"global batch {global_batch} does not divide the data-parallel size data*fsdp={dp}; use a multiple of {dp}"
        )
    if global_batch % jax.process_count():
        raise UserError(f"global batch {global_batch} does not divide the {jax.process_count()} processes")


def host_batch_to_global(local: Any, mesh: Mesh) -> Any:
    """Assemble per-host batches (leading axis = this host's examples) into global sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


class DevicePrefetch:
    """A host batch iterator whose next batch goes onto the mesh while the current step runs.

    Call `prefetch()` right after dispatching a step: the host reads and transfers batch k+1 while the
    device computes step k. `get_state` (what grain's checkpoint handler saves) describes the batches handed
    out so far, not the one prefetched, so a resume continues exactly; restore the wrapped iterator itself.
    """

    def __init__(self, iterator: Any, mesh: Mesh, key: str | tuple[str, ...] = "images"):
        self._iterator, self._mesh, self._key = iterator, mesh, key
        self._ahead: tuple[Any, dict, Any] | None = None  # (state before it, host batch, device arrays)

    def _pull(self) -> tuple[Any, dict, Any]:
        state = self._iterator.get_state()
        batch = next(self._iterator)
        key = self._key
        local = batch[key] if isinstance(key, str) else {k: batch[k] for k in key}
        return state, batch, host_batch_to_global(local, self._mesh)

    def __next__(self) -> tuple[dict, Any]:
        """(host batch, batch[key] as a global sharded array; a dict of them for a tuple of keys)."""
        _, batch, images = self._ahead or self._pull()
        self._ahead = None
        return batch, images

    def prefetch(self) -> None:
        if self._ahead is None:
            self._ahead = self._pull()

    def get_state(self) -> Any:
        return self._ahead[0] if self._ahead else self._iterator.get_state()


def to_host(tree: Any) -> Any:
    """Whole numpy copies of a tree of global arrays, on every process. A leaf sharded over several processes is
    gathered (a collective: every process must call this with the same tree); the others are copied."""

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def sync_processes(name: str) -> None:
    """Barrier across the processes of a multi-host run (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def distributed_env() -> tuple[str | None, int | None, int | None, bool]:
    """The multi-process settings this process was started with, read from the environment (the one place
    the package reads them): (coordinator, num_processes, process_id, tpu_pod) from

    - DGMR_COORDINATOR: host:port of process 0, for jax.distributed.initialize (GPU clusters, local tests);
    - DGMR_NUM_PROCESSES, DGMR_PROCESS_ID: the process count and this process's index (e.g. $SLURM_PROCID);
    - DGMR_TPU_POD=1: a TPU pod slice, where jax.distributed.initialize() finds everything itself.

    Unset variables give None (False for DGMR_TPU_POD)."""
    coordinator = os.environ.get("DGMR_COORDINATOR") or None
    num_processes = int(os.environ["DGMR_NUM_PROCESSES"]) if "DGMR_NUM_PROCESSES" in os.environ else None
    process_id = int(os.environ["DGMR_PROCESS_ID"]) if "DGMR_PROCESS_ID" in os.environ else None
    return coordinator, num_processes, process_id, os.environ.get("DGMR_TPU_POD") == "1"


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """jax.distributed.initialize from the arguments, each defaulting to `distributed_env()`'s reading of
    DGMR_COORDINATOR / DGMR_NUM_PROCESSES / DGMR_PROCESS_ID, or with no arguments on a TPU pod
    (DGMR_TPU_POD=1). Returns whether it ran."""
    env_coordinator, env_num_processes, env_process_id, tpu_pod = distributed_env()
    coordinator = coordinator or env_coordinator
    num_processes = env_num_processes if num_processes is None else num_processes
    process_id = env_process_id if process_id is None else process_id
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if tpu_pod:
        jax.distributed.initialize()
        return True
    return False
