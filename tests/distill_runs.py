"""What the tests of interrupted, damaged and split distill runs share: the images, the command, the clean reference
run (a module fixture: each test file that asks for it runs it once per xdist worker that runs its tests) and the
comparisons against it. Runs use 2 fake CPU devices each (8 on 2 cores run several times slower)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from dgmr_jax.core.paths import as_path

ROOT = Path(__file__).resolve().parents[1]


STEPS = 40


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(48):
        sub = root / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(sub / f"{i}.jpg")
    (root / "corrupt.jpg").write_bytes(b"not a jpeg")
    return root


def _command(workdir: Path, images: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dgmr_jax.cli",
        "distill",
        "--config",
        str(ROOT / "configs" / "cpu_tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.path={images}",
        "--config.teacher.random_init=true",
        f"--config.optim.total_steps={STEPS}",
        "--config.log_indices=true",
        *extra,
    ]


def _env(devices: int = 2, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts: `devices` fake CPU devices and conftest's XLA test flags."""
    flags = f"--xla_force_host_platform_device_count={devices} {os.environ.get('DGMR_TEST_XLA_FLAGS', '')}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu") | extra


def _run(workdir: Path, images: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(workdir, images, *extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _final(workdir: Path | str) -> dict:
    workdir = as_path(workdir)
    last = _last_step(workdir)
    assert last == STEPS
    path = workdir / "checkpoints" / str(last) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # any saved topology -> this process
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return ckpt.restore(path, target)


def _last_step(workdir: Path | str) -> int:
    """The newest step saved in workdir/checkpoints."""
    return max(int(p.name) for p in (as_path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _wait_for_logs(workdir: Path, proc: subprocess.Popen, lines: int = 3) -> None:
    """Wait until the run has logged `lines` metric rows (some steps trained), the moment tests interrupt it."""
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= lines, proc)


def _seen(workdir: Path | str) -> dict[int, list[int]]:
    """Step -> record indices of the trajectory that survived (a redone step overwrites its first try)."""
    out = {}
    for line in (as_path(workdir) / "seen.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["index"]
    return out


def _assert_same(a: dict, b: dict) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_close(a: dict, b: dict) -> None:
    """Params equal up to the reduction order of a different device layout (1e-5 of the largest weight)."""
    pairs = list(zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]), strict=True))
    scale = max(float(np.abs(y).max()) for _, y in pairs)
    assert max(float(np.abs(x - y).max()) for x, y in pairs) / scale <= 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images):
    workdir = tmp_path_factory.mktemp("clean")
    _run(workdir, images)
    return workdir


def _tensorboard_scalars(workdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in a run's TensorBoard event files, read record by record (length, its CRC, an Event
    proto, its CRC) with tensorboardX's own proto."""
    from tensorboardX.proto import event_pb2

    out = []
    for file in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = file.read_bytes(), 0
        while i < len(data):
            size = int.from_bytes(data[i : i + 8], "little")
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + size])
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
            i += 12 + size + 4
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before the interruption point: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)
