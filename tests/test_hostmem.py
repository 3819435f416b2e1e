"""keep_freed_host_memory: freed large buffers are reused without page faults (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# each test probes a fresh Python process (seconds each)
pytestmark = [pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"), pytest.mark.slow]

# malloc, touch and free 64 MB; then count the minor page faults of doing it again.
_PROBE = """
import ctypes, resource
from dgmr_jax.core.hostmem import keep_freed_host_memory
applied = keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
libc.free(ctypes.memset(libc.malloc(size), 1, size))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    """(applied, page faults) in a fresh process whose environment asks JAX for one CPU device, plus env."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}  # conftest: 8
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = _probe()
    assert applied == "True" and faults < 100
    applied, faults = _probe(DGMR_KEEP_HOST_MEMORY="0")  # glibc's default: the 64 MB come back from the OS
    assert applied == "False" and faults > 10_000


@pytest.mark.parametrize(
    "env",
    [
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        {"JAX_NUM_CPU_DEVICES": "8"},
        {"JAX_PLATFORMS": "cuda"},
    ],
)
def test_not_applied_with_several_cpu_devices_or_an_accelerator(env):
    # two CPU devices fragment the one arena: the heap grew 1.3 GB every few steps without bound
    assert _probe(**env)[0] == "False"
    assert _probe(**env, DGMR_KEEP_HOST_MEMORY="1")[0] == "True"  # an explicit request still applies it
