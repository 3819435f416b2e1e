"""The training loop's settings, defined once: each task's recipe defaults start from `loop_defaults`."""

from __future__ import annotations

import os
from typing import Any

import ml_collections


def loop_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """Batch, mesh, checkpointing, logging and evaluation cadence of a run (`overrides` replace defaults)."""
    c = ml_collections.ConfigDict()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.global_batch = 256
    c.checkpoint_every = 1000
    c.keep = 3  # checkpoints kept
    c.async_checkpoint = True
    c.log_every = 10
    c.eval_every = 0  # evaluate every N steps (0: at the end only)
    # JAX's persistent compilation cache (train.run.use_compile_cache): local or gs://, "{workdir}" the run's
    # workdir, "" none; compiles shorter than compile_cache_min_s seconds are not stored. JAX's own variables,
    # when set, are the defaults: one cache a user shares across runs
    c.compile_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "{workdir}/compile_cache"
    c.compile_cache_min_s = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS") or 1.0)
    unknown = set(overrides) - set(c.keys())
    if unknown:
        raise KeyError(f"not loop settings: {sorted(unknown)}")
    c.update(overrides)
    return c


def loop_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `Loop` fields a recipe sets (loop_defaults' names), for `Loop(..., **loop_settings(config))`."""
    return {
        "total_steps": config.optim.total_steps,
        "global_batch": config.global_batch,
        "checkpoint_every": config.checkpoint_every,
        "keep": config.keep,
        "async_checkpoint": config.async_checkpoint,
        "log_every": config.log_every,
        "eval_every": config.eval_every,
    }
