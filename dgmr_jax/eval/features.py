"""Frozen features of a whole dataset: a jitted forward over batches, gathered on the host.

`extract_features` takes any iterable of batch dicts with "images" (a grain loader from
`data.make_loader`, or `data.EvalBatches`, which yields every readable record of a source in order,
the last batch smaller); `extract_features` pads such a batch to the first batch's size (one
compilation) and drops the padding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import batch_sharding, data_parallel_size, make_mesh, to_host, tree_shardings
from dgmr_jax.models import ModelConfig, forward
from dgmr_jax.models.vit import logical_axes, param_shapes

FEATURE_KEYS = ("pooled", "tokens", "logits")


@functools.partial(jax.jit, static_argnames=("cfg", "keys"))
def _features(params: Any, images: jnp.ndarray, *, cfg: ModelConfig, keys: tuple[str, ...]) -> tuple[jnp.ndarray, ...]:
    out = forward(cfg, params, images)
    return tuple(out[key].astype(jnp.float32) for key in keys)


def extract_features(
    cfg: ModelConfig,
    params: Any,
    loader_or_batches: Iterable[Mapping[str, np.ndarray]],
    key: str | Sequence[str] = "pooled",
    *,
    return_index: bool = False,
    total: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray | dict[str, np.ndarray] | tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]:
    """Concatenated float32 `forward(cfg, params, batch["images"])[key]` over all batches, on the host.

    Sharded like the trainer: params by their logical axes and each batch over the mesh's data axes
    (default mesh: every local device on the data axis; batches are padded to a multiple of it).

    key: "pooled" (num, dim), "tokens" (num, tokens, dim) or "logits"; a sequence of keys gives a dict,
    all from one forward pass. With return_index, also the concatenated batch["index"] (the source record
    of each row, which the loaders provide), to look up labels. `total` is the number of batches for the
    progress bar (default: len() of the iterable, if any), `desc` its label (default: the keys).
    """
    keys = (key,) if isinstance(key, str) else tuple(key)
    if not keys or any(k not in FEATURE_KEYS for k in keys):
        raise UserError(f"key must be one or more of {FEATURE_KEYS}, got {key!r}")
    if "logits" in keys and not cfg.num_classes:
        raise UserError(f"model {cfg.name!r} has no head (num_classes=0), so no 'logits'")
    if total is None and hasattr(loader_or_batches, "__len__"):
        total = len(loader_or_batches)
    mesh = mesh or make_mesh()
    dp = data_parallel_size(mesh)
    params = jax.device_put(params, tree_shardings(logical_axes(cfg), param_shapes(cfg), mesh, "eval params"))
    feats, index, batch_size = [], [], None
    desc = desc or f"features ({', '.join(keys)})"
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress) as bar:
        for batch in loader_or_batches:
            images = np.asarray(batch["images"])
            n = len(images)
            batch_size = batch_size or -(-n // dp) * dp
            if n > batch_size:
                raise UserError(f"batch of {n} images after a first batch of {batch_size}: batches must not grow")
            images = np.pad(images, ((0, batch_size - n),) + ((0, 0),) * (images.ndim - 1))
            images = jax.device_put(images, batch_sharding(mesh))
            feats.append([to_host(f)[:n] for f in _features(params, images, cfg=cfg, keys=keys)])
            if return_index:
                index.append(np.asarray(batch["index"]))
            bar.update()
        bar.total = bar.n  # len() overcounts when EvalBatches leaves out unreadable records: end at 100%
    if not feats:
        raise UserError("no batches to extract features from")
    by_key = {k: np.concatenate([f[i] for f in feats]) for i, k in enumerate(keys)}
    result = by_key[key] if isinstance(key, str) else by_key
    return (result, np.concatenate(index)) if return_index else result
