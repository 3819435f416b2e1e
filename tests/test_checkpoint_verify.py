"""What a resume trusts: checksums that see every flipped bit whatever the sharding, and logs cut back to the
resumed step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dgmr_jax.train.logs import JsonlLog
from dgmr_jax.train.verify import fingerprint


def _tree(kernel: np.ndarray) -> dict:
    return {
        "kernel": kernel,
        "scale": jnp.full((5,), 1.5, jnp.bfloat16),
        "count": jnp.int32(7),
        "mask": jnp.array([True, False, True]),
    }


def test_checksums_are_the_same_on_any_sharding_and_see_every_flipped_bit():
    kernel = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    sums, finite = fingerprint(_tree(kernel))
    assert finite and set(sums) == {"['kernel']", "['scale']", "['count']", "['mask']"}
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    for spec in (P("a", "b"), P(None, "b"), P("a")):
        assert fingerprint(_tree(jax.device_put(kernel, NamedSharding(mesh, spec)))) == (sums, True)
    for index in [(0, 0), (3, 2), (7, 5)]:
        for bit in range(32):
            flipped = kernel.copy()
            flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
            assert fingerprint(_tree(flipped))[0]["['kernel']"] != sums["['kernel']"], (index, bit)
    swapped = kernel.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprint(_tree(swapped))[0]["['kernel']"] != sums["['kernel']"]


def test_a_nan_or_inf_anywhere_is_not_finite():
    kernel = np.ones((4, 4), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        damaged = kernel.copy()
        damaged[2, 3] = bad
        assert fingerprint(_tree(damaged))[1] is False
    assert fingerprint({"x": jnp.full((3,), jnp.inf, jnp.bfloat16)})[1] is False


def test_a_resumed_log_drops_the_rows_it_will_write_again(tmp_path):
    path = epath.Path(tmp_path) / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "lo')  # cut short by a kill
    log = JsonlLog(path, drop_after=4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    log.write({"step": 6, "loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6]
