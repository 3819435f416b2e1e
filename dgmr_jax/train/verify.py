"""What makes a saved train state trustworthy: a checksum of each of its arrays and whether every value is finite.

Both are computed on the devices that hold the arrays, by one jitted reduction over the global (possibly
sharded) arrays: nothing is read back from disk after a save, so the cost is one pass over device memory
whatever the state's size or the storage. Each value's bits, as unsigned 32-bit words, are multiplied by an odd
weight hashed from its position and summed mod 2^32: integer sums are exact in any order, so the checksum is the
same for any sharding or device count, and a single flipped bit always changes it (2^k times an odd number is
never 0 mod 2^32); other damage goes unnoticed with a chance of about 2^-32 per array.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fingerprint(tree: Any) -> tuple[dict[str, int], bool]:
    """(checksum of each array by its key path, whether every float value is finite) of a tree of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums, finite = jax.device_get(_stats([leaf for _, leaf in flat]))
    return {jax.tree_util.keystr(path): int(s) for (path, _), s in zip(flat, sums, strict=True)}, bool(finite)


@jax.jit
def _stats(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    """Per-leaf checksums and one all-finite flag, in a single pass over the arrays."""
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return [_checksum(x) for x in leaves], jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def _checksum(x: jax.Array) -> jax.Array:
    """Sum mod 2^32 of each 32-bit word times an odd weight hashed from its position (iotas keep the sharding)."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (_mix(index) | np.uint32(1)), dtype=jnp.uint32)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words: narrower types widened, wider ones split along a new last axis."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _mix(i: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: neighbouring positions get unrelated weights, so swapped values show."""
    i = i ^ (i >> 16)
    i = i * np.uint32(0x85EBCA6B)
    i = i ^ (i >> 13)
    i = i * np.uint32(0xC2B2AE35)
    return i ^ (i >> 16)
