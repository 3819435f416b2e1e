"""Host allocator setting for XLA:CPU runs: keep freed buffers in the process instead of handing them back."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
    """Make glibc malloc reuse freed memory: one arena, no mmap'd chunks, no trimming (True if applied).

    XLA:CPU allocates each step's activations afresh. With glibc's defaults the large ones are mmap'd and
    unmapped every step: ~845k page faults and ~2 s of kernel time per step for a ViT-S/16 distillation step
    at batch 32 (benchmarks/distill_step.py), about 15% of the step. Call it before JAX's first computation
    (its CPU threads take their malloc arena then); the process keeps its peak heap until it exits.

    It is applied only where it was measured to help: one CPU device and no accelerator. With two CPU
    devices running at once, the one arena fragments and the heap grew by 1.3 GB every few steps without
    bound. DGMR_KEEP_HOST_MEMORY=0 turns it off, =1 applies it regardless; off glibc it does nothing."""
    choice = os.environ.get("DGMR_KEEP_HOST_MEMORY", "auto")
    if choice == "0" or platform.libc_ver()[0] != "glibc" or (choice != "1" and not _one_cpu_device()):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # -1 as the trim threshold is SIZE_MAX inside glibc: never trim (a positive int caps it at 2 GiB)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def _one_cpu_device() -> bool:
    """Whether JAX will compute on a single CPU device, judged from the environment before JAX starts."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and platforms.split(",")[0] != "cpu":
        return False
    if not platforms and _accelerator_plugin_installed():
        return False
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return (int(forced.group(1)) if forced else 1) <= 1 and int(os.environ.get("JAX_NUM_CPU_DEVICES") or 1) <= 1


def _accelerator_plugin_installed() -> bool:
    """A GPU/TPU PJRT plugin that JAX would pick up (jax_plugins entry points or modules, or libtpu)."""
    return bool(
        importlib.metadata.entry_points(group="jax_plugins")
        or importlib.util.find_spec("jax_plugins")  # the namespace package exists only if a plugin made it
        or importlib.util.find_spec("libtpu")
    )
