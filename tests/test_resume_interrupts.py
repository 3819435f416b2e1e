"""Interrupted distill runs (SIGKILL, SIGTERM, Ctrl-C once and twice, a torn checkpoint) resume to exactly the
params and data order of one clean run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess

import pytest
from distill_runs import (
    STEPS,
    _assert_same,
    _command,
    _env,
    _final,
    _last_step,
    _run,
    _seen,
    _tensorboard_scalars,
    _wait_for,
    _wait_for_logs,
    images,  # noqa: F401 (a fixture)
    reference,  # noqa: F401 (a fixture)
)

# every test runs the distill CLI in fresh processes (the module-scoped reference run alone takes minutes)
pytestmark = pytest.mark.slow


def test_sigkill_mid_training_then_resume(reference, images, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, images, "--config.async_checkpoint=true"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (tmp_path / "checkpoints" / "8").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _last_step(tmp_path) < STEPS
    _run(tmp_path, images)
    _assert_same(_final(tmp_path), _final(reference))
    seen, clean = _seen(tmp_path), _seen(reference)
    assert seen == clean  # the resumed data order continues exactly: nothing repeated, nothing skipped
    flat = [i for step in sorted(seen) for i in seen[step]]
    assert len(flat) == STEPS * 8 and flat == [i for step in sorted(clean) for i in clean[step]]


def test_tensorboard_events_hold_the_logged_losses(reference):
    """The run's TensorBoard events (written by a process that loaded no torch, as tensorboardX was imported with it
    hidden) hold the losses of metrics.jsonl, step for step."""
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in rows if "loss" in row]
    assert len(logged) == STEPS // 2 and _tensorboard_scalars(reference, "loss") == logged


def test_sigterm_saves_and_resumes(reference, images, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, images), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_logs(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = _last_step(tmp_path)
    assert 6 <= saved < STEPS
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")  # the curves so far
    assert f"preempted (SIGTERM): saved step {saved} and stopped; run again with the same workdir to resume" in out
    _run(tmp_path, images)
    _assert_same(_final(tmp_path), _final(reference))
    assert _seen(tmp_path) == _seen(reference)


def test_ctrl_c_saves_says_so_in_one_line_and_resumes(reference, images, tmp_path):
    """Ctrl-C acts like a preemption notice: the run says so at once, saves at the next step, stops with exit
    code 130 and one closing line, and the rerun resumes there and ends bit-identical to an uninterrupted run."""
    proc = subprocess.Popen(
        _command(tmp_path, images), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_logs(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    saved = _last_step(tmp_path)
    assert proc.returncode == 130 and "Traceback" not in err and 6 <= saved < STEPS, err[-2000:]
    lines = err.splitlines()
    assert "distill: Ctrl-C: saving the next step, then stopping (Ctrl-C again: stop at once, unsaved)" in lines
    assert lines[-1] == (
        f"dgmr-jax distill: interrupted (Ctrl-C): saved step {saved} and stopped; run again with the same workdir "
        "to resume"
    )
    assert not (tmp_path / "model").exists()
    assert f"distill: resuming from step {saved} of {STEPS}" in _run(tmp_path, images).stdout
    _assert_same(_final(tmp_path), _final(reference))
    assert _seen(tmp_path) == _seen(reference)


def test_second_ctrl_c_stops_at_once_in_one_line(images, tmp_path):
    """A second Ctrl-C ends the process at once, exit code 130, with one line and no traceback, even while the
    loop waits on data (an image that is a named pipe no one writes); the rerun finishes."""
    shutil.copytree(images, tmp_path / "imgs")
    fifo = tmp_path / "imgs" / "class0" / "stalled.jpg"
    os.mkfifo(fifo)
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err:
        proc = subprocess.Popen(
            _command(tmp_path / "run", tmp_path / "imgs"), env=_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    writer = []

    def reader_waits() -> bool:  # a writer can open the pipe without blocking once the run is reading it
        with contextlib.suppress(OSError):
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return bool(writer)

    try:
        _wait_for(reader_waits, proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "Ctrl-C: saving the next step" in err_file.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        for fd in writer:
            os.close(fd)
    text = err_file.read_text()
    assert proc.returncode == 130 and "Traceback" not in text and text.count("\n") < 10, text[-3000:]
    assert text.splitlines()[-1] == "distill: Ctrl-C again: stopped at once; rerun to resume from the last saved step"
    fifo.unlink()
    shutil.copy(images / "class0" / "0.jpg", fifo)
    assert "distill done at step 40" in _run(tmp_path / "run", tmp_path / "imgs").stdout
    assert not list((tmp_path / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_half_written_checkpoint_is_never_restored(reference, images, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    kept = min(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())  # keep=3: 32
    shutil.copytree(reference / "checkpoints" / str(kept), tmp_path / "checkpoints" / str(kept))
    torn = tmp_path / "checkpoints" / f"{kept + 4}.orbax-checkpoint-tmp-1763712000000000"
    torn.mkdir()
    (torn / "garbage").write_bytes(b"\x00" * 10)
    done = _run(tmp_path, images)
    assert "distill done at step 40" in done.stdout
    assert f"distill: resuming from step {kept} of 40" in done.stdout  # the torn later step is passed over
    assert not torn.exists()  # and removed
    _assert_same(_final(tmp_path), _final(reference))
