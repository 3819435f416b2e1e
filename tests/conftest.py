"""Test set-up: 8 fake CPU devices for mesh tests (2 for the processes they start), XLA's backend optimization off,
one compilation cache for the session, float32 matmuls, a torchvision shim, and test tiers."""

import os
import shutil
import tempfile

import pytest

# XLA's backend optimization off for what the tests compile: their programs are small and run a few steps, so LLVM's
# optimization costs more than it saves (test_uvc_models' float32 cases: 46 s -> 29 s). It reaches every process a
# test starts (distill_runs._env reads DGMR_TEST_XLA_FLAGS), except those that run a user's long job as the user
# does (the demo, the README lines), where the compiled code's speed counts. TPU plans compile the same either way.
TEST_XLA_FLAGS = os.environ.setdefault("DGMR_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
_EIGHT, _TWO = (f"--xla_force_host_platform_device_count={n} {TEST_XLA_FLAGS}" for n in (8, 2))
# this process: 8 fake CPU devices; the processes tests start (the CLI as a user runs it) inherit 2, unless a test
# sets its own (8 fake devices on 2 cores run a distill about 1.3x slower, the demo 3x). xdist's workers inherit the
# 2 from the process that starts them, so 2 (or nothing) is taken as this file's own setting.
_SUBPROCESSES = os.environ.get("XLA_FLAGS", _TWO)
if _SUBPROCESSES == _TWO:
    os.environ["XLA_FLAGS"] = _EIGHT
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session: this process, xdist's workers (they inherit the variable) and
# every process a test starts, whose runs take JAX's variables as their compile_cache default. A CLI run then loads
# what an earlier test compiled: a tiny distill's CPU time drops by about 45%.
_OWN_CACHE = "DGMR_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["DGMR_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="dgmr-jax-test-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["DGMR_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.devices()  # the backend reads XLA_FLAGS once, here
os.environ["XLA_FLAGS"] = _SUBPROCESSES


def _import_timm_with_shim():
    """Import timm; if the CUDA-built torchvision lacks its op schemas, define them first.

    The torchvision wheel that resolves beside the CPU torch links CUDA libraries and fails with
    "operator torchvision::nms does not exist". Defining the two schemas lets it import; the ops
    themselves are never called by these tests.
    """
    try:
        import timm  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m.startswith(("torchvision", "timm"))]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor")
    _import_timm_with_shim.lib = lib  # keep the library object alive
    import timm  # noqa: F401,F811


try:
    import torch  # noqa: F401
except ImportError:  # torch is a test extra; tests that need it skip via importorskip
    pass
else:
    _import_timm_with_shim()


def pytest_unconfigure(config):
    """The session's compilation cache goes with the process that made it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["DGMR_TEST_JAX_CACHE"], ignore_errors=True)


_IMPLY_SLOW = ("multiprocess", "tpu_compile", "emulator")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config, items):
    """Tests that start jax.distributed processes, load libtpu or need the storage emulator are slow too, so
    `-m "not slow"` (the fast tier) leaves them all out."""
    for item in items:
        if any(item.get_closest_marker(name) for name in _IMPLY_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
