"""Host allocator setting for XLA:CPU runs: keep freed buffers in the process instead of handing them back."""

from __future__ import annotations

import ctypes
import os
import platform

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
    """Make glibc malloc reuse freed memory: one arena, no mmap'd chunks, no trimming (True if applied).

    XLA:CPU allocates each step's activations afresh. With glibc's defaults the large ones are mmap'd and
    unmapped every step: ~845k page faults and ~2 s of kernel time per step for a ViT-S/16 distillation step
    at batch 32 (benchmarks/distill_step.py), about 15% of the step. Call it before JAX's first computation
    (its CPU threads take their malloc arena then); the process keeps its peak heap until it exits.
    Off glibc, or with DGMR_KEEP_HOST_MEMORY=0, it does nothing and returns False."""
    if os.environ.get("DGMR_KEEP_HOST_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # -1 as the trim threshold is SIZE_MAX inside glibc: never trim (a positive int caps it at 2 GiB)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
