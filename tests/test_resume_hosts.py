"""Distill on two processes (jax.distributed): equal to one, in-loop eval equal to offline eval, and a
preemption or Ctrl-C reaching one host saves every host at one step."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from distill_runs import (
    STEPS,
    _assert_close,
    _command,
    _env,
    _final,
    _last_step,
    _wait_for_logs,
    images,  # noqa: F401 (a fixture)
    reference,  # noqa: F401 (a fixture)
)

# every test runs the distill CLI in fresh processes (the module-scoped reference run alone takes minutes)
pytestmark = pytest.mark.slow


def _start_two_processes(workdir: Path, images: Path, *extra: str) -> list[subprocess.Popen]:
    """The distill command as two local processes of 1 fake device each (jax.distributed)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            _command(workdir, images, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(1, DGMR_COORDINATOR=f"localhost:{port}", DGMR_NUM_PROCESSES="2", DGMR_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout, once all have exited cleanly."""
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _run_two_processes(workdir: Path, images: Path, *extra: str) -> None:
    _finish(_start_two_processes(workdir, images, *extra))


@pytest.mark.multiprocess
def test_two_processes_equal_one(reference, images, tmp_path):
    _run_two_processes(tmp_path, images)
    _assert_close(_final(tmp_path), _final(reference))


@pytest.mark.multiprocess
def test_two_processes_evaluate_in_the_loop_like_offline_eval(images, tmp_path):
    """In-loop kNN on 2 processes x 1 device (features gathered from both hosts) equals `dgmr-jax eval` of the
    exported student in one process."""
    from dgmr_jax.cli import main

    _run_two_processes(tmp_path / "run", images, "--config.optim.total_steps=8", "--config.evals=['knn:mnist5k']")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "offline.json"
    args = ["eval", "--model", str(tmp_path / "run" / "model"), "--train", "mnist5k", "--test", "mnist5k"]
    assert main([*args, "--img-size", "32", "--out", str(out)]) == 0
    offline = json.loads(out.read_text())["knn"]
    assert last["step"] == 8 and {k: last[f"eval/knn/knn@{k}"] for k in offline} == offline


@pytest.mark.multiprocess
def test_sigterm_to_one_host_saves_all_hosts_at_one_step(reference, images, tmp_path):
    """A preemption notice reaching only the second of two processes: both save the same step (the save is a
    collective) and stop; the rerun on two processes ends where an uninterrupted run does."""
    procs = _start_two_processes(tmp_path, images)
    _wait_for_logs(tmp_path, procs[1])
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    saved = _last_step(tmp_path)
    assert f"preempted (SIGTERM): saved step {saved} and stopped" in outs[0]
    assert 6 <= saved < STEPS and not (tmp_path / "model").exists()
    _run_two_processes(tmp_path, images)
    _assert_close(_final(tmp_path), _final(reference))


@pytest.mark.multiprocess
def test_ctrl_c_to_one_host_saves_all_hosts_at_one_step(images, tmp_path):
    """Ctrl-C to the second of two processes goes through the preemption service as a SIGTERM would: both save
    one step and stop; the interrupted process exits 130 with its one line, the other 0; the rerun finishes."""
    procs = _start_two_processes(tmp_path, images)
    _wait_for_logs(tmp_path, procs[1])
    procs[1].send_signal(signal.SIGINT)
    ends = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 130], ends[1][1][-3000:]
    saved = _last_step(tmp_path)
    assert 6 <= saved < STEPS and not (tmp_path / "model").exists()
    assert f"preempted (SIGTERM): saved step {saved} and stopped" in ends[0][0]
    assert ends[1][1].splitlines()[-1] == (
        f"dgmr-jax distill: interrupted (Ctrl-C): saved step {saved} and stopped; run again with the same workdir "
        "to resume"
    )
    assert f"distill done at step {STEPS}" in _finish(_start_two_processes(tmp_path, images))[0]
